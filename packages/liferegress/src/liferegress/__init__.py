"""liferegress."""
