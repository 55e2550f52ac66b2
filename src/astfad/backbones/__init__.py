"""Frozen feature extractors and where their weights come from."""
