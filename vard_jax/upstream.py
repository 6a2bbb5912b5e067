"""The one place that imports the upstream Flax model libraries (diffusers, transformers).

Both libraries print a deprecation notice for their Flax classes on every construction
(diffusers < 0.40 and transformers < 5 are the last releases that have them, and this
project pins them). The notice says nothing a user can act on, so it is filtered here,
once, from the libraries' own log handlers; every other message still comes through.
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


_installed = False


def _install_filters() -> None:
    global _installed
    if _installed:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    drop = _DropFlaxDeprecation()
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
