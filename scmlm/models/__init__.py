"""scmlm.models."""
