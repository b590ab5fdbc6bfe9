"""`sktlm <command> [flags]`: dispatches to sktlm/commands/<command>.py.

Each command module defines its own absl flags and a `main(argv)`; only the chosen module is imported,
so commands never collide on flag names and `sktlm scaling` never imports jax. User mistakes
(UserError, bad flags) print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    'train': 'train a model from an experiment config',
    'sweep': 'launch / resume a sweep of training runs',
    'scaling': 'fit scaling laws to sweep results; plots and report',
    'plan': 'counts, memory per device and AOT compile verdict for a config on a target',
    'data': 'prepare and inspect datasets',
    'tokenizer': 'train or inspect a SentencePiece tokenizer',
    'coord-check': 'activation size against width under SP and muP (a muP sanity check)',
    'doctor': 'list (and --fix) inconsistencies in a run or sweep folder',
    'export': 'write a checkpoint as a Hugging Face folder (Llama or DeepSeek-V3)',
    'sample': 'generate text from a checkpoint (KV-cached decoding)',
    'eval': 'loss, perplexity and bits per byte of a checkpoint on a dataset',
}

USAGE = 'usage: sktlm <command> [flags]\n\ncommands:\n' + '\n'.join(
    f'  {name:<12} {doc}' for name, doc in COMMANDS.items()) + '\n\n`sktlm <command> --help` for its flags.'


def fail(cmd: str, message: str, code: int = 2):
  print(f'sktlm {cmd}: error: {message}', file=sys.stderr)
  sys.exit(code)


def main(argv: list[str] | None = None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    print(USAGE)
    sys.exit(0 if len(argv) >= 2 else 2)
  cmd = argv[1]
  if cmd not in COMMANDS:
    fail('', f"unknown command '{cmd}' (known: {', '.join(COMMANDS)})")
  from absl import flags, logging

  from sktlm.errors import UserError

  try:
    module = importlib.import_module(f"sktlm.commands.{cmd.replace('-', '_')}")
  except UserError as e:
    fail(cmd, str(e))
  cmd_argv = [f'sktlm {cmd}'] + argv[2:]
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[2:]):
    print((module.__doc__ or '').strip() + '\n')
    print(flags.FLAGS.module_help(module))
    sys.exit(0)
  try:
    rest = flags.FLAGS(cmd_argv)
  except flags.Error as e:
    fail(cmd, _one_line(e))
  except UserError as e:  # raised by a config file's get_config while flags are parsed
    fail(cmd, str(e))
  except SyntaxError as e:  # a config file that does not parse
    from sktlm.config import load
    fail(cmd, load.syntax_error_line(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # config_flags errors
    fail(cmd, _override_error(cmd_argv, e))
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO if flags.FLAGS['verbosity'].present else logging.WARNING)
  try:
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None and not getattr(
        module, 'VALIDATES_ON_MESH', False):
      from sktlm.config.validate import validate
      validate(flags.FLAGS['config'].value)  # a command's --config is checked first, once (train and plan: on
      # the mesh they build, before resolving it)
    rc = module.main(rest)
  except UserError as e:
    fail(cmd, str(e))
  except KeyboardInterrupt:
    print(f'sktlm {cmd}: interrupted', file=sys.stderr)
    sys.exit(130)
  if getattr(module, 'FAST_EXIT', False):
    _fast_exit(rc or 0)
  sys.exit(rc or 0)


def _fast_exit(code: int):
  """Exits without tearing down the interpreter's modules and objects (after a `sktlm train`, jax's and
  XLA's teardown takes ~2 s); the atexit handlers still run and stdio is flushed, so nothing is lost."""
  import atexit
  import os
  atexit._run_exitfuncs()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _override_error(argv: list[str], e: Exception) -> str:
  """Names the `--config.key=value` override that config_flags could not apply."""
  from sktlm.config import load
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  try:
    config = load.load_config(spec) if spec else None
  except load.UserError as err:  # e.g. the config file does not exist
    return str(err)
  except Exception:  # noqa: BLE001 - fall back to the generic message
    config = None
  for arg in argv[1:]:
    name, _, value = arg.lstrip('-').partition('=')
    root, dot, path = name.partition('.')
    if root != 'config' or not dot or config is None:
      continue
    try:
      load.apply_overrides(config, {path: value})
    except load.UserError as err:
      return str(err)
  return f'bad flag value: {_one_line(e)}'


def _one_line(e: Exception) -> str:
  # config_flags wraps errors from get_config / overrides; keep the most specific line.
  cause = e
  while cause.__cause__ is not None or cause.__context__ is not None:
    nxt = cause.__cause__ or cause.__context__
    if type(nxt).__name__ == 'UserError':
      return str(nxt)
    cause = nxt
  text = ' '.join(str(e).split())
  return text


if __name__ == '__main__':
  main()
