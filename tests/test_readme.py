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
  install, main_job, tpu_compiler, tests = _setup_commands()
  ci = (README.parent / '.ci' / 'run').read_text()
  assert install in ci and tpu_compiler in ci and tests in ci
  assert main_job.startswith('python -m vit_jax.main --config=configs/')


def test_readme_main_job_is_the_digits_config_command():
  main_job = _setup_commands()[1]
  config = re.search(r'--config=(\S+)', main_job).group(1)
  assert (README.parent / config).exists()
  docstring = (README.parent / config).read_text().split('"""')[1]
  assert main_job.split(' --workdir')[0] in docstring


def test_checkpoints_example_runs(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top
  # A stand-in for the downloaded ViT-B_16.npz: the published shapes
  # (1000-class head, 224 px), zeros.
  model = vit_jax.models.get_model('ViT-B_16', num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32),
      train=False))['params']
  monkeypatch.chdir(tmp_path)
  checkpoint.save(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                  'ViT-B_16.npz')
  (example,) = _code_blocks(_section('Checkpoints'), 'python')
  exec(compile(example, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  tuned = checkpoint.load('finetuned.npz')
  assert tuned['head']['kernel'].shape == (768, 10)
  assert tuned['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 24 * 24 + 1, 768)


def _readme_commands():
  """Every shell command of the README's bash blocks, continuations joined."""
  text = README.read_text(encoding='utf-8')
  commands = []
  for block in _code_blocks(text, 'bash'):
    for line in block.replace('\\\n', ' ').splitlines():
      line = line.split(' #')[0].strip()
      if line and not line.startswith('#'):
        commands.append(line)
  return commands


# Modules whose flags the README passes; launch scripts pass theirs on to
# vit_jax.main.
_FLAG_SOURCES = {
    'vit_jax.main': 'vit_jax/main.py',
    'vit_jax.evaluate': 'vit_jax/evaluate.py',
    'vit_jax.analysis': 'vit_jax/analysis/__main__.py',
    'vit_jax.convert': 'vit_jax/convert.py',
    # Their model flags: convert.define_model_flags.
    'vit_jax.export': ('vit_jax/export.py', 'vit_jax/convert.py'),
    'vit_jax.predict': ('vit_jax/predict.py', 'vit_jax/convert.py'),
    'launch/tpu_run.sh': 'vit_jax/main.py',
    'launch/local.sh': 'vit_jax/main.py',
}


def _program(command):
  for program in _FLAG_SOURCES:
    if f'-m {program} ' in command or command.startswith(program + ' '):
      return program
  return None


def test_readme_commands_use_real_configs_fields_and_flags():
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  commands = [c for c in _readme_commands() if _program(c)]
  assert len(commands) >= 15
  checked_configs = 0
  for command in commands:
    program = _program(command)
    files = _FLAG_SOURCES[program]
    source = ''.join((README.parent / f).read_text() for f in (
        (files,) if isinstance(files, str) else files))
    defined = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
    for flag, value in re.findall(r'--([\w.]+)(?:=(\S+))?', command):
      if flag.startswith('config.'):
        continue
      assert flag in defined, (command, flag)
    spec = re.search(r'--config=(\S+)', command)
    if not spec or '<' in spec.group(1):
      continue  # The README's generic form `configs/<experiment>.py[:arg]`.
    config = config_lib.load_config_file(str(README.parent / spec.group(1)))
    config_lib.apply_overrides(
        config, re.findall(r'--config\.([\w.]+)=(\S+)', command))
    checked_configs += 1
  assert checked_configs >= 10


def _leaf_fields(config, prefix=''):
  import ml_collections  # pylint: disable=g-import-not-at-top
  fields = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      fields |= _leaf_fields(value, f'{prefix}{key}.')
    else:
      fields.add(prefix + key)
  return fields


def test_configuration_reference_lists_every_field():
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top
  section = _section('Train and fine-tune')
  table = section[section.index('| group | fields |'):]
  table = table[:table.index('\n\n')]
  listed = set(re.findall(r'`([\w.]+)`', table))
  assert listed == _leaf_fields(config_lib.get_base())


def test_model_table_gflops_are_the_flops_module():
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top
  rows = re.findall(r'^\| `([^`]+)` \| [\d,]+ \| ([\d.]+) \|',
                    _section('Models'), flags=re.M)
  assert sorted(name for name, _ in rows) == sorted(vit_jax.models.MODEL_NAMES)
  for name, gflops in rows:
    assert abs(flops.forward_flops(name) / 1e9 - float(gflops)) <= 0.005, name


def test_big_vision_example_runs(tmp_path, monkeypatch):
  (example,) = _code_blocks(_section('big_vision and SigLIP checkpoints'),
                            'python')
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(example, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['embeddings'].shape == (2, 768)
  posemb = namespace['params']['Transformer']['posembed_input'][
      'pos_embedding']
  assert posemb.shape == (1, 576, 768)  # 24 x 24 patches, no class token.
