"""Errors a user can act on: a bad file, flag or config. Entry points print them as one line (exit 2).

Programming errors stay ordinary exceptions and keep their tracebacks.
"""


class UserError(ValueError):
  """Base of every error caused by the user's input (files, flags, configs), not by the code."""


class ConfigError(UserError):
  """A config value that cannot work; the message names the ``--config.`` flag."""
