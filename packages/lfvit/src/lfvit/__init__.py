"""lfvit."""
