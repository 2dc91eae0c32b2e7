"""Audio models: shared features (features.py), vocoders (vocoders/), their losses (criteria.py) and
discriminators (discriminators.py)."""
