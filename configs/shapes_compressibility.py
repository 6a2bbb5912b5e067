"""VARD on the shapes world with the non-differentiable JPEG compressibility reward
(minus the JPEG size in kB at quality 95, as in the DDPO paper)."""

from configs import shapes


def get_config(arg: str = ""):
    config = shapes.get_config(arg)
    config.reward.name = "jpeg_compressibility"
    config.reward.eval_extra = "shape_fidelity,clip_alignment"
    # The value reads the reference model's one-step prediction x0_hat(x_t): with 16 chains
    # an epoch, the conv value on x_t learned the prompt, not the image, and the policy
    # drifted; on x0_hat it raises this reward (docs/RESULTS.md).
    config.value.arch = "conv_x0"
    return config
