"""Multi-head attention through one function whose kernel is chosen by configuration.

``implementation``:

* ``"xla"``: ``jax.nn.dot_product_attention`` compiled by XLA (any backend; softmax in float32);
* ``"cudnn"``: the same entry point with cuDNN's fused (flash) kernel, GPUs only, float16 or
  bfloat16 inputs;
* ``"chunked"``: queries in chunks of ``query_chunk`` and keys in chunks of ``key_chunk``, with
  a running log-sum-exp (Rabe & Staats, 2021): the same result without an [L, L] score matrix,
  for long sequences on memory-bound devices.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "chunked")


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: use one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    return implementation


def _chunked(query: jax.Array, key: jax.Array, value: jax.Array, bias: Optional[jax.Array],
             query_chunk: int, key_chunk: int, scale: float) -> jax.Array:
    """[B, Lq, H, D] attention by chunks; ``bias`` [B|1, H|1, Lq, Lk] additive or None."""
    batch, q_len, heads, depth = query.shape
    k_len = key.shape[1]
    query = query * jnp.asarray(scale, query.dtype)
    q_chunk, k_chunk = min(query_chunk, q_len), min(key_chunk, k_len)

    def one_query_chunk(q_start):
        q = jax.lax.dynamic_slice_in_dim(query, q_start, q_chunk, axis=1)

        def one_key_chunk(carry, k_start):
            total, weight, running_max = carry
            k = jax.lax.dynamic_slice_in_dim(key, k_start, k_chunk, axis=1)
            v = jax.lax.dynamic_slice_in_dim(value, k_start, k_chunk, axis=1)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                                preferred_element_type=jnp.float32)
            if bias is not None:
                b = jax.lax.dynamic_slice_in_dim(bias, q_start, q_chunk, axis=2)
                scores = scores + jax.lax.dynamic_slice_in_dim(b, k_start, k_chunk, axis=3)
            chunk_max = jnp.max(scores, axis=-1, keepdims=True)
            new_max = jnp.maximum(running_max, chunk_max)
            probs = jnp.exp(scores - new_max)
            correction = jnp.exp(running_max - new_max)
            total = total * correction + jnp.einsum("bhqk,bkhd->bhqd", probs,
                                                    v.astype(jnp.float32))
            weight = weight * correction + jnp.sum(probs, axis=-1, keepdims=True)
            return (total, weight, new_max), None

        init = (jnp.zeros((batch, heads, q_chunk, depth), jnp.float32),
                jnp.zeros((batch, heads, q_chunk, 1), jnp.float32),
                jnp.full((batch, heads, q_chunk, 1), -jnp.inf, jnp.float32))
        starts = jnp.arange(0, k_len, k_chunk)
        (total, weight, _), _ = jax.lax.scan(jax.checkpoint(one_key_chunk), init, starts)
        return jnp.transpose(total / weight, (0, 2, 1, 3))  # [B, q_chunk, H, D]

    chunks = jax.lax.map(one_query_chunk, jnp.arange(0, q_len, q_chunk))  # [n, B, c, H, D]
    out = jnp.moveaxis(chunks, 0, 1).reshape(batch, q_len, heads, depth)
    return out.astype(value.dtype)


def _largest_divisor(length: int, limit: int) -> int:
    for size in range(min(limit, length), 0, -1):
        if length % size == 0:
            return size
    return 1


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              mask: Optional[jax.Array] = None, is_causal: bool = False,
              bias: Optional[jax.Array] = None, scale: Optional[float] = None,
              implementation: str = "xla", query_chunk: int = 1024,
              key_chunk: int = 4096) -> jax.Array:
    """Dot-product attention of [B, L, H, D] heads -> [B, Lq, H, D]:
    softmax(scale q k^T + bias) v.

    ``mask`` [B|1, H|1, Lq, Lk] boolean (True = attend); ``is_causal`` adds a causal mask;
    ``bias`` [B|1, H|1, Lq, Lk] is added to the scores (T5's relative positions); ``scale``
    defaults to 1 / sqrt(D) (T5 uses 1).
    """
    check_implementation(implementation)
    depth = query.shape[-1]
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    if implementation == "chunked":
        q_len, k_len = query.shape[1], key.shape[1]
        if is_causal:
            causal = jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
            mask = causal if mask is None else jnp.logical_and(mask, causal)
        scores_bias = None if bias is None else bias.astype(jnp.float32)
        if mask is not None:
            base = jnp.zeros((), jnp.float32) if scores_bias is None else scores_bias
            scores_bias = jnp.where(mask, base, jnp.finfo(jnp.float32).min)
        if scores_bias is not None:
            scores_bias = jnp.broadcast_to(scores_bias, scores_bias.shape[:2] + (q_len, k_len))
        return _chunked(query, key, value, scores_bias, _largest_divisor(q_len, query_chunk),
                        _largest_divisor(k_len, key_chunk), scale)
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention implementation 'cudnn' needs a GPU; use 'xla' or 'chunked' "
                         f"on {jax.default_backend()}")
    return jax.nn.dot_product_attention(
        query, key, value, bias=None if bias is None else bias.astype(query.dtype), mask=mask,
        scale=scale, is_causal=is_causal, implementation=implementation)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, L, H * D] -> [B, L, H, D]."""
    return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


def merge_heads(x: jax.Array) -> jax.Array:
    """[B, L, H, D] -> [B, L, H * D]."""
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))

