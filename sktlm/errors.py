"""User-facing errors: the CLI prints these as one line and exits non-zero (no stack trace)."""


class UserError(Exception):
  """A mistake in the user's input (config, flags, paths, data, checkpoints).

  Raise it with a message that names the offending key/path and says what to do.
  """
