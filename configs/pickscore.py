"""VARD on Stable Diffusion 1.5 with the PickScore reward: the headline accelerator run.

    python -m vard_jax.main --config=configs/pickscore.py --workdir=runs/pickscore

Needs the weights (downloaded from the hub, or local directories):
    --config.pretrained.path=/models/stable-diffusion-v1-5
    --config.reward.path=/models/PickScore_v1::/models/CLIP-ViT-H-14

Choices (documented in docs/STABLE_DIFFUSION.md):
- DDIM with 50 steps, eta 1 and guidance 5 (DDPO's sampler settings), 128 images an epoch;
- LoRA rank 8 on the attention projections of the UNet (the frozen UNet is shared with the
  reference model), bfloat16 computation and bfloat16 storage of the frozen weights,
  rematerialised denoising steps (the UNet blocks' outputs kept);
- the reward-initialised value model: PickScore's own CLIP backbone on the decoded one-step
  prediction, so V is close to the reward at the last step before any value training;
- K = 1 (each step's local gradient), every step trained.
``--config=configs/pickscore.py:tiny`` shrinks batch sizes and steps for a smoke run.
"""

from vard_jax import schema

#: Stable Diffusion 1.5 on the hub (the diffusers layout; its PyTorch safetensors are
#: converted to Flax at load time, no PyTorch needed).
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def sd_base(arg: str = ""):
    """What the Stable Diffusion configs share."""
    config = schema.get_config()
    config.pretrained.family = "stable_diffusion"
    config.pretrained.path = SD15
    config.pretrained.dtype = "bfloat16"
    config.pretrained.param_dtype = "bfloat16"
    config.pretrained.attention = "chunked"
    config.sample.num_steps = 50
    config.sample.eta = 1.0
    config.sample.guidance_scale = 5.0
    config.sample.batch_size = 32
    config.sample.batches_per_epoch = 4
    config.sample.eval_batch_size = 32
    config.sample.eval_batches = 1
    config.sample.train_prompts = "animals"
    config.sample.eval_prompts = "animals_heldout"
    config.value.pretrain_epochs = 2
    config.value.updates_per_epoch = 16
    config.value.batch_size = 64
    config.value.learning_rate = 1e-4
    config.policy.lora_rank = 8
    config.policy.lora_alpha = 8.0
    config.policy.learning_rate = 3e-4
    config.policy.warmup_steps = 10
    config.policy.beta = 0.01
    config.policy.grad_depth = 1
    # Keep the UNet blocks' outputs, recompute inside them: by XLA's analysis of the K = 1 LoRA
    # step (docs/IMPLEMENTATION.md) 8.6 GiB and 5.3 TFLOP against 9.6 GiB and 7.2 for "full".
    config.policy.remat = "blocks"
    config.train.epochs = 100
    config.train.eval_every = 10
    config.checkpoint.every = 10
    if arg == "tiny":
        schema.tiny(config)
    elif arg:
        raise ValueError(f"this config takes '' or 'tiny', not {arg!r}")
    return config


def get_config(arg: str = ""):
    config = sd_base(arg)
    config.reward.name = "pickscore"
    config.value.arch = "reward_init"
    return config
