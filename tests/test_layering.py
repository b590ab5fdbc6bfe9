"""The package's import graph keeps its floors (docs: the architecture notes): a module imports only modules of
its own floor or below, nothing imports in a circle, and the sweep/scaling wing imports only the leaves, so
analysing runs never needs training. Imports are read from the source (ast), lazy ones inside functions too:
a lazy import is still a dependency. No sktlm module is imported here."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Floors, bottom up: a module's floor is that of the longest prefix listed (package '' = its __init__).
FLOORS = [
    # leaves: no jax, no model; what every other floor may read
    ('leaves', ('sktlm', 'sktlm.errors', 'sktlm.files', 'sktlm.runfiles', 'sktlm.run_row', 'sktlm.chips',
                'sktlm.timeline', 'sktlm.hostmem', 'sktlm.config')),
    ('sharding', ('sktlm.sharding',)),
    # data, kernels, optimizer; muP's rules are config arithmetic the optimizer reads too
    ('data, kernels, optim', ('sktlm.data', 'sktlm.model.kernels', 'sktlm.model.attention', 'sktlm.model.mup',
                              'sktlm.train.optim')),
    ('model blocks', ('sktlm.model', 'sktlm.model.layers', 'sktlm.model.context', 'sktlm.model.mla',
                      'sktlm.model.moe', 'sktlm.model.moe_ep')),
    ('model', ('sktlm.model.transformer',)),
    # interop: a format converter (HF folders <-> params), below training
    ('interop', ('sktlm.interop',)),
    ('train/build, decode', ('sktlm.train', 'sktlm.train.step', 'sktlm.train.checkpoint', 'sktlm.train.metrics',
                             'sktlm.train.compile_cache', 'sktlm.train.init_hf', 'sktlm.tools', 'sktlm.tools.decode')),
    ('plan, eval, coord-check', ('sktlm.plan', 'sktlm.tools.evaluate', 'sktlm.tools.runs',
                                 'sktlm.tools.coord_check')),
    ('loop', ('sktlm.train.loop', 'sktlm.train.start')),
    ('commands', ('sktlm.cli', 'sktlm.commands')),
]
# Beside the floors: they talk to training through the command line and the run files only.
WING = ('sktlm.sweep', 'sktlm.scaling')
WING_MAY_IMPORT = (
    'leaves',
)
# Known exceptions, each with its reason; an entry that no longer occurs fails the test (remove it).
ALLOWED = {
    ('sktlm.sweep.schedule', 'sktlm.data.tokenizers'): 'the vocab size of a planned run (numpy + sentencepiece)',
}
# None since the interop rework (hf.py and deepseek.py imported each other); an entry needs its reason.
KNOWN_CYCLES: list[set] = []


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in (ROOT / 'sktlm').rglob('*.py'):
    parts = path.relative_to(ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules) -> set[str]:
  """sktlm modules `name` imports anywhere in its source (`from pkg import mod` resolves to the module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split('.')[0] == 'sktlm'}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').split('.')[0] == 'sktlm':
      for a in node.names:
        full = f'{node.module}.{a.name}'
        out.add(full if full in modules else node.module)
  out.discard(name)
  return out


def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def _place(module: str):
  """(floor index, floor name) of a module, 'wing' for sweep/scaling, None if unplaced."""
  if any(module == w or module.startswith(w + '.') for w in WING):
    return (None, 'wing')
  best = None
  for i, (floor, prefixes) in enumerate(FLOORS):
    for p in prefixes:
      if (module == p or module.startswith(p + '.')) and (best is None or len(p) > best[0]):
        best = (len(p), i, floor)
  return None if best is None else best[1:]


def up_arrows(g) -> list[str]:
  bad = []
  for a, targets in sorted(g.items()):
    fa = _place(a)
    for b in sorted(targets):
      fb = _place(b)
      if (a, b) in ALLOWED:
        continue
      if fa[1] == 'wing':
        same_wing = any(a.startswith(w) and b.startswith(w) for w in WING)
        if not same_wing and fb[1] not in WING_MAY_IMPORT:
          bad.append(f'{a} (sweep/scaling wing) imports {b} ({fb[1]})')
      elif fb[1] == 'wing':
        if fa[1] != 'commands':
          bad.append(f'{a} ({fa[1]}) imports {b} (the sweep/scaling wing: commands only)')
      elif fb[0] > fa[0]:
        bad.append(f'{a} ({fa[1]}) imports {b} ({fb[1]}), a higher floor')
  return bad


def cycles(g) -> list[set]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = n[0]
    n[0] += 1
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in g:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(comp)

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def test_every_module_has_a_floor():
  unplaced = sorted(m for m in graph() if _place(m) is None)
  assert unplaced == [], f'give these a floor in FLOORS: {unplaced}'


def test_no_module_imports_a_higher_floor():
  g = graph()
  assert up_arrows(g) == []
  stale = [edge for edge in ALLOWED if edge[1] not in g.get(edge[0], ())]
  assert stale == [], f'these exceptions no longer occur; remove them from ALLOWED: {stale}'


def test_no_import_cycles():
  found = cycles(graph())
  assert [c for c in found if c not in KNOWN_CYCLES] == []
  assert [c for c in KNOWN_CYCLES if c not in found] == [], 'a known cycle is gone: remove it from KNOWN_CYCLES'


def test_sweep_imports_no_training():
  g = graph()
  bad = sorted((a, b) for a, t in g.items() if a.startswith(('sktlm.sweep', 'sktlm.scaling')) for b in t
               if b.startswith(('sktlm.train', 'sktlm.model', 'sktlm.interop', 'sktlm.tools')))
  assert bad == []
  assert sorted(b for b in g['sktlm.commands.doctor'] if b.startswith('sktlm.train')) == ['sktlm.train.checkpoint'], \
      'doctor reads run files through sktlm.runfiles; only --deep (Orbax) reads a checkpoint through training'


def report() -> str:
  """The graph by floor (python tests/test_layering.py)."""
  g = graph()
  lines = []
  by_floor: dict[str, list[str]] = {}
  for m in sorted(g):
    by_floor.setdefault(_place(m)[1], []).append(m)
  for floor, _ in FLOORS + [('wing', None)]:
    lines.append(f'## {floor}')
    for m in by_floor.get(floor, []):
      lines.append(f'  {m} -> {", ".join(sorted(g[m])) or "-"}')
  edges = sum(len(t) for t in g.values())
  lines.append(f'{len(g)} modules, {edges} import edges; up-arrows: {up_arrows(g) or "none"}; '
               f'cycles: {cycles(g) or "none"}; exceptions: {ALLOWED}')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(report())
