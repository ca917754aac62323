"""Common bench for ViT token-reduction methods."""
