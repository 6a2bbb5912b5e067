"""Experiment configurations (ml_collections), one get_config() per file."""
