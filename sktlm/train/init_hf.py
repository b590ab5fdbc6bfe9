"""`train.init_from_hf`: a train state at step 0, with a fresh optimizer state, holding the weights of a Hugging
Face folder. sktlm/interop/hf.py reads and checks the folder (a format converter, numpy trees); this module
places the trees into the built step's shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sktlm.errors import UserError
from sktlm.interop import hf
from sktlm.train import step


def init_state(config, setup: step.Setup) -> step.TrainState:
  """The TrainState of the folder config.train.init_from_hf, laid out in setup's shardings; UserError when the
  checkpoint's shapes or function differ from config.model."""
  path = config.train.init_from_hf
  params, model_state = hf.read_params(config.model, path)
  abstract = setup.abstract_state
  if jax.tree.structure((params, model_state)) != jax.tree.structure((abstract.params, abstract.model_state)):
    raise UserError(f'{path}: the imported parameter tree does not match this model')
  place = lambda x, a: jax.make_array_from_callback(x.shape, a.sharding,  # noqa: E731
                                                    lambda idx, x=x, a=a: x[idx].astype(a.dtype))
  params = jax.tree.map(place, params, abstract.params)
  model_state = jax.tree.map(place, model_state, abstract.model_state)
  make = jax.jit(lambda p, s: step.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=setup.tx.init(p),
                                               model_state=s),
                 out_shardings=setup.state_shardings)
  return make(params, model_state)
