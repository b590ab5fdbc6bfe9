"""Sampling from a trained model: a jitted prefill of the prompt and a KV-cached decode loop (lax.while_loop).

Static shapes: the cache holds B x S x G x K keys and values per layer (G = kv heads, so GQA caches G, not H,
heads; MLA caches the B x S x (kv_lora_rank + qk_rope_head_dim) latents, sktlm/model/mla.py), S = prompt length +
max_new_tokens, created by `model.init` in decode mode (sktlm/model/transformer.py, Attention._cached) and
carried through the loop. MoE models route with the train state's `model_state` (the aux-free routing
biases): without it they would route as if the bias were zero, not as trained. Cache slot == RoPE position: the
prompt fills slots 0..P-1, the token generated at step i sits at slot P + i. A row stops at end of document
(eos); the loop stops when every row has, or after max_new_tokens. Sharded like training: params keep their
shardings from the mesh rules; samples are replicated (the batch axis is not split, a handful of rows would not
divide it).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from sktlm import sharding
from sktlm.model import transformer as model_lib

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  max_new_tokens: int = 64
  temperature: float = 1.0   # 0: greedy (argmax)
  top_k: int = 0             # 0: off
  top_p: float = 1.0         # 1: off
  vocab_limit: int = 0       # ids >= this are never sampled (the vocab padding); 0: all
  eos_id: int = -1           # a row stops after emitting it (-1: never)
  pad_id: int = 0            # written after a row stopped
  keep_logits: bool = False  # return the logits every token was sampled from (B x N x V; tests)


def sample_logits(logits_BxV, rng, opts: SamplingOptions):
  """Next tokens from float32 logits: padding ids masked, then greedy, or temperature / top-k / top-p."""
  logits = logits_BxV.astype(jnp.float32)
  if opts.vocab_limit:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < opts.vocab_limit, logits, NEG_INF)
  if opts.temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / opts.temperature
  if opts.top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth_Bx1, logits, NEG_INF)
  if opts.top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it is < top_p
    n_keep_B = jnp.sum(cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1) < opts.top_p, axis=-1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_B[:, None] - 1, axis=-1)
    logits = jnp.where(logits >= cutoff_Bx1, logits, NEG_INF)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class Sampler:
  """Compiled prefill + decode for one (batch, prompt length, options); `mesh`/`rules` as in training."""

  def __init__(self, model_cfg, batch: int, prompt_len: int, opts: SamplingOptions, mesh=None, rules=()):
    self.model = model_lib.make_model(model_cfg, decode=True)
    self.B, self.P, self.opts = batch, prompt_len, opts
    self.S = prompt_len + opts.max_new_tokens
    self.mesh = mesh
    self.rules = tuple((name, None if name == 'batch' else axes) for name, axes in rules)
    self.prefill = jax.jit(self._context(self._prefill))
    self.decode = jax.jit(self._context(self._decode))

  def _context(self, fn):
    def wrapped(*args):
      if self.mesh is None:
        return fn(*args)
      with sharding.activation_context(self.mesh, self.rules):
        return fn(*args)
    return wrapped

  def empty_cache(self):
    shapes = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), jnp.zeros((self.B, self.S), jnp.int32)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes['cache']))

  def _apply(self, params, model_state, cache, tokens_BxT, start):
    T = tokens_BxT.shape[1]
    positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (self.B, T))
    variables = {'params': params, **(model_state or {}), 'cache': cache}
    (logits_BxTxV, _), mutated = self.model.apply(variables, tokens_BxT, positions_BxT, mutable=['cache'])
    return logits_BxTxV, mutated['cache']

  def _prefill(self, params, prompt_BxP, model_state=None):
    """model_state: TrainState.model_state (MoE routing biases), {} / None for models without one."""
    logits_BxPxV, cache = self._apply(params, model_state, self.empty_cache(), prompt_BxP, 0)
    return logits_BxPxV[:, -1], cache

  def _decode(self, params, cache, last_logits_BxV, rng, model_state=None):
    """Returns (tokens_BxN, lengths_B, logits_BxNxV of every step: what each token was sampled from)."""
    opts, B, N = self.opts, self.B, self.opts.max_new_tokens
    V = last_logits_BxV.shape[-1]

    def cond(carry):
      i, _, _, _, done_B, _, _ = carry
      return (i < N) & ~jnp.all(done_B)

    def body(carry):
      i, cache, logits_BxV, out_BxN, done_B, rng, all_logits = carry
      rng, key = jax.random.split(rng)
      tok_B = jnp.where(done_B, opts.pad_id, sample_logits(logits_BxV, key, opts))
      out_BxN = out_BxN.at[:, i].set(tok_B)
      all_logits = all_logits.at[:, i if opts.keep_logits else 0].set(logits_BxV)
      done_B = done_B | (tok_B == opts.eos_id)
      next_logits, cache = self._apply(params, model_state, cache, tok_B[:, None], self.P + i)
      return i + 1, cache, next_logits[:, 0], out_BxN, done_B, rng, all_logits

    init = (jnp.zeros((), jnp.int32), cache, last_logits_BxV, jnp.full((B, N), opts.pad_id, jnp.int32),
            jnp.zeros((B,), bool), rng, jnp.zeros((B, N if opts.keep_logits else 1, V), jnp.float32))
    n, _, _, out_BxN, _, _, all_logits = jax.lax.while_loop(cond, body, init)
    is_eos = out_BxN == opts.eos_id
    first_eos_B = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
    return out_BxN, first_eos_B, all_logits

  def __call__(self, params, prompt_BxP, rng, timings: dict | None = None, model_state=None):
    """Generates; returns (tokens_BxN, lengths_B, step_logits_BxNxV) as numpy. `timings` gets seconds and
    token counts for prefill and decode (compile excluded: both are compiled first). `model_state`: the
    train state's (MoE routing biases; needed to sample an aux-free MoE model as trained)."""
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    model_state = model_state or {}
    t0 = time.perf_counter()
    prefill = self.prefill.lower(params, prompt_BxP, model_state).compile()
    logits_BxV, cache = jax.eval_shape(self.prefill, params, prompt_BxP, model_state)
    decode = self.decode.lower(params, cache, logits_BxV, rng, model_state).compile()
    t1 = time.perf_counter()
    logits_BxV, cache = jax.block_until_ready(prefill(params, prompt_BxP, model_state))
    t2 = time.perf_counter()
    out = jax.device_get(decode(params, cache, logits_BxV, rng, model_state))
    t3 = time.perf_counter()
    if timings is not None:
      timings.update(compile_s=t1 - t0, prefill_s=t2 - t1, decode_s=t3 - t2, prefill_tokens=self.B * self.P,
                     decode_tokens=int(out[1].sum()))
    return out
