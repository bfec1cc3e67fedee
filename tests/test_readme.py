"""The commands and code examples of README and the documentation pages work.

The guides live in docs/*.md; README keeps the install, the main job and the
tests. Every check finds its passage by heading, wherever it is.
"""

import os
import pathlib
import re
import shlex
import subprocess

import pytest

from helpers import doc_files
from vit_jax import config_lib
from vit_jax import optim

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
REPO = README.parent


def _pages():
  return {
      pathlib.Path(f): pathlib.Path(f).read_text(encoding='utf-8')
      for f in doc_files()
  }


def _headings(text):
  """(level, title, start, end) of each Markdown heading outside code."""
  fences = [
      m.span() for m in re.finditer(r'^ *```.*?^ *```', text, flags=re.M | re.S)
  ]
  for match in re.finditer(r'^(#+) (.*)$', text, flags=re.M):
    if not any(a <= match.start() < b for a, b in fences):
      yield len(match.group(1)), match.group(2), match.start(), match.end()


def _section(title):
  """The passage under the heading `title` (any level), in README or a page.

  It runs to the next heading of the same or a higher level; the title must
  head exactly one passage of them all.
  """
  found = []
  for path, text in _pages().items():
    headings = list(_headings(text))
    for i, (level, name, start, _) in enumerate(headings):
      if name == title:
        end = next((s for l, _, s, _ in headings[i + 1 :] if l <= level), None)
        found.append((path, text[start:end]))
  assert len(found) == 1, (title, [str(path) for path, _ in found])
  return found[0]


def _code_blocks(section, language):
  return re.findall(rf'```{language}\n(.*?)```', section, flags=re.S)


def _run_example(title):
  path, section = _section(title)
  (example,) = _code_blocks(section, 'python')
  namespace = {}
  exec(compile(example, str(path), 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.slow
def test_models_example_runs():
  namespace = _run_example('Use the models from your own JAX code')
  assert namespace['logits'].shape == (2, 10)
  assert 'attention_weights' in str(namespace['state'])


def _setup_commands():
  path, setup = _section('Set up')
  assert path == README
  (setup,) = _code_blocks(setup, 'bash')
  return [
      c
      for c in (line.split('#')[0].strip() for line in setup.splitlines())
      if c
  ]


def test_ci_runs_the_readme_install_and_test_commands():
  install, main_job, tpu_compiler, tests = _setup_commands()
  ci = (REPO / '.ci' / 'run').read_text()
  assert install in ci and tpu_compiler in ci and tests in ci
  assert main_job.startswith('python -m vit_jax.main --config=configs/')


def test_readme_main_job_is_the_digits_config_command():
  main_job = _setup_commands()[1]
  config = re.search(r'--config=(\S+)', main_job).group(1)
  assert (REPO / config).exists()
  docstring = (REPO / config).read_text().split('"""')[1]
  assert main_job.split(' --workdir')[0] in docstring


@pytest.mark.slow
def test_checkpoints_example_runs(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top
  # A stand-in for the downloaded ViT-B_16.npz: the published shapes
  # (1000-class head, 224 px), zeros.
  model = vit_jax.models.get_model('ViT-B_16', num_classes=1000)
  shapes = jax.eval_shape(
      lambda: model.init(
          jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32), train=False
      )
  )['params']
  monkeypatch.chdir(tmp_path)
  checkpoint.save(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), 'ViT-B_16.npz'
  )
  _run_example('Checkpoints')
  tuned = checkpoint.load('finetuned.npz')
  assert tuned['head']['kernel'].shape == (768, 10)
  assert tuned['Transformer']['posembed_input']['pos_embedding'].shape == (
      1,
      24 * 24 + 1,
      768,
  )


def _doc_commands():
  """Every shell command of the bash blocks, continuations joined.

  A command with a quoted argument over several lines (`python -c "..."`)
  is one command.
  """
  commands = []
  for path, text in _pages().items():
    for block in _code_blocks(text, 'bash'):
      pending = ''
      # Shell variables of the block (`COMMON="--config=... --config.x=1"`)
      # are substituted into the commands after them.
      variables = {}
      for line in block.replace('\\\n', ' ').splitlines():
        assignment = re.fullmatch(r'(\w+)="([^"]*)"', line.strip())
        if assignment:
          variables[assignment.group(1)] = assignment.group(2)
          continue
        for name, value in variables.items():
          line = line.replace(f'${name}', value)
        if pending:
          pending += '\n' + line
          if line.count('"') % 2:
            commands.append((path, pending))
            pending = ''
          continue
        line = line.split(' #')[0].strip()
        if not line or line.startswith('#'):
          continue
        if line.count('"') % 2:
          pending = line
        else:
          commands.append((path, line))
      assert not pending, (path, pending)
  return commands


# Programs whose flags the pages pass, and where the flags are defined
# (absl's DEFINE_*, argparse's add_argument). Launch scripts pass theirs on
# to vit_jax.main.
_FLAG_SOURCES = {
    'vit_jax.main': 'vit_jax/main.py',
    # --dynamic_image_size: loading.define_dynamic_image_size_flag.
    'vit_jax.evaluate': ('vit_jax/evaluate.py', 'vit_jax/loading.py'),
    'vit_jax.analysis': ('vit_jax/analysis/__main__.py', 'vit_jax/loading.py'),
    'vit_jax.aot': 'vit_jax/aot.py',
    'vit_jax.convert': 'vit_jax/convert.py',
    # Their model flags: loading.define_model_flags.
    'vit_jax.export': ('vit_jax/export.py', 'vit_jax/loading.py'),
    'vit_jax.predict': ('vit_jax/predict.py', 'vit_jax/loading.py'),
    'launch/tpu_run.sh': 'vit_jax/main.py',
    'launch/local.sh': 'vit_jax/main.py',
    'launch/slurm_submit.sh': 'vit_jax/main.py',
    'launch/vtab.sh': 'vit_jax/main.py',
    'vit_jax.vtab_summary': 'vit_jax/vtab_summary.py',
}

_ENVIRONMENT = re.compile(r'^(\w+=\S*\s+)+')


def _program(command):
  command = _ENVIRONMENT.sub('', command)  # `NODES=2 ... launch/...`
  for program in _FLAG_SOURCES:
    if f'-m {program} ' in command or command.startswith(program + ' '):
      return program
  match = re.match(r'python -m (benchmarks\.\w+)\b', command)
  if match:
    return match.group(1)
  return None


def _defined_flags(program):
  if program.startswith('benchmarks.'):
    files = (program.replace('.', '/') + '.py',)
  else:
    files = _FLAG_SOURCES[program]
    files = (files,) if isinstance(files, str) else files
  source = ''.join((REPO / f).read_text() for f in files)
  return set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source)) | set(
      re.findall(r"add_argument\(\s*'--(\w+)'", source)
  )


def test_doc_commands_use_real_configs_fields_and_flags():
  from vit_jax import config_lib  # pylint: disable=g-import-not-at-top

  commands = [(p, c) for p, c in _doc_commands() if _program(c)]
  assert len(commands) >= 40
  checked_configs = 0
  for path, command in commands:
    program = _program(command)
    defined = _defined_flags(program)
    for flag in re.findall(r'(?:^|\s)--([\w.]+)', command):
      if flag.startswith('config.'):
        continue
      # absl's negated booleans (--nofewshot).
      assert flag in defined or (
          flag.startswith('no') and flag[2:] in defined
      ), (path, command, flag)
    spec = re.search(r'--config=(\S+)', command)
    if not spec or '<' in spec.group(1):
      continue  # The generic form `configs/<experiment>.py[:arg]`.
    config = config_lib.load_config_file(str(REPO / spec.group(1)))
    config_lib.apply_overrides(
        config,
        [
            t[len('--config.') :].split('=', 1)
            for t in shlex.split(command)
            if t.startswith('--config.')
        ],
    )
    config_lib.parse(config)
    checked_configs += 1
  assert checked_configs >= 20


def _alone_config_flags():
  # Lines of config flags shown without their command (`--config.x=...`).
  return [(p, c) for p, c in _doc_commands() if c.startswith('--config.')]


def test_doc_config_flags_shown_alone_parse():
  lines = _alone_config_flags()
  assert len(lines) >= 5
  for path, line in lines:
    overrides = [t[len('--config.') :].split('=', 1) for t in shlex.split(line)]
    config = config_lib.get_base()
    config_lib.apply_overrides(config, overrides)
    run = config_lib.parse(config)
    optim.make_optimizer(run.optim)
    changed = config_lib.run_fields(config)
    base = config_lib.run_fields(config_lib.get_base())
    for name, _ in overrides:  # Each flag took effect.
      assert changed[name] != base[name], (path, line, name)


# The commands of the pages that no test runs or checks above, by what they
# start with, and why.
_NOT_CHECKED = {
    'pip install': 'installs from the network (the install CI runs is '
    "README's, checked against .ci/run)",
    'git clone': 'needs the network (the opt-in parity tests it prepares '
    'are checked to exist below)',
    'python -c "import jax, numpy as np, vit_jax.models;': (
        'writes a random checkpoint for the fine-tuning example; '
        'tests/test_checkpoint.py covers checkpoint.save and load_pretrained'
    ),
    'python -c "\nimport os, numpy as np, sklearn.datasets': (
        'writes digit PNGs for the predict example; tests/test_predict.py '
        'predicts on such images'
    ),
}


@pytest.mark.slow
def test_every_doc_command_is_checked_or_says_why_not():
  ci = (REPO / '.ci' / 'run').read_text()
  exported = {}
  for path, command in _doc_commands():
    if command.startswith('export '):  # The TPU scripts' settings.
      exported.update(re.findall(r'(\w+)=(\S+)', command))
      continue
    bare = _ENVIRONMENT.sub('', command)
    if _program(command):
      continue  # Flags and configs checked above.
    if any(command.startswith(prefix) for prefix in _NOT_CHECKED):
      continue
    if (path, command) in _alone_config_flags():
      continue  # test_doc_config_flags_shown_alone_parse.
    pytest_run = re.match(r'python -m pytest (.*)', bare)
    if pytest_run:  # The tests it names exist.
      for name in re.findall(r'tests/\S+', pytest_run.group(1)):
        assert (REPO / name.split('::')[0]).exists(), (path, command)
      continue
    if bare.startswith('bash tests/'):
      assert (REPO / bare.split()[1]).exists(), (path, command)
      continue
    if re.match(r'launch/tpu_\w+\.sh$', bare):
      # As written, with the settings exported before them, printing the
      # gcloud commands instead of running them (tests/test_launch.py runs
      # tpu_setup.sh and tpu_run.sh on a simulated slice).
      assert exported, (path, command)
      result = subprocess.run(
          ['bash', str(REPO / bare)],
          capture_output=True,
          text=True,
          env=dict(os.environ, **exported, DRY_RUN='1'),
          check=False,
      )
      assert result.returncode == 0, (command, result.stderr)
      assert 'gcloud compute tpus tpu-vm ' in result.stdout, command
      continue
    if bare.startswith('sphinx-build '):
      # The documentation build .ci/run runs, warnings as errors.
      assert bare.startswith('sphinx-build -W -n -b html docs '), command
      assert 'sphinx-build -W -n ' in ci and ' docs ' in ci
      continue
    raise AssertionError(
        f'{path.name}: no test checks `{command}`; check it '
        'or say why not in _NOT_CHECKED'
    )


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

  _, section = _section('Configuration reference')
  table = section[section.index('| group | fields |') :]
  table = table[: table.index('\n\n')]
  listed = set(re.findall(r'`([\w.]+)`', table))
  assert listed == _leaf_fields(config_lib.get_base())


def test_model_table_gflops_are_the_flops_module():
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  import vit_jax.models  # pylint: disable=g-import-not-at-top

  rows = re.findall(
      r'^\| `([^`]+)` \| [\d,]+ \| ([\d.]+) \|',
      _section('The registered models')[1],
      flags=re.M,
  )
  assert sorted(name for name, _ in rows) == sorted(vit_jax.models.MODEL_NAMES)
  for name, gflops in rows:
    assert abs(flops.forward_flops(name) / 1e9 - float(gflops)) <= 0.005, name


@pytest.mark.slow
def test_flexivit_example_runs():
  import numpy as np  # pylint: disable=g-import-not-at-top

  namespace = _run_example('FlexiViT: any patch size')
  assert namespace['params16']['embedding']['kernel'].shape == (16, 16, 3, 192)
  # The fixed /16 model from load_pretrained is the flexible one at 16.
  np.testing.assert_allclose(
      namespace['fixed'], namespace['at_16'], rtol=1e-4, atol=1e-5
  )
  assert float(np.abs(namespace['at_16']).max()) > 0.1  # Not all zero.


@pytest.mark.slow
def test_big_vision_example_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = _run_example('big_vision and SigLIP checkpoints')
  assert namespace['embeddings'].shape == (2, 768)
  posemb = namespace['params']['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 576, 768)  # 24 x 24 patches, no class token.


@pytest.mark.slow
def test_naflex_example_runs():
  namespace = _run_example('The NaFlex model')
  assert namespace['embedding'].shape == (1, 768)
  posemb = namespace['variables']['params']['Transformer']['posembed_input']
  assert posemb['pos_embedding'].shape == (16, 16, 768)


@pytest.mark.slow
def test_block_options_example_runs():
  namespace = _run_example('Block options')
  block = namespace['variables']['params']['Transformer']['encoderblock_0']
  assert {'LayerScale_0', 'LayerScale_1'} <= set(block)
  assert 'Dense_2' in block['MlpBlock_0']  # SwiGLU's second branch.


@pytest.mark.slow
def test_rope_example_runs(capsys):
  namespace = _run_example('Rotary position embeddings')
  assert namespace['attention']['rope']['freqs'].shape == (2, 6, 32)
  assert '(2, 6, 32)' in capsys.readouterr().out


# The Python examples of the pages that no test above runs, by the heading
# they are under, and why.
_PYTHON_NOT_RUN = {
    'Convert: transformers and timm': (
        'they read the files of the commands above it; tests/test_convert.py '
        'runs the same functions (tests/test_convert_torch.py the PyTorch '
        'side, opt-in)'
    ),
    'SigLIP 2 NaFlex checkpoints': (
        'it reads a SigLIP 2 NaFlex file; tests/test_naflex_model.py loads '
        'files of the same layout (and tests/test_parity_big_vision.py '
        "compares with big_vision's own model, opt-in)"
    ),
    'Export for serving': (
        'they read the exported files; tests/test_export.py reloads each '
        'artefact the same way. The ONNX call needs jax2onnx, which vit_jax '
        'does not install'
    ),
    'Run-time resolution': (
        'the first needs parameters and images of your own, the second the '
        'files of the export command above it; '
        'tests/test_dynamic_image_size.py makes the same calls'
    ),
}
_PYTHON_RUN = (
    'Use the models from your own JAX code',
    'Checkpoints',
    'big_vision and SigLIP checkpoints',
    'FlexiViT: any patch size',
    'The NaFlex model',
    'Parameter groups',
    'Adafactor',
    'Muon',
    'Block options',
    'Rotary position embeddings',
)


@pytest.mark.parametrize(
    'title, optimizer',
    [('Parameter groups', 'sgd'), ('Adafactor', 'adafactor'), ('Muon', 'muon')],
)
def test_fine_tuning_config_lines_parse(title, optimizer):
  # Config-file lines: they run on a base config, which then parses and
  # builds its optimizer.
  path, section = _section(title)
  (example,) = _code_blocks(section, 'python')
  namespace = {'c': config_lib.get_base()}
  exec(compile(example, str(path), 'exec'), namespace)  # pylint: disable=exec-used
  run = config_lib.parse(namespace['c'])
  assert run.optim.optimizer == optimizer
  assert run.optim != config_lib.parse(config_lib.get_base()).optim
  optim.make_optimizer(run.optim)


def test_every_python_example_runs_or_says_why_not():
  for path, text in _pages().items():
    headings = list(_headings(text))
    for block in re.finditer(r'```python\n', text):
      heading = [
          name for _, name, start, _ in headings if start < block.start()
      ][-1]
      assert heading in _PYTHON_RUN or heading in _PYTHON_NOT_RUN, (
          path.name,
          heading,
      )
  for title in _PYTHON_RUN + tuple(_PYTHON_NOT_RUN):
    assert _code_blocks(_section(title)[1], 'python'), title


def test_pages_quote_no_issue_numbers_or_sessions():
  # The pages speak to users: what is, measured when, on what, by what.
  for path, text in _pages().items():
    assert not re.search(
        r'\b(issue \d+|session|this project)', text, flags=re.I
    ), path.name
