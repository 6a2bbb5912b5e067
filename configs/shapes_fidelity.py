"""VARD on the shapes world with the non-differentiable shape_fidelity reward.

The reward is a host-side program (colour masks, connected components); it labels the value
model's training data and is never differentiated.
"""

from configs import shapes


def get_config(arg: str = ""):
    return shapes.with_program_reward(arg, "shape_fidelity", eval_extra="clip_alignment")
