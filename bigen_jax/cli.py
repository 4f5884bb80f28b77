"""``run(main)`` for every entry point: user errors print as one line on stderr and exit with status 2;
``run_trainer(train, ...)`` for the trainers' ``--config`` / ``--workdir`` command lines on top of it.

A user error is a ``bigen_jax.errors.UserError`` or ``absl.app.UsageError`` raised by ``main``, a flag the
command line got wrong, or a config file or ``--config.<field>`` override that ml_collections cannot load.
``--verbose`` adds the traceback. Any other exception is a programming error and keeps its traceback (exit status 1).
"""

import re
import sys
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
import ml_collections
from ml_collections.config_flags import config_flags  # is_config_flag is not re-exported by the package

from bigen_jax import errors

USER_ERROR_EXIT_CODE = 2


def one_line(message: str) -> str:
  """``message`` with its line breaks (and the indentation after them) folded into single spaces."""
  return re.sub(r"\s*\n\s*", " ", message.strip())


def _verbose_in(argv: list[str]) -> bool:
  """Whether ``argv`` sets ``--verbose`` (the last setting wins); read by hand when flag parsing fails."""
  verbose = False
  for arg in _flag_arguments(argv):
    name, _, value = arg.lstrip("-").partition("=")
    if name == "verbose":
      verbose = value.lower() not in ("false", "0", "no") if value else True
    elif name == "noverbose":
      verbose = False
  return verbose


def _flag_arguments(argv: list[str]) -> list[str]:
  """The arguments of ``argv`` that look like flags, up to a ``--`` (after which all are positional)."""
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return [arg for arg in args if arg.startswith("-")]


def _fail(message: str, verbose: bool) -> NoReturn:
  if verbose:
    traceback.print_exc()
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT_CODE)


def _innermost_text(exc: BaseException) -> str:
  """The message of ``exc``, unwrapped: ml_collections raises ``AttributeError(KeyError('...'))``, whose str()
  is an escaped repr."""
  while len(exc.args) == 1 and isinstance(exc.args[0], BaseException):
    exc = exc.args[0]
  return exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)


def _config_arguments(flag_values: flags.FlagValues, argv: list[str]) -> tuple[list[str], list[str]]:
  """(``--name=file`` of the config flags, ``--name.field=value`` overrides) as given in ``argv``."""
  names = [name for name in flag_values if config_flags.is_config_flag(flag_values[name])]
  files, overrides = [], []
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg == "--":
      break
    name, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("-"):
      continue
    if name in names:
      files.append(f"--{name}={value if eq else (args[i + 1] if i + 1 < len(args) else '')}")
    elif any(name.startswith(f"{n}.") for n in names):
      overrides.append(f"--{arg.lstrip('-')}")
  return files, overrides


def _flag_error_message(exc: Exception, flag_values: flags.FlagValues, argv: list[str]) -> str:
  """One line for an error raised while parsing the command line, naming the flag at fault."""
  text = _innermost_text(exc)
  if "Traceback (most recent call last):" in text:  # ml_collections pastes the config file's traceback in
    head = text.split("Traceback (most recent call last):")[0].strip().rstrip(":")
    head = head.replace(": Error whilst parsing config file", ": error in the config file")
    last = text.strip().splitlines()[-1].strip()
    return f"{head}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"
  files, overrides = _config_arguments(flag_values, argv)
  if isinstance(exc, OSError):  # the config file (that an override needed) could not be loaded
    return f"{', '.join(files) or 'config'}: cannot load the config file: {_os_error_reason(exc)}"
  if isinstance(exc, (AttributeError, KeyError, IndexError)):  # an override names no field of the config
    key, _, hint = text.partition("\n")
    culprits = [o for o in overrides if _names_field(o, key, text)] or overrides
    return f"{', '.join(culprits)}: no such config field: {key}" + (f" ({hint.strip()})" if hint else "")
  return text


def _names_field(override: str, key: str, text: str) -> bool:
  """Whether the error ``text`` (first line ``key``, e.g. ``'lrr'``) is about ``--config.a.b=v``'s field."""
  fields = override.lstrip("-").partition("=")[0].split(".")[1:]
  return ".".join(fields) in text or any(f"'{field}'" in key for field in fields)


def _os_error_reason(exc: BaseException) -> str:
  """The last line of the innermost cause: ``[Errno 2] No such file or directory: 'x.py'``."""
  while exc.__cause__ is not None:
    exc = exc.__cause__
  return str(exc).strip().splitlines()[-1].strip()


def _check_config_files(flag_values: flags.FlagValues, argv: list[str], verbose: bool) -> None:
  """Fails now for a config file that did not load: ml_collections defers that error to the first read."""
  for name in flag_values:
    flag = flag_values[name]
    if not config_flags.is_config_flag(flag) or flag.value is None:
      continue
    try:
      getattr(flag.value, "_bigen_jax_probe", None)  # any attribute read of a failed config raises its error
    except OSError as e:
      files, _ = _config_arguments(flag_values, argv)
      given = [f for f in files if f.startswith(f"--{name}=")]
      _fail(f"{given[-1] if given else f'--{name}'}: cannot load the config file: {_os_error_reason(e)}",
            verbose)


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` with ``--verbose`` and one-line user errors (exit status 2); see the module
  docstring."""
  verbose = flags.DEFINE_bool("verbose", False, "Show the traceback of a user error (bad file, flag or config).")
  flag_values = flags.FLAGS

  def parse(argv: list[str]) -> list[str]:
    try:
      remaining = flag_values(argv)
    except flags.Error as e:
      _fail(_flag_error_message(e, flag_values, argv), _verbose_in(argv))
    except (AttributeError, KeyError, IndexError, OSError) as e:
      if not _config_arguments(flag_values, argv)[1]:
        raise
      _fail(_flag_error_message(e, flag_values, argv), _verbose_in(argv))
    _check_config_files(flag_values, argv, verbose.value)
    return remaining

  def guarded_main(argv: list[str]) -> Any:
    try:
      return main(argv)
    except (errors.UserError, app.UsageError) as e:
      _fail(str(e) or type(e).__name__, verbose.value)

  app.run(guarded_main, flags_parser=parse)


def run_trainer(train: Callable[[ml_collections.ConfigDict, str], Any], *, config_help: str,
                workdir_help: str) -> None:
  """A trainer's command line: ``--config`` (a config file, ``--config.<field>`` overrides) and ``--workdir``, both
  required, no other arguments; JAX's distributed runtime started from ``config.distributed``, then
  ``train(config, workdir)``; through ``run``."""
  config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help, required=True)

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from bigen_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(config.value.get("distributed"))
    train(config.value, workdir.value)

  flags.mark_flags_as_required(["config"])
  run(main)
