"""VARD on Stable Diffusion 1.5 with JPEG compressibility, a non-differentiable reward.

    python -m vard_jax.main --config=configs/compressibility.py --workdir=runs/compress

The reward (minus the JPEG size in kB at quality 95) runs on the host and only labels the
value model's training data; the policy follows the gradient of the learned value. The value
model is the small convolutional network over latents (no reward network to start from).
"""

from configs import pickscore


def get_config(arg: str = ""):
    config = pickscore.sd_base(arg)
    config.reward.name = "jpeg_compressibility"
    config.value.arch = "conv"
    config.value.learning_rate = 1e-3
    return config
