"""Application layer: recipes, the multi-variant pipeline, model specs, real configs, tiny test builders, the bias lab."""
