"""Lowest layer: name registries and the model-evaluation accounting every layer may import."""
