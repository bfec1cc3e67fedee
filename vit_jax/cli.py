"""What every vit_jax command line shares: help, config overrides, refusals.

`run(main)` replaces `absl.app.run` in the `python -m vit_jax.<tool>`
programs:
  * `--help` (`-h`, `--helpshort`, `--helpfull`) prints the program's
    docstring and its flags, including those it takes from other modules
    (`flags.adopt_module_key_flags`), and exits 0;
  * with `config_flag='config'`, `--config.<field>=<value>` arguments are
    taken out before absl parses the rest and handed to `main` as
    `(name, text)` pairs (`config_lib.apply_overrides` applies them to any
    declared field, nested model fields included);
  * a refusal (a bad flag, config, path, file or data; any `ValueError`,
    `OSError`, `LookupError`, `RuntimeError`, `FloatingPointError` or
    `absl.app.UsageError`) is printed as one `error: ...` line on stderr
    and the program exits 2, without a traceback. `VIT_JAX_TRACEBACK=1` shows
    the traceback for debugging. Anything else (a bug) keeps its traceback.
"""

from collections.abc import Callable, Sequence
import os
import sys
from typing import Any, NoReturn

from absl import app
from absl import flags

TRACEBACK_VARIABLE = 'VIT_JAX_TRACEBACK'
EXIT_REFUSED = 2
_HELP_FLAGS = ('-h', '--help', '-help', '--helpshort', '-?', '--helpfull')
# What a refusal is raised as across the code base (each with a message that
# names the field, file or flag and the fix).
_REFUSALS = (
    ValueError,
    OSError,
    LookupError,
    RuntimeError,
    FloatingPointError,
    app.UsageError,
    flags.Error,
)


def one_line(error: BaseException) -> str:
  """An exception's message on one line (a KeyError's without quotes)."""
  message = (
      str(error.args[0])
      if isinstance(error, KeyError) and error.args
      else str(error)
  )
  message = ' '.join(
      part.strip() for part in message.splitlines() if part.strip()
  )
  return message or type(error).__name__


def refuse(message: str, hint: str | None = None) -> NoReturn:
  """Prints `error: <message>` (and a hint line) on stderr; exits 2."""
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr)
  if hint:
    print(hint, file=sys.stderr)
  sys.stderr.flush()
  # os._exit: no atexit hooks (absl, orbax, tf.data threads) print more.
  os._exit(EXIT_REFUSED)  # pylint: disable=protected-access


def split_overrides(
    argv: Sequence[str], flag: str
) -> tuple[list[str], list[tuple[str, str]]]:
  """Takes `--<flag>.<field>=<value>` (or `... <value>`) out of argv.

  Args:
    argv: The command line, program name first.
    flag: The config flag's name, e.g. 'config'.

  Returns:
    (the other arguments, [(field, text), ...] in command-line order). A
    field given without a value (`--config.flip`) is 'True'.
  """
  rest, overrides = [], []
  prefixes = (f'--{flag}.', f'-{flag}.')
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == '--':  # Everything after is positional.
      rest.extend(args[i:])
      break
    if arg.startswith(prefixes):
      name, eq, text = arg.split('.', 1)[1].partition('=')
      if not eq:
        if i + 1 < len(args) and not args[i + 1].startswith('-'):
          i += 1
          text = args[i]
        else:
          text = 'True'
      overrides.append((name, text))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _usage(full: bool) -> str:
  main = sys.modules['__main__']
  doc = (main.__doc__ or f'USAGE: {sys.argv[0]} [flags]').strip()
  program = getattr(main, '__spec__', None)
  program = program.name if program else os.path.basename(sys.argv[0])
  helps = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
  return f'{doc}\n\nflags of {program}:\n{helps}\n'


def _traceback_wanted() -> bool:
  return os.environ.get(TRACEBACK_VARIABLE, '') not in ('', '0')


def run(main: Callable[..., Any], *, config_flag: str | None = None) -> None:
  """Runs `main` like `absl.app.run`, with the conventions above.

  Args:
    main: `main(argv)`, or `main(argv, overrides)` when `config_flag` is
      given (overrides: `(field, text)` pairs of `--<config_flag>.<field>`).
    config_flag: Name of the program's config flag, if it takes overrides.
  """
  argv = list(sys.argv)
  if any(a in _HELP_FLAGS for a in argv[1:]):
    sys.stdout.write(_usage(full='--helpfull' in argv))
    sys.exit(0)
  overrides: list[tuple[str, str]] = []
  if config_flag:
    argv, overrides = split_overrides(argv, config_flag)

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      refuse(
          one_line(e),
          f'{os.path.basename(args[0])}: --help lists the ' 'flags.',
      )

  def guarded(args):
    try:
      return main(args, overrides) if config_flag else main(args)
    except _REFUSALS as e:
      if _traceback_wanted():
        raise
      refuse(one_line(e))
    except KeyboardInterrupt:  # Outside the training loop's own handler.
      if _traceback_wanted():
        raise
      sys.stdout.flush()
      print('Interrupted (Ctrl-C).', file=sys.stderr)
      os._exit(130)  # pylint: disable=protected-access

  app.run(guarded, argv=argv, flags_parser=parse)
