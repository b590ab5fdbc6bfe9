"""The attention implementations (plain sktlm/model/attention.py; blocked_vjp of sktlm/model/kernels/cpu.py) against a
float64 numpy reference and each other.

Values: every implementation vs float64 numpy loops. Gradients: `blocked` and `blocked_vjp` (hand-written
backward) vs JAX's autodiff of `dense` (itself checked against float64 finite differences in test_model.py).
Shapes cover MHA and GQA, uneven last blocks, a document boundary inside a block, and padding (segment 0).
bfloat16 `blocked_vjp` must keep every matmul bf16 x bf16 -> f32 (the reason it exists).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_operand_dtypes

from sktlm.model import kernels
from sktlm.model.kernels import cpu

B, T, K = 2, 13, 8
RNG = np.random.default_rng(0)


def segments():
  seg = np.ones((B, T), np.int32)
  seg[0, 6:] = 2   # a second document from row 6 (inside the second block of 5)
  seg[1, 11:] = 0  # padding at the end of row 1
  return seg


def inputs(H, G, dtype='float32'):
  q, k, v = (RNG.standard_normal((B, T, h, K)) for h in (H, G, G))
  return q * K**-0.5, k, v, RNG.standard_normal((B, T, H, K))


def np_attention(q, k, v, seg):
  """float64 per-head loops; H query heads share G kv heads."""
  H, G = q.shape[2], k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      s = q[b, :, h] @ k[b, :, g].T
      mask = (np.arange(T)[:, None] >= np.arange(T)[None, :]) & (seg[b][:, None] == seg[b][None, :])
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
  return out


def value_and_grads(impl, block, q, k, v, seg, dout):
  def f(q, k, v):
    out = kernels.attention_fn(impl)(q, k, v, seg, block=block)
    return jnp.vdot(out.astype(jnp.float32), dout), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize('impl, block', [('dense', 0), ('blocked', 5), ('blocked', 4), ('blocked_vjp', 5),
                                         ('blocked_vjp', 4), ('blocked_vjp', 0)])
@pytest.mark.parametrize('heads', [(4, 4), (4, 2), (4, 1)])
def test_float32_matches_float64_and_dense_gradients(impl, block, heads):
  q, k, v, dout = inputs(*heads)
  seg = jnp.asarray(segments())
  out, grads = value_and_grads(impl, block, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), seg,
                               jnp.asarray(dout, jnp.float32))
  ref = np_attention(q, k, v, segments())
  np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=2e-6 * np.abs(ref).max())
  _, ref_grads = value_and_grads('dense', 0, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), seg,
                                 jnp.asarray(dout, jnp.float32))
  for got, want in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize('heads', [(4, 4), (4, 2)])
def test_bfloat16_blocked_vjp_tracks_float32(heads):
  """bf16 operands (f32 softmax and accumulation): values and gradients to bf16 precision of float32."""
  q, k, v, dout = inputs(*heads)
  seg = jnp.asarray(segments())
  out16, g16 = value_and_grads('blocked_vjp', 5, *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), seg,
                               jnp.asarray(dout, jnp.float32))
  out32, g32 = value_and_grads('dense', 0, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), seg,
                               jnp.asarray(dout, jnp.float32))
  assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g16)
  for got, want in zip((out16, *g16), (out32, *g32), strict=True):
    err = np.abs(np.asarray(got, np.float32) - np.asarray(want)).max()
    assert err < 3e-2 * np.abs(np.asarray(want)).max(), err


def test_bfloat16_blocked_vjp_matmuls_are_not_upcast():
  """Every matmul of the bf16 forward and backward stays bf16 x bf16 -> f32 on XLA:CPU (see cpu.permuted);
  JAX's backward of `blocked` does not (that is why blocked_vjp exists)."""
  q, k, v, dout = (jnp.asarray(x, jnp.bfloat16) for x in inputs(4, 2))
  seg = jnp.asarray(segments())

  def hlo(impl):
    def loss(q, k, v):
      return jnp.vdot(kernels.attention_fn(impl)(q, k, v, seg, block=5).astype(jnp.float32),
                      dout.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()

  dots = dot_operand_dtypes(hlo('blocked_vjp'))
  assert len(dots) >= 6 * 3  # 2 forward + 4 backward matmuls per block, 3 blocks
  assert all(d == ('bf16', 'bf16', 'f32') for d in dots), dots
  assert any(d != ('bf16', 'bf16', 'f32') for d in dot_operand_dtypes(hlo('blocked')))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('perm', [(1, 0, 2), (0, 2, 3, 1), (0, 1, 4, 2, 3)])
def test_permuted_is_the_exact_transpose(dtype, perm):
  x = jnp.asarray(RNG.standard_normal((2, 3, 4, 5, 6)[:len(perm)]), dtype)
  out = jax.jit(lambda x: cpu.permuted(x, perm))(x)
  assert out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32).transpose(perm))


def test_unknown_impl_is_a_user_error():
  from sktlm.config import schema
  from sktlm.config.validate import validate
  from sktlm.errors import UserError
  c = schema.get_config('pico')
  c.model.attention_impl = 'flash2'
  with pytest.raises(UserError, match='attention_impl'):  # the schema refuses it before any kernel is chosen
    validate(c)
