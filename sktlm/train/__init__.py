"""Training: `step` (loss, jitted train/eval steps, `build`), `loop` (the trainer), optimizer, checkpoints, metrics.

`sktlm.train.build` etc. are loaded lazily so that importing `sktlm.train.metrics` does not import the model.
"""

_LAZY = ('build', 'Setup', 'TrainState', 'make_train_step', 'make_eval_step', 'make_loss_fn', 'cross_entropy')


def __getattr__(name):
  if name in _LAZY:
    from sktlm.train import step
    return getattr(step, name)
  raise AttributeError(f"module 'sktlm.train' has no attribute {name!r}")
