"""The one place that imports the upstream Flax model libraries (diffusers, transformers).

Both libraries print a deprecation notice for their Flax classes on every construction
(diffusers < 0.40 and transformers < 5 are the last releases that have them, and this
project pins them). The notice says nothing a user can act on, so it is filtered here,
once, on the loggers of the modules that emit it (a logger filter applies before a record
propagates, which transformers turns on when the environment sets ``CI``) and on the
libraries' own handlers; every other message still comes through.
Code elsewhere in the project imports ``diffusers``/``transformers`` through this module,
so that a future own UNet or text encoder replaces them in one place.
"""

from __future__ import annotations

import logging
import warnings

_DEPRECATION_MARKERS = (
    "Flax classes are deprecated",
    "TensorFlow and JAX classes are deprecated",
)


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _DEPRECATION_MARKERS)


# The modules of the pinned releases that log the notice (tests/test_upstream.py checks the
# installed packages against this list). Loggers are singletons by name, so a filter added
# here before a lazily imported module creates its logger still applies to it.
EMITTING_MODULES = (
    "diffusers.models.attention_flax",
    "diffusers.models.controlnets.controlnet_flax",
    "diffusers.models.embeddings_flax",
    "diffusers.models.modeling_flax_utils",
    "diffusers.models.resnet_flax",
    "diffusers.models.unets.unet_2d_blocks_flax",
    "diffusers.models.unets.unet_2d_condition_flax",
    "diffusers.models.vae_flax",
    "diffusers.pipelines.pipeline_flax_utils",
    "diffusers.schedulers.scheduling_ddim_flax",
    "diffusers.schedulers.scheduling_ddpm_flax",
    "diffusers.schedulers.scheduling_dpmsolver_multistep_flax",
    "diffusers.schedulers.scheduling_euler_discrete_flax",
    "diffusers.schedulers.scheduling_karras_ve_flax",
    "diffusers.schedulers.scheduling_lms_discrete_flax",
    "diffusers.schedulers.scheduling_pndm_flax",
    "diffusers.schedulers.scheduling_sde_ve_flax",
    "diffusers.schedulers.scheduling_utils_flax",
    "transformers.feature_extraction_utils",
    "transformers.modeling_flax_utils",
    "transformers.modeling_tf_utils",
    "transformers.pipelines.base",
    "transformers.tokenization_utils_base",
)

_installed = False


def _install_filters() -> None:
    global _installed
    if _installed:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    drop = _DropFlaxDeprecation()
    for name in EMITTING_MODULES:
        logging.getLogger(name).addFilter(drop)
    for library_logging in (diffusers_logging, transformers_logging):
        root = library_logging.get_logger()  # creates the library's default handler
        root.addFilter(drop)
        for handler in root.handlers:
            handler.addFilter(drop)
    for marker in _DEPRECATION_MARKERS:
        warnings.filterwarnings("ignore", message=f".*{marker}.*")
    _installed = True


def diffusers():
    """The ``diffusers`` module with its Flax deprecation notices filtered."""
    _install_filters()
    import diffusers as module

    return module


def transformers():
    """The ``transformers`` module with its Flax deprecation notices filtered."""
    _install_filters()
    import transformers as module

    return module
