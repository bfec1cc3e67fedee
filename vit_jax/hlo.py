"""Reads the collectives and custom calls of a compiled program's HLO text.

XLA prints the device groups of a collective in one of three forms: explicit
(`replica_groups={{0,1},{2,3}}`), iota (`replica_groups=[2,2]<=[4]` or
`[2,2]<=[2,2]T(1,0)`: the ids 0..n-1 laid out in `dims`, transposed, then
cut into the groups) and mesh (`replica_groups=mesh['axis_0'=2,'axis_1'=4]
{'axis_0'}`, optionally with `device_ids=(<iota>)`: the ids laid out on the
mesh, one group per position of the axes not named in the braces).
"""

import re

import numpy as np

OPS = (
    'all-reduce',
    'all-gather',
    'reduce-scatter',
    'all-to-all',
    'collective-permute',
)


def _iota(text):
  """'[2,4]T(1,0)' or '[8]' -> the device ids in that order."""
  m = re.fullmatch(r'\[([\d,]+)\](?:T\(([\d,]+)\))?', text)
  assert m, text  # The callers' patterns match only this form.
  dims = [int(d) for d in m.group(1).split(',')]
  ids = np.arange(int(np.prod(dims))).reshape(dims)
  if m.group(2):
    ids = ids.transpose([int(p) for p in m.group(2).split(',')])
  return ids.ravel()


def replica_groups(line):
  """The device groups of one collective's HLO line, sorted; None if none."""
  groups = None
  iota = re.search(
      r'replica_groups=\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)', line
  )
  explicit = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', line)
  mesh = re.search(
      r'replica_groups=mesh\[([^\]]*)\]'
      r'(?:, device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?)\))?'
      r' \{([^}]*)\}',
      line,
  )
  if iota:
    shape = [int(d) for d in iota.group(1).split(',')]
    groups = _iota(iota.group(2)).reshape(shape).tolist()
  elif explicit:
    groups = [
        [int(i) for i in g.split(',') if i]
        for g in re.findall(r'\{([\d,]*)\}', explicit.group(1))
    ]
  elif mesh:
    axes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    ids = (
        _iota(mesh.group(2))
        if mesh.group(2)
        else np.arange(int(np.prod(sizes)))
    ).reshape(sizes)
    within = [names.index(a) for a in re.findall(r"'(\w+)'", mesh.group(3))]
    across = [i for i in range(len(names)) if i not in within]
    size = int(np.prod([sizes[i] for i in within]))
    groups = ids.transpose(across + within).reshape(-1, size).tolist()
  return None if groups is None else sorted(sorted(g) for g in groups)


def collectives(hlo):
  """[(op, result type text, device groups)] of every collective in `hlo`."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r'= (.*?) (' + '|'.join(OPS) + r')(?:-start)?\(', line)
    if m:
      found.append((m.group(2), m.group(1), replica_groups(line)))
  return found


def result_shapes(type_text):
  """'(f32[2,3]{1,0}, f32[])' -> [(2, 3), ()]."""
  return [
      tuple(int(d) for d in dims.split(',') if d)
      for dims in re.findall(r'[a-z]+\d*\[([\d,]*)\]', type_text)
  ]


_DTYPE_BYTES = {
    'pred': 1,
    's4': 0.5,
    'u4': 0.5,
    's8': 1,
    'u8': 1,
    'f8e4m3fn': 1,
    'f8e5m2': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8,
    'c64': 8,
    'c128': 16,
}


def result_bytes(type_text):
  """Bytes of the arrays in a result type, e.g. '(f32[2,3]{1,0}, bf16[4])'."""
  total = 0.0
  for dtype, dims in re.findall(
      r'([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]', type_text
  ):
    size = int(np.prod([int(d) for d in dims.split(',') if d]))
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return int(total)


def collective_summary(hlo):
  """{op: (count, bytes)} of the collectives in `hlo`, by kind.

  An asynchronous pair (`collective-permute-start` / `-done`) counts once,
  by its start. Bytes are the size of each collective's result on one device
  (for a start, its largest buffer): a measure of the traffic, not of the
  time it takes.
  """
  summary: dict[str, tuple[int, int]] = {}
  pattern = r'= (.*?) (' + '|'.join(OPS) + r')(-start)?\('
  for line in hlo.splitlines():
    m = re.search(pattern, line)
    if not m:
      continue
    type_text, op, start = m.groups()
    if start:
      size = max(result_bytes(t) for t in type_text.strip('()').split(', '))
    else:
      size = result_bytes(type_text)
    count, total = summary.get(op, (0, 0))
    summary[op] = (count + 1, total + size)
  return summary


def custom_calls(hlo):
  """{custom_call_target: count} of the custom calls in `hlo`."""
  found: dict[str, int] = {}
  for target in re.findall(r'custom_call_target="([^"]*)"', hlo):
    found[target] = found.get(target, 0) + 1
  return found
