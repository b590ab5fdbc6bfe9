"""Train state, the jitted sharded train/eval steps, and their construction for a config on a mesh.

`build(config, mesh)` is shared by the training loop (sktlm/train/loop.py) and `sktlm plan`: it takes a config
validated and resolved for the mesh (sktlm/train/resolve.py: vocab, kernels, attention, scan unrolling), derives
the abstract state and its shardings from the logical axis names with jax.eval_shape, so nothing is
materialised on one host, and returns `train_step` = jax.jit with explicit in/out shardings and the state
donated, traced inside the mesh's activation sharding context. The step is a pure function
(state, batch) -> (state, metrics).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sktlm import sharding
from sktlm.model import moe as moe_lib
from sktlm.model import transformer as model_lib
from sktlm.train import optim, resolve

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Non-param model variables updated by the step itself, e.g. MoE routing biases ({moe.BIAS_COLLECTION: ...});
  # {} for most models. Checkpointed with the rest.
  model_state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Setup:
  config: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  model: model_lib.Transformer
  tx: optax.GradientTransformation
  schedule: Any
  state_shardings: Any
  abstract_state: Any      # TrainState of jax.ShapeDtypeStruct carrying .sharding
  batch_sharding: jax.sharding.NamedSharding
  init_state: Any          # jitted rng -> TrainState, created directly in its shardings
  train_step: Any          # jitted (state, batch) -> (state, metrics); state donated
  eval_step: Any           # jitted (state, batch) -> {'loss_sum', 'weight_sum'}


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT):
  """Per-token cross-entropy and log(Z)^2 in float32; returns (weighted CE sum, weighted z^2 sum)."""
  logits = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product instead of take_along_axis: its gradient is elementwise, not a scatter-add (slow
  # on CPU), and it shards over a vocab-sharded logits axis without gathering.
  onehot_BxTxV = jax.nn.one_hot(targets_BxT, logits.shape[-1], dtype=logits.dtype)
  target_logit_BxT = jnp.sum(logits * onehot_BxTxV, axis=-1)
  ce_BxT = log_z_BxT - target_logit_BxT
  return jnp.sum(ce_BxT * weights_BxT), jnp.sum(jnp.square(log_z_BxT) * weights_BxT)


def _moe_terms(config, aux):
  """Scalar MoE loss terms and logged statistics from per-layer aux outputs."""
  if not aux:
    return 0.0, {}
  moe = config.model.moe
  lb, zl, sl = jnp.mean(aux['aux_loss']), jnp.mean(aux['router_z_loss']), jnp.mean(aux['seq_aux_loss'])
  lb_coef = moe.aux_loss_coef if moe.balance == 'aux_loss' else 0.0
  extra = lb_coef * lb + moe.seq_aux_loss_coef * sl + moe.router_z_loss_coef * zl
  stats = {'moe_aux_loss': lb, 'moe_seq_aux_loss': sl, 'moe_z_loss': zl,
           'moe_dropped_frac': jnp.mean(aux['dropped_frac']),
           'moe_ep_overflow_frac': jnp.mean(aux['ep_overflow_frac']),
           'moe_expert_load': jnp.mean(aux['expert_load'], axis=0)}
  return extra, stats


def make_loss_fn(config, model):
  z_coef = config.model.z_loss

  def loss_fn(params, batch, denom, model_state=None):
    """Loss normalised by `denom` (target tokens in the whole global batch), so micro-batch grads add up.
    `model_state`: the non-parameter collections (MoE routing biases), {} or None for dense models."""
    (logits, aux), loads = model.apply({'params': params, **(model_state or {})}, batch['inputs'], batch['positions'],
                                       batch['segment_ids'], mutable=[moe_lib.LOAD_COLLECTION])
    ce_sum, z_sum = cross_entropy(logits, batch['targets'], batch['weights'])
    moe_extra, moe_stats = _moe_terms(config, aux)
    n_micro = config.train.grad_accum
    loss = (ce_sum + z_coef * z_sum) / denom + moe_extra / n_micro
    return loss, {'ce_sum': ce_sum, **moe_stats, 'moe_loads': dict(loads)}

  return loss_fn


def _microbatches(batch, n: int):
  """[B, T] -> [n, B/n, T], micro-batch a = rows a, a+n, a+2n, ... so each stays spread over devices."""
  def split(x):
    B = x.shape[0]
    return x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def all_finite(*trees) -> jax.Array:
  """One boolean: every element of every array is finite (the loop never saves a state where it is not)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def make_train_step(config, model, tx, schedule, batch_sharding):
  loss_fn = make_loss_fn(config, model)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n_micro = config.train.grad_accum

  def train_step(state: TrainState, batch):
    denom = jnp.maximum(jnp.sum(batch['weights']), 1.0)
    if n_micro == 1:
      (_, aux), grads = grad_fn(state.params, batch, denom, state.model_state)
    else:
      micro = _microbatches(batch, n_micro)

      def body(acc, mb):
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
        (_, aux), g = grad_fn(state.params, mb, denom, state.model_state)
        return jax.tree.map(jnp.add, acc, (g, aux)), None

      zero_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      zero_aux = jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), denom, state.model_state)[0][1])
      zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux)
      (grads, aux), _ = jax.lax.scan(body, (zero_g, zero_aux), micro)
      aux = {k: (v if k == 'ce_sum' else jax.tree.map(lambda a: a / n_micro, v)) for k, v in aux.items()}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = moe_lib.update_bias(config.model.moe, state.model_state, aux.pop('moe_loads'))
    metrics = {'loss': aux.pop('ce_sum') / denom, 'grad_norm': grad_norm, 'lr': schedule(state.step), **aux,
               'finite': all_finite(grad_norm, params)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state), metrics

  return train_step


def make_eval_step(config, model):
  def eval_step(state, batch):
    logits, _ = model.apply({'params': state.params, **state.model_state}, batch['inputs'], batch['positions'],
                            batch['segment_ids'])
    ce_sum, _ = cross_entropy(logits, batch['targets'], batch['weights'])
    return {'loss_sum': ce_sum, 'weight_sum': jnp.sum(batch['weights'])}
  return eval_step


def build(config, mesh) -> Setup:
  """The step of `config` (validated and resolved for `mesh`: sktlm/train/resolve.py) on `mesh`."""
  resolve.check(config)
  rules = sharding.logical_rules(config)
  model = model_lib.make_model(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps, config.model)
  seq_len = config.data.seq_len

  def init_boxed(rng):
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k == moe_lib.BIAS_COLLECTION}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)

  with nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  state_shardings = sharding.shardings_for(abstract_boxed, mesh, rules)
  abstract_unboxed = nn.meta.unbox(abstract_boxed)
  sharding.check_divisible(abstract_unboxed, state_shardings)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_unboxed, state_shardings)
  batch_shard = sharding.batch_sharding(mesh, rules)
  batch_shardings = {k: batch_shard for k in BATCH_KEYS}

  def with_context(fn):
    # The mesh and rules must be set while tracing, or activation constraints are silently skipped.
    def wrapped(*args):
      with sharding.activation_context(mesh, rules):
        return fn(*args)
    return wrapped

  init_state = jax.jit(with_context(lambda rng: nn.meta.unbox(init_boxed(rng))), out_shardings=state_shardings)
  step_fn = make_train_step(config, model, tx, schedule, batch_shard)
  train_step = jax.jit(with_context(step_fn), in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=(0,))
  eval_step = jax.jit(with_context(make_eval_step(config, model)), in_shardings=(state_shardings, batch_shardings))
  return Setup(config=config, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule,
               state_shardings=state_shardings, abstract_state=abstract_state, batch_sharding=batch_shard,
               init_state=init_state, train_step=train_step, eval_step=eval_step)


def abstract_batch(config, setup: Setup) -> dict:
  shape = (config.train.batch_size, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'weights' else jnp.int32,
                                  sharding=setup.batch_sharding) for k in BATCH_KEYS}


def device_batch(local_batch: dict, setup: Setup, global_batch_size: int) -> dict:
  """Host-local numpy rows -> global jax.Arrays laid out by the batch sharding (multi-host safe)."""
  out = {}
  for k in BATCH_KEYS:
    x = local_batch[k]
    out[k] = jax.make_array_from_process_local_data(setup.batch_sharding, x,
                                                    (global_batch_size,) + x.shape[1:])
  return out
