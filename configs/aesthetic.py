"""VARD on Stable Diffusion 1.5 with the LAION aesthetic score (CLIP ViT-L/14 + MLP head).

    python -m vard_jax.main --config=configs/aesthetic.py --workdir=runs/aesthetic \
        --config.reward.path=/models/clip-vit-large-patch14::/models/aesthetic_head.safetensors

The head's weights have no hub default that is not a pickle: give them as a .safetensors
file (vard_jax/rewards/pretrained_rewards.py says how to convert the public file once).
Everything else is configs/pickscore.py's; the value model starts from the aesthetic
predictor itself (CLIP image tower + head on the one-step prediction).
"""

from configs import pickscore


def get_config(arg: str = ""):
    config = pickscore.sd_base(arg)
    config.reward.name = "aesthetic"
    config.value.arch = "reward_init"
    return config
