"""The tiny training config that several test modules share, and its trainer.

On CPU a VARD policy step takes tens of seconds to compile and a fraction of a second to run,
so the modules that need a compiled trainer of the shapes world (``test_training``,
``test_reliability``) use one: ``fidelity_config()`` and the session fixture ``fidelity_trainer``
(tests/conftest.py), built once per pytest worker. A module changes only what its Loop reads
(epochs, checkpoint and evaluation intervals, logging, replay): the compiled programs stay the
same, and the training subprocesses of ``test_reliability`` load them from the session's
compilation cache.
"""

from __future__ import annotations

import ml_collections

from configs import shapes_fidelity

#: ``policy.scan_unroll`` of the tests that compile a trainer for one epoch. On CPU the
#: differentiated rollout is fully unrolled by default (``rollout.resolve_unroll``: it runs
#: several times faster), which compiles a copy of the UNet's backward pass per step; a test
#: that trains one epoch spends its time compiling, so it keeps the loop (the same results:
#: ``test_diffusion``'s loop/unroll equivalence tests). This module's fidelity trainer (several
#: epochs), test_notebook's run and test_entry_points' run keep the unrolled default: with the
#: loop, their runs took longer than the compile saved (measured from a clean clone).
UNROLL = 1


def fidelity_config() -> ml_collections.ConfigDict:
    """``configs/shapes_fidelity.py:tiny`` (the non-differentiable shape_fidelity reward) with
    the conv value on x_t and no evaluation-only rewards."""
    config = shapes_fidelity.get_config("tiny")
    config.reward.eval_extra = ""
    config.value.arch = "conv"
    return config
