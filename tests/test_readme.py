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


def _setup_commands():
  (setup,) = _code_blocks(_section('Set up'), 'bash')
  return [c for c in (line.split('#')[0].strip() for line in
                      setup.splitlines()) if c]


def test_ci_runs_the_readme_install_and_test_commands():
  install, main_job, tests = _setup_commands()
  ci = (README.parent / '.ci' / 'run').read_text()
  assert install in ci and tests in ci
  assert main_job.startswith('python -m vit_jax.main --config=configs/')


def test_readme_main_job_is_the_digits_config_command():
  main_job = _setup_commands()[1]
  config = re.search(r'--config=(\S+)', main_job).group(1)
  assert (README.parent / config).exists()
  docstring = (README.parent / config).read_text().split('"""')[1]
  assert main_job.split(' --workdir')[0] in docstring
