"""VARD on the shapes world's flow-matching model (a tiny SD 3.5-style MMDiT) with the
differentiable clip_alignment reward: every flow code path, on CPU.

    python -m vard_jax.main --config=configs/shapes_flow.py --workdir=runs/shapes_flow

The settings of configs/shapes.py (the demo) on the flow model: 10 steps of Flow-GRPO's SDE
(noise level 0.7, ``sample.eta``; evaluated with the ODE, ``sample.eval_eta = 0``, as Flow-GRPO
evaluates), guidance 3; VARD's KL is on the velocities. Flow-GRPO on
the same model: ``--config.algorithm=grpo`` (``grpo.*``, with DDPO's PPO settings ``ddpo.*``).
``--config=configs/shapes_flow.py:tiny`` shrinks it for a smoke run.
"""

from configs import shapes


def get_config(arg: str = ""):
    return as_flow(shapes.get_config(arg))


def as_flow(config):
    """A shapes-world config on the flow model: its family, Flow-GRPO's noise level for the
    rollouts and its deterministic sampler for evaluation."""
    config.pretrained.family = "shapes_flow"
    config.sample.eta = 0.7
    config.sample.eval_eta = 0.0
    return config
