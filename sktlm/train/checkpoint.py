"""Orbax checkpoints of the train state and the data iterator position.

One CheckpointManager per run directory (`W/checkpoints`): async saves, keep-last-N, an item `state`
(the sharded TrainState; restored onto any mesh via the target shardings) and an item `data` (the data
iterator's JSON state), so a restart continues the exact token stream. A save killed midway leaves a
`<step>.orbax-checkpoint-tmp*` folder; the next writer removes them when it opens the folder.
"""

from __future__ import annotations

import os
import shutil

from sktlm.errors import UserError

TMP_MARK = '.orbax-checkpoint-tmp'


def steps_on_disk(directory: str) -> list[int]:
  """Finished checkpoint steps in `directory` from its folder names alone (no Orbax, creates nothing)."""
  try:
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
  except OSError:
    return []


def tmp_folders(directory: str) -> list[str]:
  """Folders of saves that never finished (a kill during an async save)."""
  try:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if TMP_MARK in n)
  except OSError:
    return []


def remove_tmp_folders(directory: str) -> list[str]:
  gone = tmp_folders(directory)
  for p in gone:
    shutil.rmtree(p, ignore_errors=True)
  return gone


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    import jax
    import orbax.checkpoint as ocp  # here, so the folder helpers above serve jax-free tools (sktlm doctor)
    self.directory = os.path.abspath(directory)
    if not read_only and jax.process_index() == 0:
      remove_tmp_folders(self.directory)  # saves killed midway (no save is in flight before this one starts)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'data'))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state or {}))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state) -> tuple[object, dict]:
    """Restores `step` into the shapes/dtypes/shardings of `abstract_state` (resharding as needed)."""
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad/incompatible checkpoint for the user
      first = ' '.join(str(e).split())[:300]
      raise UserError(f'cannot restore checkpoint step {step} from {self.directory}: {type(e).__name__}: '
                      f'{first} (the checkpoint is corrupt or does not match this config; move it '
                      'away to start fresh)') from e
    return out.state, dict(out.data or {})

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
