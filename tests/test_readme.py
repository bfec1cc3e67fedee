"""The README's commands and code examples work as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _section(title):
  text = README.read_text(encoding='utf-8')
  start = text.index(f'## {title}')
  end = text.find('\n## ', start + 1)
  return text[start:end if end >= 0 else None]


def _code_blocks(section, language):
  return re.findall(rf'```{language}\n(.*?)```', section, flags=re.S)


def test_models_example_runs():
  (example,) = _code_blocks(_section('Use the models'), 'python')
  namespace = {}
  exec(compile(example, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['logits'].shape == (2, 10)
  assert 'attention_weights' in str(namespace['state'])


def test_ci_runs_the_readme_commands():
  (setup,) = _code_blocks(_section('Set up'), 'bash')
  commands = [line.split('#')[0].strip() for line in setup.splitlines()]
  ci = (README.parent / '.ci' / 'run').read_text()
  for command in filter(None, commands):
    assert command in ci, command
