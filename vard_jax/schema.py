"""Every configuration field of vard_jax, with its default and unit: the schema.

Experiment configs (the repository's ``configs/shapes.py``, ``configs/pickscore.py``, or a
file of your own anywhere) start from ``get_config()`` here and override fields; the command
line overrides any field with ``--config.section.field=value``. ``vard_jax.config.validate``
checks the result at start-up against this file: a key that is not here, or a value of another
type, is an error. It lives in the package, so an installed wheel has it;
``configs/base.py`` re-exports it for the repository's experiment files.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Training objective over the shared rollout: vard | ddpo | draft, or value (VARD's value
    # alone on the pretrained model's samples, for sampling-time steering).
    config.algorithm = "vard"

    # --- the pretrained text-to-image model -------------------------------------------------
    config.pretrained = pretrained = ml_collections.ConfigDict()
    # Model loader: shapes (the embedded tiny world's DDPM UNet) | shapes_flow (its flow-matching
    # MMDiT) | stable_diffusion (SD 1.x, 2.x, XL, 3 / 3.5).
    pretrained.family = "shapes"
    pretrained.path = ""  # Hub id or local directory; "" = the family's default (shipped assets).
    pretrained.random_init = False  # Use randomly initialised weights of the family's shape.
    pretrained.dtype = "float32"  # Computation dtype of UNet, VAE, text encoder: float32 | bfloat16.
    pretrained.param_dtype = "float32"  # Storage dtype of frozen pretrained weights (bfloat16 halves).
    # Attention kernel of UNet and text encoder: xla | cudnn (GPU, fused flash kernel) | chunked
    # (no [L, L] score matrix in memory: SD 1.5 at 512 px, K=1 LoRA policy step 21.8 -> 9.6 GiB).
    pretrained.attention = "xla"
    pretrained.variant = ""  # Weight file variant to prefer, e.g. "fp16" (<weights>.fp16.safetensors).
    # Stable Diffusion: image side in pixels (0 = the model's own, e.g. 1024 for SD 3.5). It
    # must be a multiple of the VAE's factor (8) times a transformer's patch size.
    pretrained.resolution = 0

    # --- the DDIM sampler -------------------------------------------------------------------
    config.sample = sample = ml_collections.ConfigDict()
    sample.num_steps = 20  # DDIM denoising steps T per image.
    sample.eta = 1.0  # DDIM stochasticity: 0 = deterministic DDIM, 1 = DDPM-like variance.
    # The sampler's eta at evaluation (held-out figures, compare_final.png, vard_jax.evaluate):
    # -1 = sample.eta; 0 = the deterministic sampler (Flow-GRPO evaluates flows with the ODE).
    sample.eval_eta = -1.0
    sample.guidance_scale = 3.0  # Classifier-free guidance weight w (1 = no guidance).
    sample.batch_size = 16  # Images per rollout batch, global over all devices.
    sample.batches_per_epoch = 2  # Rollout batches per epoch (reward queries = product of both).
    sample.eval_batch_size = 16  # Images per evaluation batch (fixed prompts and noise).
    sample.eval_batches = 2  # Evaluation batches per evaluation (held-out prompts).
    # Diversity at each evaluation: one more batch of held-out prompts, each drawn this many
    # times; eval_diversity = mean pairwise RMS pixel distance within a prompt (0/1 = off).
    sample.diversity_samples = 4
    sample.train_prompts = "train"  # Prompt set for training rollouts: a split name or a file path.
    sample.eval_prompts = "heldout"  # Prompt set for evaluation: a split name or a file path.
    sample.python_loop = False  # Debug: run the denoising body in a Python loop, not lax.scan.

    # --- the reward ---------------------------------------------------------------------------
    config.reward = reward = ml_collections.ConfigDict()
    reward.name = "clip_alignment"  # Registered reward, or a weighted sum "a:1.0,b:0.1".
    reward.path = ""  # Reward model hub id or local directory ("" = the reward's default).
    reward.direct_last_step = False  # Use r(x_0) itself as J_1 (differentiable rewards only).
    reward.eval_extra = ""  # More rewards scored on evaluation samples only, comma-separated.

    # --- the value model V(x_t, t, c) ---------------------------------------------------------
    config.value = value = ml_collections.ConfigDict()
    # Architecture: conv (on x_t) | conv_x0 (the same network on the reference model's one-step
    # prediction x0_hat(x_t)) | reward_init (the reward's own backbone on x0_hat) | unet_head (a
    # head on the frozen reference UNet's mid-block features at x_t).
    value.arch = "conv"
    value.width = 32  # Channels of the first conv layer (doubled per downsampling).
    value.learning_rate = 1e-3  # Peak learning rate of the value optimiser (Adam).
    value.weight_decay = 0.0  # Decoupled weight decay of the value optimiser.
    value.grad_clip = 1.0  # Global-norm clip of value gradients (0 = off).
    value.warmup_steps = 0  # Linear warm-up of the value learning rate, in value updates.
    value.pretrain_epochs = 3  # Value-only epochs on the pretrained policy's samples.
    value.updates_per_epoch = 8  # Value gradient steps per epoch (on that epoch's states).
    value.batch_size = 128  # States (x_t, t, c) per value minibatch.
    value.stats_decay = 0.9  # Decay of the running reward mean/variance (per epoch; 0 = latest).
    # Epochs of states V trains on: this epoch's and those of the replay_epochs - 1 before it
    # (1 = this epoch's only, on-policy). Targets are standardised with the current statistics.
    value.replay_epochs = 1
    # Log, each epoch, the cosine between V's and the reward's gradients in x_t on the fresh
    # states (value_grad_cosine*; differentiable rewards; a reference UNet forward+backward and
    # a reward call per state).
    value.log_grad_alignment = False

    # --- the policy update ----------------------------------------------------------------------
    config.policy = policy = ml_collections.ConfigDict()
    policy.learning_rate = 3e-4  # Peak learning rate of the policy optimiser (Adam).
    policy.weight_decay = 0.0  # Decoupled weight decay of the policy optimiser.
    policy.grad_clip = 1.0  # Global-norm clip of policy gradients (0 = off).
    policy.warmup_steps = 0  # Linear warm-up of the policy learning rate, in policy updates.
    policy.lr_schedule = "constant"  # After warm-up: constant | cosine (to 0 at the last update).
    policy.beta = 0.01  # KL weight: penalty on mean (eps_theta - eps_ref)^2 per step.
    # D on the conditional predictions eps(x, t, c) (VARD's definition of D; B reference calls
    # a step) or on the classifier-free-guided ones the sampler uses (2B calls): conditional |
    # guided. The 3-seed demo ends the same within seed noise with either (docs/RESULTS.md).
    policy.kl_on = "conditional"
    policy.grad_depth = 1  # K: gradient flows through at most K denoising steps (windows).
    policy.train_fraction = 1.0  # Fraction of denoising steps trained per rollout (others: forward).
    policy.updates_per_epoch = 1  # VARD's policy gradient steps per rollout batch.
    # Rematerialise the step body: none | full | dots (save matmuls) | blocks (save the UNet
    # blocks' outputs, recompute inside them).
    policy.remat = "full"
    policy.lora_rank = 0  # LoRA rank on the UNet; 0 = full fine-tuning of every UNet weight.
    policy.lora_alpha = 0.0  # LoRA scale numerator: update (alpha / rank) * A @ B; 0 = alpha = rank.
    policy.lora_targets = "to_q,to_k,to_v,to_out_0"  # Module names of the adapted Dense layers.
    policy.scan_unroll = 0  # Unroll of the differentiated scan: 0 = auto (full on CPU, else 1).
    # Derivative of the sampler's x0 clip (clip_sample) in the differentiated rollouts of VARD
    # and DRaFT: exact (zero where the clip is active) | straight_through (identity; forward
    # values unchanged). Sampling, evaluation and DDPO always use the exact clip.
    policy.clip_x0_gradient = "exact"

    # --- baselines (config.algorithm = ddpo | draft; policy.* sets their optimiser) -----------
    # Defaults as ddpo-pytorch runs DDPO (its config/base.py); the earlier settings of this
    # project are adv_clip = 5, accumulate_timesteps = False, stat_buffer = 0, stat_min_count = 2.
    config.ddpo = ddpo = ml_collections.ConfigDict()
    ddpo.learning_rate = 1e-4  # Peak rate of DDPO's policy optimiser (0 = policy.learning_rate).
    ddpo.clip_range = 1e-4  # PPO clip range c of the probability ratio.
    ddpo.adv_clip = 10.0  # Advantages clipped to [-adv_clip, adv_clip] (0 = no clipping).
    ddpo.inner_epochs = 1  # Passes over an epoch's stored transitions.
    # Micro-batch of a PPO gradient: chains (one step of each) with accumulate_timesteps, else
    # (chain, step) transitions drawn at random. 4 chains: 4 optimiser steps an epoch of 16
    # chains, as ddpo-pytorch's paper config makes of its 256 chains (64 chains a step).
    ddpo.minibatch_size = 4
    # One optimiser step per minibatch of chains, its gradient averaged over all their
    # stochastic steps (ddpo-pytorch); False: one step per micro-batch of transitions.
    ddpo.accumulate_timesteps = True
    # Minibatches whose gradients make one optimiser step. On CPU give a step of transitions
    # (accumulate_timesteps = False) at least 2 (half the minibatch_size: the same step):
    # XLA:CPU runs a single micro-batch's backward convolutions ~20x slower
    # (docs/IMPLEMENTATION.md).
    ddpo.gradient_accumulation = 1
    # Advantages from the last stat_buffer rewards of each prompt, across epochs (0 = this
    # epoch's only), or from the batch while a prompt has fewer than stat_min_count of them.
    ddpo.stat_buffer = 16
    ddpo.stat_min_count = 16
    ddpo.reduce = "mean"  # Log-prob over dimensions: mean (DDPO's) | sum (exact density).
    # Flow-GRPO (config.algorithm = grpo): DDPO's PPO machinery (the ddpo.* settings above) on
    # groups of samples of one prompt, with a KL penalty to the pretrained model; sample.eta is
    # the SDE's noise level (Flow-GRPO's 0.7 on flow models).
    config.grpo = grpo = ml_collections.ConfigDict()
    grpo.group_size = 4  # Samples per prompt in a rollout batch (it must divide batch_size).
    # Weight of the KL between the policy's and reference's step kernels: Flow-GRPO's beta times
    # |dt| (its 0.01 at 10 steps; docs/ALGORITHM.md).
    grpo.beta = 0.001
    grpo.global_std = True  # Advantages divided by the batch's reward std (False: the group's).
    grpo.train_fraction = 0.99  # The first floor(fraction * steps) stochastic steps are trained.
    config.draft = draft = ml_collections.ConfigDict()
    draft.grad_depth = 1  # K: the reward gradient flows through the last K denoising steps.
    draft.random_depth = False  # AlignProp: K drawn uniformly from {1..grad_depth} per update.
    draft.beta = 0.0  # DRaFT+: weight of the eps distance to the pretrained model (0 = off).

    # --- training schedule --------------------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    train.seed = 0  # Seed of every random draw (prompts, noise, initialisation).
    train.epochs = 20  # Epochs of (rollout -> value update -> policy update).
    train.eval_every = 5  # Evaluate held-out prompts and write a sample grid every N epochs.
    train.max_nonfinite_in_a_row = 10  # Stop when N updates of one kind in a row are non-finite.

    # --- device mesh ------------------------------------------------------------------------------
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # Devices along the data-parallel axis (-1 = all that remain).
    mesh.fsdp = 1  # Devices along the parameter-sharding axis (-1 = all that remain).
    mesh.distributed = False  # Multi-process run: jax.distributed.initialize (also if env asks).
    mesh.coordinator_address = ""  # host:port of process 0 ("" = detected, or from the env).
    mesh.num_processes = 0  # Processes of the run; 0 = detected.
    mesh.process_id = -1  # This process's index in [0, num_processes); -1 = detected.
    # CPU only: XLA devices to split the host's cores into (data parallel over the cores); 0 =
    # the most cores that divide the batches (default mesh only), 1 = one device. A count the
    # user chose (JAX_NUM_CPU_DEVICES, or the device-count flag in XLA_FLAGS) wins.
    mesh.cpu_devices = 0

    # --- checkpoints -----------------------------------------------------------------------------
    config.checkpoint = checkpoint = ml_collections.ConfigDict()
    checkpoint.every = 5  # Save every N epochs (and always after the last).
    checkpoint.keep = 3  # Checkpoints kept on disk (oldest deleted first).

    # --- logging ---------------------------------------------------------------------------------
    config.logging = logging = ml_collections.ConfigDict()
    logging.tensorboard = True  # TensorBoard events under WORKDIR/tensorboard: scalars, grids.
    logging.wandb = False  # Log to Weights & Biases too (pip install "vard_jax[wandb]").
    logging.wandb_project = ""  # W&B project ("" = W&B's default, or WANDB_PROJECT).
    logging.wandb_entity = ""  # W&B team or user ("" = W&B's default, or WANDB_ENTITY).
    logging.wandb_name = ""  # W&B run name ("" = the workdir's name).
    logging.wandb_mode = ""  # online | offline | disabled; "" = WANDB_MODE or online.
    logging.progress_bar = True  # Show a tqdm progress bar with the live reward.
    logging.grid_columns = 8  # Images per row of the sample grids under WORKDIR/samples.

    return config


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config for a quick CPU run (tests, smoke checks).

    Two denoising steps, and a constant policy rate: the compiled update steps then do not
    depend on the number of epochs, so runs of any length share compiled programs (on CPU the
    compile of a policy step takes far longer than the run itself).
    """
    config.sample.num_steps = 2
    config.policy.lr_schedule = "constant"
    config.sample.batch_size = 4
    config.sample.batches_per_epoch = 1
    config.sample.eval_batch_size = 4
    config.sample.eval_batches = 1
    config.value.pretrain_epochs = 1
    config.value.updates_per_epoch = 2
    config.value.batch_size = 8
    config.train.epochs = 2
    config.train.eval_every = 1
    config.checkpoint.every = 1
    config.logging.progress_bar = False
    return config
