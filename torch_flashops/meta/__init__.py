"""Fake (meta) implementations: output shapes from input shapes only."""
