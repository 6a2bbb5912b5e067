"""The training state: one pytree, checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vard_jax.training import faults


@flax.struct.dataclass
class RewardStats:
    """Running mean/variance of the reward (decayed per epoch), to standardise value targets."""

    mean: jax.Array  # []
    var: jax.Array  # []
    count: jax.Array  # [] number of rewards seen

    @classmethod
    def create(cls) -> "RewardStats":
        return cls(mean=jnp.zeros(()), var=jnp.ones(()), count=jnp.zeros(()))

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.var + 1e-8)

    def update(self, rewards: jax.Array, decay: float) -> "RewardStats":
        """Blends this batch's mean/variance in; the first batch sets them."""
        batch_mean = jnp.mean(rewards)
        batch_var = jnp.var(rewards)
        first = self.count == 0
        d = jnp.where(first, 0.0, decay)
        mean = d * self.mean + (1 - d) * batch_mean
        var = (d * (self.var + (self.mean - mean) ** 2)
               + (1 - d) * (batch_var + (batch_mean - mean) ** 2))
        return RewardStats(mean=mean, var=jnp.maximum(var, 1e-6), count=self.count + rewards.size)

    def standardise(self, rewards: jax.Array) -> jax.Array:
        return (rewards - self.mean) / self.std


@flax.struct.dataclass
class TrainState:
    epoch: jax.Array  # [] int32: completed epochs
    policy_params: Any
    policy_opt_state: Any
    value_params: Any
    value_opt_state: Any
    reward_stats: RewardStats
    key: jax.Array  # PRNG key (raw uint32 data)
    reward_queries: jax.Array  # [] int32: rewards evaluated so far
    policy_updates: jax.Array  # [] int32
    value_updates: jax.Array  # [] int32
    nonfinite_skips: jax.Array  # [] int32: updates skipped for a non-finite loss or gradient
    nonfinite_streak: jax.Array  # [2] int32: (value, policy) updates skipped in a row

    @classmethod
    def create(cls, policy_params: Any, policy_optimizer: optax.GradientTransformation,
               value_params: Any, value_optimizer: optax.GradientTransformation,
               key: jax.Array) -> "TrainState":
        """The state before any update: fresh optimiser states, zero counters."""
        def zero():  # a buffer per counter: the update steps donate the state
            return jnp.zeros((), jnp.int32)

        # The optimiser states in one compiled program each (op by op: seconds of small
        # compiles on CPU).
        return cls(epoch=zero(), policy_params=policy_params,
                   policy_opt_state=jax.jit(policy_optimizer.init)(policy_params),
                   value_params=value_params,
                   value_opt_state=jax.jit(value_optimizer.init)(value_params),
                   reward_stats=RewardStats.create(), key=key, reward_queries=zero(),
                   policy_updates=zero(), value_updates=zero(), nonfinite_skips=zero(),
                   nonfinite_streak=jnp.zeros((len(faults.KINDS),), jnp.int32))

    @classmethod
    def initial(cls, seed: int, policy: Any, reference_params: Any, value_model: Any,
                policy_optimizer: optax.GradientTransformation,
                value_optimizer: optax.GradientTransformation) -> "TrainState":
        """A run's first state from ``train.seed``: the value model's parameters from the
        seed's key, the policy's (``policy.init``: a float32 copy of the reference UNet, or
        LoRA adapters with B = 0) from ``policy_key(seed)``. Traceable (``jax.eval_shape``
        gives the abstract state)."""
        key, value_key = jax.random.split(jax.random.PRNGKey(seed))
        policy_params = policy.init(reference_params, policy_key(seed))
        return cls.create(policy_params, policy_optimizer, value_model.init(value_key),
                          value_optimizer, key)


def policy_key(seed: int) -> jax.Array:
    """The key of the policy's initial trainable parameters."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 2)
