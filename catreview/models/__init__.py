"""Models: stage 1 (timm classifier), stage 2 (VLM post-classifier), the registry that picks them from the settings, and the built-in demo models."""
