"""VARD on the shapes world with the non-differentiable JPEG compressibility reward
(minus the JPEG size in kB at quality 95, as in the DDPO paper)."""

from configs import shapes


def get_config(arg: str = ""):
    config = shapes.get_config(arg)
    config.reward.name = "jpeg_compressibility"
    config.reward.eval_extra = "shape_fidelity,clip_alignment"
    return config
