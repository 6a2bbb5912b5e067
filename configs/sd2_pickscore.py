"""VARD on Stable Diffusion 2.1 (768 px, v-prediction) with the PickScore reward.

    python -m vard_jax.main --config=configs/sd2_pickscore.py --workdir=runs/sd2_pickscore

Needs the weights (downloaded from the hub, or local directories):
    --config.pretrained.path=/models/stable-diffusion-2-1
    --config.reward.path=/models/PickScore_v1::/models/CLIP-ViT-H-14

The settings of configs/pickscore.py; what differs is read from the checkpoint itself: the
UNet's linear projections and per-block heads (unet/config.json), the v-prediction
(scheduler/scheduler_config.json: the DDIM step and the KL on noise predictions convert it),
the OpenCLIP ViT-H text encoder and its "!" padding (text_encoder/, tokenizer/). 96 x 96
latents make attention 2.25x longer than SD 1.5's, so chunked attention stays on.
``stabilityai/stable-diffusion-2-1-base`` (512 px, epsilon-prediction) loads the same way.
``--config=configs/sd2_pickscore.py:tiny`` shrinks batch sizes and steps for a smoke run.
"""

from configs import pickscore

#: Stable Diffusion 2.1 on the hub (768 px, v-prediction).
SD21 = "stabilityai/stable-diffusion-2-1"


def get_config(arg: str = ""):
    config = pickscore.get_config(arg)
    config.pretrained.path = SD21
    return config
