"""VARD on Stable Diffusion XL base 1.0 (1024 px) with the PickScore reward.

    python -m vard_jax.main --config=configs/sdxl_pickscore.py --workdir=runs/sdxl_pickscore

Needs the weights (downloaded from the hub, or local directories):
    --config.pretrained.path=/models/stable-diffusion-xl-base-1.0
    --config.reward.path=/models/PickScore_v1::/models/CLIP-ViT-H-14

The settings of configs/pickscore.py; what is SDXL's comes from the checkpoint: two text
encoders (their penultimate states side by side), the pooled prompt embedding and the size/crop
ids of the UNet's added conditioning (``vard_jax.models.pipeline.SDXLPipeline``), transformer
depth per block. 128 x 128 latents; the UNet has no attention at the highest resolution.
These are reasoned defaults, not tuned ones.
``--config=configs/sdxl_pickscore.py:tiny`` shrinks batch sizes and steps for a smoke run.
"""

from configs import pickscore

#: Stable Diffusion XL base 1.0 on the hub.
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def get_config(arg: str = ""):
    config = pickscore.get_config(arg)
    config.pretrained.path = SDXL
    return config
