"""VARD on Stable Diffusion 3.5 Medium (a flow-matching MMDiT) with the PickScore reward.

    python -m vard_jax.main --config=configs/sd35_pickscore.py --workdir=runs/sd35_pickscore

Needs the weights (downloaded from the hub, or local directories):
    --config.pretrained.path=/models/stable-diffusion-3.5-medium
    --config.reward.path=/models/PickScore_v1::/models/CLIP-ViT-H-14

What is SD 3.5's comes from the checkpoint: the transformer, the flow-matching scheduler
(shift 3), three text encoders (two CLIPs and T5; a checkpoint without text_encoder_3/ runs
with zero T5 embeddings, as diffusers does) and the 16-channel VAE. The sampler settings are
the ones Flow-GRPO reports for SD 3.5 Medium with PickScore: 512 px, 10 training steps,
guidance 4.5, the SDE step with noise level 0.7 (``sample.eta``), evaluation with the ODE
(``sample.eval_eta = 0``, as Flow-GRPO evaluates); LoRA on the attention
projections of both streams (rank 32, alpha 64), bfloat16. VARD's own settings follow configs/pickscore.py: K = 1,
every step trained, beta 0.01 on the conditional velocities, the reward-initialised value.
These are reasoned defaults, not tuned ones.
``--config=configs/sd35_pickscore.py:tiny`` shrinks batch sizes and steps for a smoke run.
"""

from configs import pickscore

#: Stable Diffusion 3.5 Medium on the hub.
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"


def get_config(arg: str = ""):
    config = pickscore.get_config(arg)
    config.pretrained.path = SD35_MEDIUM
    config.pretrained.resolution = 512
    if arg != "tiny":
        config.sample.num_steps = 10
    config.sample.eta = 0.7
    config.sample.eval_eta = 0.0
    config.sample.guidance_scale = 4.5
    config.policy.lora_rank = 32
    config.policy.lora_alpha = 64.0
    # Both streams' attention projections (image: to_*, text: add_*_proj, to_add_out).
    config.policy.lora_targets = ("to_q,to_k,to_v,to_out_0,"
                                  "add_q_proj,add_k_proj,add_v_proj,to_add_out")
    return config
