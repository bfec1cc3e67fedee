"""Errors that name the config field to change.

Shared by the modules that own a config section (`models.registry`,
`input_pipeline`, `optim`, `sharding`, the objectives, the evaluators) and by
`config_lib`, which composes them: the standard library only, so anything
may import it.
"""

from collections.abc import Mapping
import difflib
from typing import Any


def check_positive(**values: Any) -> None:
  """Raises naming the first field whose value is None or not positive.

  Args:
    **values: {config field name: value}.

  Raises:
    ValueError: `config.<name>=<value> must be positive.`
  """
  for name, value in values.items():
    if value is None or value <= 0:
      raise ValueError(f'config.{name}={value!r} must be positive.')


def nested_names(fields: Mapping[str, Any], prefix: str) -> list[str]:
  """Dotted names of the leaves of a nested mapping, `prefix` first."""
  names = []
  for key, value in fields.items():
    if isinstance(value, Mapping):
      names.extend(nested_names(value, f'{prefix}{key}.'))
    else:
      names.append(prefix + key)
  return names


def unknown_field(name: str, known: list[str], where: str) -> ValueError:
  """The error for a field that does not exist, naming the closest ones.

  Args:
    name: The dotted field name given (without `config.`).
    known: The dotted names that exist.
    where: What they are fields of, e.g. 'of ViT-B_16 (...)'.

  Returns:
    The ValueError to raise.
  """
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  if not close:  # A typo in the last part only: compare that part.
    last = name.rpartition('.')[2]
    by_last = {k.rpartition('.')[2]: k for k in known}
    close = [
        by_last[k]
        for k in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.6)
    ]
  hint = (
      f' Did you mean {", ".join("config." + c for c in close)}?'
      if (close)
      else ''
  )
  return ValueError(
      f'config.{name} is not a field {where}.{hint} '
      '(--print_config lists every field.)'
  )
