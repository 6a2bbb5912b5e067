"""The configuration schema, for the experiment files of this directory: every field, with
its default and unit, is in ``vard_jax/schema.py`` (inside the package, so that an installed
wheel has it). A config file of your own can start from either import."""

from vard_jax.schema import get_config, tiny  # noqa: F401
