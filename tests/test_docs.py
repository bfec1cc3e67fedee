"""The documentation site holds together: every page is reachable, every link
between pages and to files resolves (no Sphinx needed; `.ci/run` builds the
site with warnings as errors, which also checks the API reference)."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = REPO / 'docs'

_FENCE = re.compile(r'^ *```.*?^ *```', flags=re.M | re.S)
_TOCTREE = re.compile(r'^```\{toctree\}\n(.*?)^```', flags=re.M | re.S)
# [text](target) and ![alt](target); {download}`text <target>`.
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
_DOWNLOAD = re.compile(r'\{download\}`[^`<]*<([^>]+)>`')


def _pages():
  return sorted(DOCS.glob('*.md'))


def _prose(text):
  """The text outside fenced code blocks and inline code."""
  return re.sub(r'`[^`\n]*`', '', _FENCE.sub('', text))


def _slug(title):
  # MyST's `myst_heading_anchors` (and GitHub's): myst_parser.slugs.
  return re.sub(r'[^\w\u4e00-\u9fff\- ]', '', title.lower().replace(' ', '-'))


def _anchors(path):
  text = _FENCE.sub('', path.read_text(encoding='utf-8'))
  return {_slug(title) for title in re.findall(r'^#+ (.*)$', text, flags=re.M)}


def test_every_page_is_in_a_toctree():
  listed = set()
  for page in _pages():
    for body in _TOCTREE.findall(page.read_text(encoding='utf-8')):
      for entry in body.splitlines():
        entry = entry.strip()
        if entry and not entry.startswith(':'):
          assert (DOCS / f'{entry}.md').exists(), (page.name, entry)
          listed.add(entry)
  pages = {page.stem for page in _pages()} - {'index'}
  assert pages <= listed, pages - listed
  assert len(pages) >= 10


def _links(path):
  text = _prose(path.read_text(encoding='utf-8'))
  return _LINK.findall(text) + _DOWNLOAD.findall(
      _FENCE.sub('', path.read_text(encoding='utf-8'))
  )


def test_every_link_of_readme_and_the_pages_resolves():
  checked = 0
  for path in [REPO / 'README.md'] + _pages():
    for target in _links(path):
      if re.match(r'[a-z]+:', target):  # https:, mailto:
        continue
      file, _, anchor = target.partition('#')
      resolved = (path.parent / file).resolve() if file else path
      assert resolved.exists(), (path.name, target)
      assert REPO in resolved.parents, (path.name, target)  # In the checkout.
      if anchor:
        assert resolved.suffix == '.md', (path.name, target)
        assert anchor in _anchors(resolved), (path.name, target)
      checked += 1
  assert checked >= 60


def test_readme_links_every_guide():
  readme = (REPO / 'README.md').read_text(encoding='utf-8')
  linked = {t.partition('#')[0] for t in _LINK.findall(readme)}
  for page in _pages():
    if page.stem not in ('index',):
      assert f'docs/{page.name}' in linked, page.name


def test_pages_use_the_figures_beside_them():
  # The pages' figures are docs/figures/*.png, which the README once showed
  # and benchmarks/cka_digits.py writes: every one is used by a page.
  used = set()
  for page in _pages():
    used |= {t for t in _links(page) if t.startswith('figures/')}
  figures = {f'figures/{p.name}' for p in (DOCS / 'figures').glob('*.png')}
  assert figures == used, figures ^ used


# Modules the API reference leaves out, and why.
_NOT_IN_API = {
    'vit_jax': 'the package: its modules are listed one by one',
    'vit_jax.main': 'the training command line (its flags: Training guide)',
    'vit_jax.cli': 'what the command lines share; not called by users',
    'vit_jax.analysis.__main__': "vit_jax.analysis's command line",
    'vit_jax.datasets': 'the bundled digits builder, used through tfds',
    'vit_jax.datasets.digits': 'as vit_jax.datasets',
    'vit_jax.datasets.folder_index': "the image folders' decode index",
}


def test_api_reference_lists_every_module_once():
  # docs/api.md's autosummary is the one list of the documented modules: a
  # module added, moved or renamed changes that list (or _NOT_IN_API).
  api = (DOCS / 'api.md').read_text(encoding='utf-8')
  listed = re.findall(r'^   (vit_jax[\w.]*)$', api, flags=re.M)
  assert len(listed) == len(set(listed))
  modules = set()
  for path in (REPO / 'vit_jax').rglob('*.py'):
    parts = path.relative_to(REPO).with_suffix('').parts
    modules.add('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  assert set(listed) | set(_NOT_IN_API) == modules, (
      set(listed) | set(_NOT_IN_API)
  ) ^ modules
