"""Models: the backbone registry, heads and the custom layers a saved model needs (model)."""
