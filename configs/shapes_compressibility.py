"""VARD on the shapes world with the non-differentiable JPEG compressibility reward
(minus the JPEG size in kB at quality 95, as in the DDPO paper)."""

from configs import shapes


def get_config(arg: str = ""):
    return shapes.with_program_reward(arg, "jpeg_compressibility",
                                      eval_extra="shape_fidelity,clip_alignment")
