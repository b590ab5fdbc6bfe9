"""Orbax checkpoints of the train state and the data iterator position.

One CheckpointManager per run directory (`W/checkpoints`): async saves, keep-last-N, an item `state`
(the sharded TrainState; restored onto any mesh via the target shardings) and an item `data` (the data
iterator's JSON state), so a restart continues the exact token stream. A save killed midway leaves a
`<step>.orbax-checkpoint-tmp*` folder; the next writer removes them when it opens the folder.

Storage faults: a checkpoint that does not restore (truncated files: a failing disk, a bad copy) is moved to
`W/checkpoints.quarantine/<step>.corrupt` once an older one has restored (so a config mismatch, which fails
every step alike, never moves anything); `verify` reads every array of a step (`sktlm doctor --deep`); either
says which file is unreadable, or how the checkpoint differs from the model (checkpoint_faults.py). An
I/O error during a save (ENOSPC) removes the save's temp folder and raises one UserError naming the path and
the last good checkpoint; older checkpoints are untouched (Orbax prunes only after a save commits). The
folder's names, its temp folders and the quarantine are sktlm.runfiles' (read without Orbax).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys

from sktlm import files, runfiles
from sktlm.errors import UserError
from sktlm.train import checkpoint_faults


def _echo(exc) -> bool:
  """An echo of a storage failure that sktlm reports itself, once: a failed read's sibling reads, a failed
  write's sibling writes (and Orbax's background-thread logs of them), and TensorStore completions posted to
  the event loop Orbax has closed by then."""
  if exc is None:
    return False
  text = str(exc)
  return (text == 'Event loop is closed' or text.startswith('Encountered error while reading array')
          or files.storage_fault(exc) is not None)


class _Echoes(logging.Filter):
  def filter(self, record):
    return not (record.exc_info and _echo(record.exc_info[1]))


def _silence_echoes() -> None:
  """For the process (idempotent): storage-failure echoes of Orbax/TensorStore/asyncio are dropped, from the
  absl and asyncio loggers and from sys.excepthook / sys.unraisablehook (TensorStore threads and garbage-
  collected tasks report through those, at any later time). Every other report passes; the failure itself
  reaches the user as one line (a UserError), and any other Orbax error still raises with its traceback."""
  if getattr(sys.excepthook, 'sktlm_echoes', False):
    return
  prev_except, prev_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(t, v, tb):  # only TensorStore's posts to a closed loop: an uncaught error is never hidden
    if not (isinstance(v, RuntimeError) and str(v) == 'Event loop is closed'):
      prev_except(t, v, tb)

  def unraisablehook(u):
    if not _echo(u.exc_value):
      prev_unraisable(u)

  excepthook.sktlm_echoes = True
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).addFilter(_Echoes())


@contextlib.contextmanager
def _quiet_failed_reads():
  """Around a read that may fail: one error, not a flood of echoes; no absl warnings about missing metadata."""
  absl_log = logging.getLogger('absl')
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  except BaseException:
    gc.collect()  # the orphaned tasks go now (quietly: _silence_echoes)
    raise
  finally:
    absl_log.setLevel(level)




def verify(step_dir: str) -> str:
  """'' if every array of a checkpoint step reads back in full (and its data item is JSON), else which file is
  unreadable (checkpoint_faults.describe). Reads into host numpy arrays, so it needs no mesh and no config
  (`sktlm doctor --deep`)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  state = os.path.join(step_dir, 'state')
  _silence_echoes()
  with _quiet_failed_reads():
    try:
      handler = ocp.PyTreeCheckpointHandler()  # not Checkpointer.metadata, which hides why metadata fails
      try:
        tree = handler.metadata(epath.Path(state)).tree
      finally:
        handler.close()
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      ocp.PyTreeCheckpointer().restore(state, args=ocp.args.PyTreeRestore(restore_args=args))
      ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step_dir, 'data'))
    except Exception as e:  # noqa: BLE001 - whatever fails to read is the finding
      return checkpoint_faults.describe(step_dir, e)
  return ''


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    import jax
    import orbax.checkpoint as ocp  # here: importing this module costs no Orbax until a checkpoint is opened
    _silence_echoes()
    self.directory = os.path.abspath(directory)
    if not read_only and jax.process_index() == 0:
      runfiles.remove_checkpoint_tmp_folders(self.directory)  # saves killed midway (none in flight before this one)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))
    self._pending = None  # the step of the last save (an async one fails at the next wait)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    self._pending = step
    with self._storage_errors(step):
      return self._manager.save(step, args=args, force=force)

  @contextlib.contextmanager
  def _storage_errors(self, step: int | None):
    """An I/O error of a save (raised by the save, or by the wait for an async one): its temp folder goes,
    then one line naming the path and the last good checkpoint (a full disk is not a bug to trace)."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - only I/O errors are translated; the rest is re-raised
      fault = files.storage_fault(e)
      if fault is None:
        raise
      import jax
      if jax.process_index() == 0:
        runfiles.remove_checkpoint_tmp_folders(self.directory)
      what = f'checkpoint step {step}' if step is not None else 'a checkpoint'
      # the directory, not the failing file: which file fails first depends on timing (files.storage_fault)
      raise UserError(f'cannot write {what} to {self.directory}: {fault[1]}; '
                      f'{last_good(self.directory, step)}') from None

  def restore(self, step: int, abstract_state) -> tuple[object, dict]:
    """Restores `step` into the shapes/dtypes/shardings of `abstract_state` (resharding as needed)."""
    try:
      return self._restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad/incompatible checkpoint for the user
      why = checkpoint_faults.describe(os.path.join(self.directory, str(step)), e)
      raise UserError(f'cannot restore checkpoint step {step} from {self.directory}: {why} (the '
                      'checkpoint is corrupt or does not match this config; `sktlm doctor --deep` checks '
                      'every checkpoint of a run)') from None

  def _restore(self, step: int, abstract_state):
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    with _quiet_failed_reads():
      out = self._manager.restore(step, args=args)
    return out.state, dict(out.data or {})

  def restore_newest(self, abstract_state, upto: int | None = None):
    """The newest step <= `upto` that restores: (state, data_state, step, [(bad step, error, moved to)]), or None
    when there is no checkpoint. Steps that fail are moved to the quarantine only once an older one restored
    (the config fits, so they are corrupt); if none restores, nothing moves and the newest's error is raised."""
    steps = [s for s in self.all_steps() if upto is None or s <= upto]
    bad = []
    for step in reversed(steps):
      try:
        state, data_state = self._restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 - judged below, once an older step did or did not restore
        bad.append((step, checkpoint_faults.describe(os.path.join(self.directory, str(step)), e)))
        continue
      import jax
      lead = jax.process_index() == 0  # one mover on a shared filesystem
      bad = [(b, err, runfiles.quarantine(self.directory, b, 'corrupt') if lead
              else runfiles.quarantine_dir(self.directory)) for b, err in bad]
      if bad:
        self._manager.reload()
      return state, data_state, step, bad
    if bad:
      first, err = bad[0]
      older = f' (nor does any older one: {", ".join(str(b[0]) for b in bad[1:])})' if bad[1:] else ''
      raise UserError(f'cannot restore checkpoint step {first} from {self.directory}: {err}{older}; the '
                      'checkpoint is corrupt or does not match this config (`sktlm doctor --deep` checks '
                      'every checkpoint; --config.train.resume_step=K picks one)')
    return None

  def set_aside_after(self, step: int) -> list[str]:
    """Moves the checkpoints newer than `step` to the quarantine (`train.resume_step`); returns where."""
    moved = [runfiles.quarantine(self.directory, s, f'after-{step}') for s in self.all_steps() if s > step]
    if moved:
      self._manager.reload()
    return moved

  def wait(self):
    with self._storage_errors(self._pending):
      self._manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


def last_good(directory: str, below: int | None = None) -> str:
  good = [s for s in runfiles.steps_on_disk(directory) if below is None or s < below]
  kept = f'last good checkpoint: step {good[-1]} in {directory}' if good else 'no checkpoint was saved before'
  return f'{kept} (free space and rerun the same command to resume)'


def io_error(e: BaseException, fallback_path: str) -> str | None:
  """'path: reason' of a storage fault in `e` (files.storage_fault; `fallback_path` when the error names no
  file), else None."""
  fault = files.storage_fault(e)
  if fault is None:
    return None
  return f'{fault[0] or fallback_path}: {fault[1]}'
