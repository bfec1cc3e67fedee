"""Sphinx configuration of the vit_jax documentation (MyST pages + autodoc).

Build (as CI does, warnings are errors, every reference must resolve):
  sphinx-build -W -n -b html docs /tmp/vit_jax_docs
"""

import os
import re
import sys

sys.path.insert(0, os.path.abspath('..'))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_define = flags.FlagValues.__setitem__


def _define_allowing_redefinition(self, name, flag):
  # The command-line modules (vit_jax.evaluate, .aot, .predict, ...) each
  # define the flags they share (--config, ...) at import; the API reference
  # imports them all into one process, where absl would refuse the second.
  flag.allow_override = True
  _define(self, name, flag)


flags.FlagValues.__setitem__ = _define_allowing_redefinition

project = 'vit_jax'
author = 'vit_jax authors'
copyright = '2026, vit_jax authors'  # pylint: disable=redefined-builtin

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
]

# .rst: the API pages autosummary generates.
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
templates_path = ['_templates']
exclude_patterns = ['_build', '_autosummary/*.md']

# MyST: `#anchor` links to headings (as on GitHub), tables, `{eval-rst}`.
myst_heading_anchors = 4
myst_enable_extensions = ['colon_fence']

# The API reference: one page per module of api.md's list (autosummary writes
# them into _autosummary/ at build time), each the module's docstrings.
autosummary_generate = True
autodoc_default_options = {
    'members': True,
    'show-inheritance': True,
    # A package's __all__ re-exports its submodules' names: each object is
    # documented once, in the module that defines it.
    'ignore-module-all': True,
}
autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_typehints_format = 'short'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Returns:` descriptions here often start with the value's shape or keys
# (`{'layers_a': ...}: ...`), not a type: keep them as text, not references.
napoleon_use_rtype = False
# `Attributes:` of the flax modules as fields: autodoc documents the dataclass
# fields themselves, and two descriptions of one name would collide.
napoleon_use_ivar = True
# flax's own docstrings (Module.setup, .param, ...) are flax's to document.
autodoc_inherit_docstrings = False

html_theme = 'furo'
html_title = 'vit_jax'

# No intersphinx (CI builds offline): references to third-party types and to
# names docstrings mention in backquotes (config fields, array names) stay
# plain text instead of failing the nitpicky build.
nitpick_ignore_regex = [
    (
        'py:.*',
        r'(jax|jaxlib|flax|optax|orbax|ml_collections|numpy|np|jnp|tf|'
        r'tensorflow|tensorflow_datasets|tfds|clu|absl|scipy|PIL|torch|'
        r'transformers|safetensors|collections|typing|concurrent|os|pathlib|'
        r'dataclasses|enum|abc|io|json|logging|functools|types|re|'
        r'contextlib)(\..*)?',
    ),
    # Private names in public signatures (e.g. the tensor rules of
    # `vit_jax.interop`, `_Rule`) have no page of their own.
    ('py:class', r'vit_jax\.(\w+\.)*_\w+'),
]

_LIST_ITEM = re.compile(r'([*+-]|\d+[.)]) ')


def _preformat_indented_blocks(app, what, name, obj, options, lines):
  """Module docstrings double as the command lines' `--help` text.

  There, a block indented under a paragraph (command lines, a parameter
  tree, a table of names) is preformatted text; reStructuredText would read
  it as a block quote or a definition list. Make each such block a literal
  block. List items' continuation lines are left alone.
  """
  del app, name, obj, options  # Unused.
  if what != 'module':
    return
  out = []
  in_block = False
  item = False  # The paragraph being read is a list item.
  for line in lines:
    indented = line.startswith(' ') and line.strip()
    if indented and not in_block and not (item and out and out[-1].strip()):
      if out and out[-1].strip():
        out.append('')
      out.extend(['::', ''])
      in_block = True
    elif not indented and line.strip():
      if in_block:
        out.append('')
        in_block = False
      item = bool(_LIST_ITEM.match(line)) or (item and bool(out[-1].strip()))
    elif not line.strip() and not in_block:
      item = False
    out.append(line)
  lines[:] = out


def setup(app):
  # Before napoleon (priority 500) reads the sections.
  app.connect(
      'autodoc-process-docstring', _preformat_indented_blocks, priority=400
  )
