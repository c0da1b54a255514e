"""Model definitions, one folder per model (transformers' layout)."""
