"""The CPU matmul kernels (sktlm/model/kernels/cpu.py): `transposed`, `dense`, `swiglu` (hand-written backward
passes) and the one-hot embedding.

Gradients are compared with float64 numpy (float32 tight, bfloat16 to its precision), and the compiled
bfloat16 backward pass is checked to keep every matmul bf16 x bf16 -> f32: the CPU speed of bfloat16 training
rests on that (see kernels/cpu.transposed); the plain path, differentiated by JAX, does not (the negative
control). Equality with the plain path itself: tests/test_kernels.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dot_operand_dtypes

from sktlm.model import kernels
from sktlm.model.kernels import cpu

RNG = np.random.default_rng(0)
X64 = RNG.standard_normal((64, 24))
W64 = RNG.standard_normal((24, 40)) * 0.2
WG64, WU64, WO64 = (RNG.standard_normal(s) * 0.2 for s in ((24, 40), (24, 40), (40, 24)))
DY64 = RNG.standard_normal((64, 40))
# float32 results vs float64: relative to the magnitude of each result; bfloat16 (8-bit mantissa) to ~1e-2.
TOL = {'float32': 1e-5, 'bfloat16': 2e-2}


def close(actual, expected, dtype):
  expected = np.asarray(expected, np.float64)
  err = np.abs(np.asarray(actual, np.float64) - expected).max()
  assert err <= TOL[dtype] * np.abs(expected).max(), (err, np.abs(expected).max())


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('shape', [(5, 7), (1, 9), (64, 3)])
def test_transposed_is_the_exact_transpose(dtype, shape):
  x = jnp.asarray(RNG.standard_normal(shape), dtype)
  out = jax.jit(cpu.transposed)(x)
  assert out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(x, np.float32).T)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_dense_value_and_gradients_match_float64(dtype):
  x = jnp.asarray(X64, dtype)
  w = jnp.asarray(W64, jnp.float32)  # params stay float32; dense casts them to the compute dtype

  def f(x, w):
    return jnp.sum(cpu.dense(x, w, jnp.float32) * jnp.asarray(DY64, jnp.float32))

  y = jax.jit(lambda x, w: cpu.dense(x, w))(x, w)
  assert y.dtype == x.dtype
  xr, wr = np.asarray(x, np.float64), np.asarray(jnp.asarray(w, dtype), np.float64)  # the rounded operands
  close(y, xr @ wr, dtype)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  assert dx.dtype == x.dtype and dw.dtype == jnp.float32  # float32 params get an unrounded float32 gradient
  close(dx, DY64 @ wr.T, dtype)
  close(dw, xr.T @ DY64, dtype)


def np_swiglu(x, wg, wu, wo):
  g, u = x @ wg, x @ wu
  sig = 1 / (1 + np.exp(-g))
  return (g * sig * u) @ wo


def np_swiglu_grads(x, wg, wu, wo, dy):
  g, u = x @ wg, x @ wu
  sig = 1 / (1 + np.exp(-g))
  act = g * sig
  dh = dy @ wo.T
  dg = dh * u * (sig + act * (1 - sig))
  du = dh * act
  return dg @ wg.T + du @ wu.T, x.T @ dg, x.T @ du, (act * u).T @ dy


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_swiglu_value_and_gradients_match_float64(dtype):
  dy = RNG.standard_normal((64, 24))
  x = jnp.asarray(X64, dtype)
  ws = [jnp.asarray(w, jnp.float32) for w in (WG64, WU64, WO64)]

  def f(x, *ws):
    return jnp.sum(cpu.swiglu(x, *ws).astype(jnp.float32) * jnp.asarray(dy, jnp.float32))

  xr = np.asarray(x, np.float64)
  wr = [np.asarray(jnp.asarray(w, dtype), np.float64) for w in ws]
  close(jax.jit(cpu.swiglu)(x, *ws), np_swiglu(xr, *wr), dtype)
  grads = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x, *ws)
  assert grads[0].dtype == x.dtype and all(g.dtype == jnp.float32 for g in grads[1:])
  for got, want in zip(grads, np_swiglu_grads(xr, *wr, dy), strict=True):
    close(got, want, dtype)


def test_bfloat16_backward_matmuls_are_not_upcast():
  """XLA:CPU upcasts a bf16 matmul with a column-major operand to float32 (2x slower); `transposed` avoids it.
  The plain kernels (JAX autodiff of the same forward) do not: the negative control."""
  x = jnp.asarray(RNG.standard_normal((256, 64)), jnp.bfloat16)
  ws = [jnp.asarray(RNG.standard_normal(s) * 0.1, jnp.float32) for s in ((64, 128), (64, 128), (128, 64))]

  def dots_of(ops):
    def loss(x, wq, *mlp):
      return jnp.sum(ops.swiglu(ops.dense(x, wq[:, :64]), *mlp).astype(jnp.float32) ** 2)
    return dot_operand_dtypes(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(x, *ws[:1], *ws).compile()
                              .as_text())

  dots = dots_of(cpu)
  assert len(dots) >= 3 * 4  # forward, input-gradient and weight-gradient matmuls of dense and swiglu
  assert all(d == ('bf16', 'bf16', 'f32') for d in dots), dots
  assert any(d != ('bf16', 'bf16', 'f32') for d in dots_of(kernels))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_one_hot_embedding_matches_a_lookup_and_its_scatter_add_gradient(dtype):
  tokens = jnp.asarray(RNG.integers(0, 40, 64), jnp.int32)
  table = jnp.asarray(RNG.standard_normal((40, 24)), jnp.float32)
  dy = RNG.standard_normal((64, 24))
  out = jax.jit(cpu.embed_one_hot, static_argnums=2)(tokens, table, jnp.dtype(dtype))
  assert out.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(table.astype(dtype)[tokens], np.float32))
  g = jax.jit(jax.grad(lambda t: jnp.sum(cpu.embed_one_hot(tokens, t, jnp.dtype(dtype)).astype(jnp.float32)
                                         * jnp.asarray(dy, jnp.float32))))(table)
  want = np.zeros((40, 24))
  np.add.at(want, np.asarray(tokens), np.asarray(jnp.asarray(dy, dtype), np.float64))
  assert g.dtype == jnp.float32
  close(g, want, dtype)
