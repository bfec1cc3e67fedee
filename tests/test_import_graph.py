"""Imports run one way: the graph of `vit_jax/`'s own imports has no cycle.

Every `import` / `from ... import` of a vit_jax module counts, at any nesting
level (a function-level import is a dependency all the same: it runs when
the function does). Light entry points stay light: importing the models or
the objectives loads no TensorFlow.
"""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'vit_jax'


def _modules(root):
  """{dotted module name: path} of every .py file under `root/vit_jax`."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, root)[: -len('.py')].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      modules['.'.join(parts)] = path
  return modules


def _is_package(name, modules):
  return modules.get(name, '').endswith('__init__.py')


def _targets(node, importer, modules):
  """The vit_jax modules one import statement loads (before packages)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:  # Relative: from the importer's package.
    base = (
        importer
        if _is_package(importer, modules)
        else (importer.rpartition('.')[0])
    )
    for _ in range(node.level - 1):
      base = base.rpartition('.')[0]
    module = f'{base}.{node.module}' if node.module else base
  else:
    module = node.module or ''
  # `from package import name`: the submodule when `name` is one, else the
  # package itself (a name it defines or re-exports).
  return [
      f'{module}.{a.name}' if f'{module}.{a.name}' in modules else module
      for a in node.names
  ]


def import_graph(root=REPO):
  """{module: {vit_jax modules it imports}}, function-level imports included.

  Importing `vit_jax.a.b` also runs the package `vit_jax.a`'s `__init__`, so
  that is an edge too, except from inside `vit_jax.a`: a submodule importing
  a sibling runs while its package is being initialised, not the package
  again. `vit_jax` itself (a docstring and a version) is left out.

  Args:
    root: The repository root.

  Returns:
    The graph.
  """
  modules = _modules(root)
  graph = {}
  for importer, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    edges = set()
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target in _targets(node, importer, modules):
        if target.split('.')[0] != PACKAGE:
          continue
        parts = target.split('.')
        for i in range(2, len(parts) + 1):
          name = '.'.join(parts[:i])
          if name not in modules:
            continue
          inside = importer == name or importer.startswith(name + '.')
          if i < len(parts) and inside:
            continue  # The package the importer belongs to.
          edges.add(name)
    edges.discard(importer)
    graph[importer] = edges
  return graph


def find_cycle(graph):
  """One cycle as [a, b, ..., a], or None when the graph is acyclic."""
  state = {}  # Absent: unseen; 1: on the current path; 2: done.
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
  """Top-level, nested, `from package import module`, relative, and the
  package a submodule import runs."""
  pkg = tmp_path / PACKAGE
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'sub' / '__init__.py').write_text('from vit_jax.sub import leaf\n')
  (pkg / 'sub' / 'leaf.py').write_text('from . import other\n')
  (pkg / 'sub' / 'other.py').write_text('')
  (pkg / 'top.py').write_text(
      'def f():\n  if True:\n' '    from vit_jax.sub import leaf\n'
  )
  (pkg / 'low.py').write_text('import vit_jax.top\nfrom vit_jax.sub import X\n')
  graph = import_graph(str(tmp_path))
  assert graph['vit_jax.top'] == {'vit_jax.sub', 'vit_jax.sub.leaf'}
  assert graph['vit_jax.sub'] == {'vit_jax.sub.leaf'}
  assert graph['vit_jax.sub.leaf'] == {'vit_jax.sub.other'}
  assert graph['vit_jax.low'] == {'vit_jax.top', 'vit_jax.sub'}
  assert find_cycle(graph) is None
  (pkg / 'sub' / 'other.py').write_text('def g():\n  from vit_jax import low\n')
  cycle = find_cycle(import_graph(str(tmp_path)))
  assert cycle and cycle[0] == cycle[-1] and 'vit_jax.low' in cycle


def test_vit_jax_imports_have_no_cycle():
  graph = import_graph()
  assert len(graph) > 40  # The walk found the package.
  assert 'vit_jax.models' in graph['vit_jax.config_lib']  # Edges are seen.
  cycle = find_cycle(graph)
  assert cycle is None, 'vit_jax imports go in a circle: ' + ' -> '.join(cycle)


@pytest.mark.slow
@pytest.mark.parametrize('module', ['vit_jax.models', 'vit_jax.objectives'])
def test_importing_light_modules_loads_no_tensorflow(module):
  code = (
      f'import sys, {module}; '
      'loaded = sorted(m for m in sys.modules '
      "if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')); "
      'assert not loaded, loaded[:5]'
  )
  result = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=False,
      cwd=REPO,
      env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert result.returncode == 0, result.stderr[-2000:]
