"""VARD on the shapes world's flow model with the non-differentiable JPEG compressibility
reward: configs/shapes_compressibility.py's settings (the value reads x0_hat = x - sigma v and
replays the last 4 epochs' states) on configs/shapes_flow.py's model and sampler."""

from configs import shapes, shapes_flow


def get_config(arg: str = ""):
    config = shapes.with_program_reward(arg, "jpeg_compressibility",
                                        eval_extra="shape_fidelity,clip_alignment")
    return shapes_flow.as_flow(config)
