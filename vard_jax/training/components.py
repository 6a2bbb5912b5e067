"""The parts of a run, built once from its config: mesh, model family, policy, reward, value
model, schedules, optimisers; the initial state and where things are placed.

``Components`` holds no compiled function: the jitted steps (``vard_jax.training.steps``) are
built over it, and the ``Trainer`` (``vard_jax.training.trainer``) adds what the epoch loop
does on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vard_jax.algorithms import ddpo, vard
from vard_jax.config import PPO_ALGORITHMS
from vard_jax.diffusion import rollout as rollout_lib, sampler as sampler_lib
from vard_jax.diffusion.schedule import with_clip_gradient
from vard_jax.models import loader, policy as policy_lib, value as value_lib
from vard_jax.parallel import mesh as mesh_lib
from vard_jax.rewards import registry
from vard_jax.training import optimizers as optimizers_lib
from vard_jax.training.state import RewardStats, TrainState, policy_key


class Components:
    """The static parts of a run: built once from ``config`` on ``devices`` (default: all,
    shaped by ``config.mesh``), the frozen weights placed on the mesh."""

    def __init__(self, config, devices=None):
        self.config = config
        self.mesh = mesh_lib.make_mesh(config, devices)
        loaded = loader.load(config)
        self.pipeline = loaded.pipeline
        self.frozen = {k: v for k, v in loaded.params.items() if k != "unet"}
        self.reference_params = loaded.params["unet"]
        self.policy = policy_lib.make(config.policy, self.pipeline)
        reward_context = registry.RewardContext(path=loaded.reward_path,
                                                world_clip=loaded.world_clip)
        self.reward = registry.build(config.reward.name, reward_context)
        self.reward_evaluator = registry.RewardEvaluator(self.reward)
        extra = [n.strip() for n in config.reward.eval_extra.split(",") if n.strip()]
        self.eval_evaluators = {n: registry.RewardEvaluator(registry.build(n, reward_context))
                                for n in extra if n != self.reward.name}
        for flag in ("reward.direct_last_step", "value.log_grad_alignment"):
            section, name = flag.split(".")
            if config[section][name] and not self.reward.differentiable:
                raise ValueError(f"{flag} needs a differentiable reward; {self.reward.name!r} "
                                 f"is not (set {flag}=False)")
        self.num_steps = config.sample.num_steps
        self.schedule = sampler_lib.make_schedule(self.pipeline, self.num_steps)
        # The differentiated rollouts (VARD's policy step, DRaFT) may use the straight-through
        # derivative of the x0 clip; sampling and DDPO's densities use ``self.schedule``.
        self.policy_schedule = with_clip_gradient(self.schedule, config.policy.clip_x0_gradient)
        # How the run samples (``sampler.sample``): its rollouts for training and DDPO's.
        self.sampler_spec = sampler_lib.SamplerSpec(self.num_steps, config.sample.eta,
                                                    config.sample.guidance_scale,
                                                    config.sample.python_loop)
        self.null_ids = sampler_lib.null_ids(self.pipeline)  # [1, L] the empty prompt
        self.value_model = self._make_value_model()
        # The denoising steps DDPO stores and trains (None for the other algorithms).
        self.ddpo_steps = None
        if config.algorithm in PPO_ALGORITHMS:
            self.ddpo_steps = ddpo.stochastic_steps(self.schedule, config.sample.eta)
        if config.algorithm == "grpo":  # Flow-GRPO trains the first (noisiest) steps
            kept = max(1, int(config.grpo.train_fraction * len(self.ddpo_steps)))
            self.ddpo_steps = self.ddpo_steps[:kept]
        self.policy_updates_per_epoch = optimizers_lib.policy_updates_per_epoch(
            config, 0 if self.ddpo_steps is None else len(self.ddpo_steps),
            self.mesh.shape["data"])
        # The rates by update count (the Loop logs those of each epoch's last updates).
        optimizers = optimizers_lib.make_optimizers(config, self.policy_updates_per_epoch)
        self.policy_learning_rate, self.policy_optimizer = (optimizers.policy_learning_rate,
                                                            optimizers.policy)
        self.value_learning_rate, self.value_optimizer = (optimizers.value_learning_rate,
                                                          optimizers.value)
        self.loss_config = vard.PolicyLossConfig(
            beta=config.policy.beta, grad_depth=config.policy.grad_depth, eta=config.sample.eta,
            guidance_scale=config.sample.guidance_scale, remat=config.policy.remat,
            python_loop=config.sample.python_loop,
            unroll=rollout_lib.resolve_unroll(config.policy.scan_unroll),
            kl_on=config.policy.kl_on,
            trained_steps=vard.trained_steps(self.num_steps, config.policy.train_fraction))
        self.replicated = mesh_lib.replicated(self.mesh)  # sharding of keys, metrics
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)  # split over data
        # The frozen weights are placed on the mesh once (sharded like parameters).
        self.frozen = mesh_lib.put(self.frozen, mesh_lib.param_shardings(self.mesh, self.frozen))
        self.reference_params = mesh_lib.put(
            self.reference_params, mesh_lib.param_shardings(self.mesh, self.reference_params))

    def reference_x0_hat(self, reference_params: Any, x: jax.Array, timesteps: jax.Array,
                         context: jax.Array) -> jax.Array:
        """The frozen reference model's conditional one-step prediction x0_hat(x_t),
        differentiable in ``x`` (what the conv_x0 and reward_init values read); the final
        state (t < 0) is already clean and passes through."""
        output = self.pipeline.eps_fn(reference_params, x, jnp.maximum(timesteps, 0), context)
        # eps, v or velocity models. A DDPM model's x0 is clipped like the sampler's
        # (clip_sample, the shapes world's pixels; identity for Stable Diffusion's latents):
        # the early steps' predictions are otherwise ~1/sqrt(alpha_bar) ~ 100 times too large.
        # The derivative follows policy.clip_x0_gradient.
        return self.policy_schedule.x0_at(timesteps, x, output)

    def _make_value_model(self) -> value_lib.ValueModel:
        config, pipeline = self.config, self.pipeline
        context_shape = pipeline.context_shape
        if config.value.arch == "conv":
            return value_lib.conv_value(pipeline.sample_shape, context_shape, config.value.width)

        def x0_hat(aux, x, timesteps, context):
            return self.reference_x0_hat(aux["reference"], x, timesteps, context)

        if config.value.arch == "conv_x0":
            return value_lib.conv_x0_value(pipeline.sample_shape, context_shape,
                                           config.value.width, x0_hat)
        if config.value.arch == "unet_head":
            def features(aux, x, timesteps, context):
                return pipeline.mid_features(aux["reference"], x, timesteps, context)

            if not hasattr(pipeline.unet.config, "mid_shape"):
                raise ValueError("value.arch = 'unet_head' reads a UNet's mid block; this "
                                 "model's transformer has none (use value.arch = 'conv' or "
                                 "'conv_x0')")
            shape = pipeline.unet.config.mid_shape(*pipeline.sample_shape[1:])
            return value_lib.unet_head_value(shape, context_shape, config.value.width, features)
        if self.reward.backbone is None:
            raise ValueError(f"value.arch = 'reward_init' needs a reward that is a network "
                             f"(clip_alignment, pickscore, aesthetic); {self.reward.name!r} is not")
        _, backbone_params, score_fn = self.reward.backbone

        def decode(aux, x0):
            return pipeline.decode(aux["frozen"], x0)

        return value_lib.reward_init_value(score_fn, backbone_params, x0_hat, decode)

    @property
    def value_needs_reward_ids(self) -> bool:
        return self.config.value.arch == "reward_init"

    def value_aux(self, stats: RewardStats, frozen: dict, reference_params: Any,
                  reward_ids: Any) -> dict:
        """Inputs of the value model beyond (x_t, t, c): the reference UNet for the x0_hat
        values, with the reward's prompt ids and statistics for reward_init; empty for conv."""
        if self.config.value.arch in ("conv_x0", "unet_head"):
            return {"reference": reference_params}
        if not self.value_needs_reward_ids:
            return {}
        return {"reward_ids": reward_ids, "reward_mean": stats.mean, "reward_std": stats.std,
                "reference": reference_params, "frozen": frozen}

    # --- state -----------------------------------------------------------------------------
    def initial_policy_params(self) -> Any:
        """The trainable parameters of the pretrained policy (unplaced): a float32 copy of the
        UNet, or LoRA adapters with B = 0."""
        return self.policy.init(self.reference_params, policy_key(self.config.train.seed))

    def pretrained_policy_params(self) -> Any:
        """``initial_policy_params`` placed like a trained policy (the jitted functions' input)."""
        params = self.initial_policy_params()
        return mesh_lib.put(params, mesh_lib.param_shardings(self.mesh, params))

    def _initial_state(self) -> TrainState:
        return TrainState.initial(self.config.train.seed, self.policy, self.reference_params,
                                  self.value_model, self.policy_optimizer, self.value_optimizer)

    def init_state(self) -> TrainState:
        """The placed initial state; the policy starts equal to the reference."""
        state = self._initial_state()
        return mesh_lib.put(state, self.state_shardings(state))

    def state_shardings(self, state: Any) -> Any:
        return mesh_lib.param_shardings(self.mesh, state)

    def init_state_abstract(self) -> TrainState:
        """Like ``init_state`` without placement (for eval_shape)."""
        return self._initial_state()

    # --- host-side helpers used by the loop ---------------------------------------------------
    def put_batch(self, tree: Any) -> Any:
        """Places host values (the whole batch, the same on every process) split over ``data``;
        each process copies only the rows its own devices hold."""
        return mesh_lib.put(tree, self.batch_sharding)

    def put_key(self, key: jax.Array) -> jax.Array:
        """A PRNG key replicated over the mesh, as the loop's keys (split from the state's)
        are: a key placed elsewhere (``jax.random.PRNGKey(0)`` on the default device) has a
        different type, so the steps would be traced and compiled a second time for it."""
        return mesh_lib.put(key, self.replicated)

    def put_ids(self, prompts: list[str]) -> jax.Array:
        """The prompts' token ids [B, L], placed split over ``data``."""
        return self.put_batch(jnp.asarray(self.pipeline.tokenize(prompts)))

    def encode(self, ids: jax.Array) -> jax.Array:
        """Prompt embeddings [B, L, D] of token ids [B, L] with the frozen text encoder."""
        return self.pipeline.encode_ids(self.frozen["text_encoder"], ids)
