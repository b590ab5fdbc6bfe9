"""The config schema is the one source: defaults (unchanged from before the schema), validation, the restart
rule, the generated docs, and every key the code reads."""

import ast
import json
import os

import pytest

from sktlm.config import docs, load, schema, sizes
from sktlm.config.validate import validate
from sktlm.errors import UserError
from sktlm.train import start
from tests.conftest import ROOT

# get_config(size) of every size as main had it before the schema (`git show da55d3a:sktlm/config/schema.py`),
# dumped with load.to_dict: the schema must reproduce each of its keys value for value and type for type.
DEFAULTS_JSON = os.path.join(ROOT, 'tests', 'data', 'config_defaults.json')


def _typed(flat: dict) -> dict:
  return {k: (type(v).__name__, v) for k, v in flat.items()}


@pytest.mark.parametrize('size', sizes.SIZE_NAMES)
def test_defaults_are_those_of_before_the_schema(size):
  with open(DEFAULTS_JSON) as f:
    want = load.flatten(json.load(f)[size])
  got = _typed(load.flatten(json.loads(json.dumps(load.to_dict(schema.get_config(size))))))
  # Keys added since (e.g. moe.routed_scaling_factor) may be new; none of the old ones may change or go.
  assert {k: got.get(k) for k in want} == _typed(want)
  validate(schema.get_config(size))  # the defaults pass their own schema


def test_every_key_has_a_doc_a_rule_and_a_section():
  for k in schema.KEYS:
    assert k.doc.strip(), k.key
    assert k.key.rpartition('.')[0] in schema.SECTIONS, k.key
    if isinstance(k.allowed, str):  # a range the validator can read, satisfied by the default
      default = 1 if isinstance(k.default, schema.FromSizeTable) else k.default
      from sktlm.config.validate import in_range
      assert in_range(k.allowed, default), k.key
    if isinstance(k.allowed, tuple):
      assert k.default in k.allowed, k.key


def test_generated_docs_are_checked_in():
  """docs/config.md and the restart rules of docs/run_files.md are what `python -m sktlm.config.docs` writes."""
  with open(docs.CONFIG_MD) as f:
    assert f.read() == docs.config_md(), 'docs/config.md is stale: run python -m sktlm.config.docs'
  with open(docs.RUN_FILES_MD) as f:
    text = f.read()
  assert text == docs.run_files_md(text), 'docs/run_files.md is stale: run python -m sktlm.config.docs'
  for k in schema.KEYS:  # every key, its default and its doc are in the reference
    assert f'| `{k.key}` |' in docs.config_md() and k.doc.replace('|', '\\|') in docs.config_md()


def _changed(k: schema.Key, v):
  if isinstance(k.allowed, tuple):
    return next(a for a in k.allowed if a != v)
  if isinstance(v, bool):
    return not v
  if isinstance(v, (int, float)):
    return v + 2
  if isinstance(v, str):
    return v + 'x'
  return v[:-1]


def _documented_refused() -> set[str]:
  with open(docs.RUN_FILES_MD) as f:
    text = f.read()
  block = text[text.index(docs.BEGIN):text.index(docs.END)]
  listed = block.split('message names them):', 1)[1].split('.\n', 1)[0]
  return {part.strip(' `\n') for part in listed.replace('\n', ' ').split(',')}


def test_restart_rules_in_the_docs_are_what_the_loop_refuses(tmp_path):
  """For every key: a restart with the key changed is refused by the loop's check exactly when
  docs/run_files.md lists the key as refused."""
  documented = _documented_refused()
  assert documented <= set(schema.BY_KEY) and len(documented) > 10
  config = schema.get_config('pico')
  old = load.to_dict(config)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  refused = set()
  for k in schema.KEYS:
    new = schema.get_config('pico')
    parent, leaf = (new, k.key) if '.' not in k.key else (new[k.key.rpartition('.')[0]], k.key.rpartition('.')[2])
    parent[leaf] = _changed(k, parent[leaf])
    try:
      harmless = start._check_workdir_config(str(tmp_path), new)  # noqa: SLF001 - the check the loop runs
      assert harmless and harmless[0].startswith(k.key), (k.key, harmless)
    except UserError as e:
      assert k.key in str(e)
      refused.add(k.key)
  assert refused == documented


def test_bad_values_are_one_line_user_errors():
  cases = {'model.remat': 'everything', 'model.kernels': 'fpga', 'model.attention_impl': 'flash2',
           'model.dtype': 'float8', 'model.moe.gate': 'relu', 'model.moe.balance': 'none',
           'optim.schedule': 'step', 'train.steps': 0, 'optim.b2': 1.0, 'model.norm_eps': 0.0,
           'optim.min_lr_ratio': 1.5, 'data.seq_len': 1, 'model.d_model': 'wide', 'train.batch_size': 2.5}
  for key, bad in cases.items():
    config = schema.get_config('pico')
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = bad
    with pytest.raises(UserError, match=key.replace('.', r'\.')) as e:
      validate(config)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('key,value,match', [
    ('model.n_kv_heads', 3, 'multiple of model.n_kv_heads'),
    ('model.head_dim', 7, 'even'),
    ('model.parametrization', 'mup', 'base_width'),
    ('model.moe.top_k', 9, 'top_k=9 must be <= model.moe.num_experts=8'),
    ('model.moe.dispatch', 'capacity', 'capacity_factor'),
    ('train.spike_factor', 0.5, 'spike_factor'),
    ('train.grad_accum', 3, 'multiple of train.grad_accum'),
])
def test_cross_key_rules(key, value, match):
  config = schema.get_config('pico')
  config.model.moe.num_experts = 8
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError, match=match):
    validate(config)


def test_mesh_rules():
  class Mesh:
    shape = {'data': 4, 'fsdp': 1, 'expert': 2, 'context': 1, 'tensor': 1}
  config = schema.get_config('pico')
  config.train.batch_size = 12  # 12 rows over data x fsdp x expert = 8 shards
  with pytest.raises(UserError, match='does not divide the 8 batch shards'):
    validate(config, Mesh())
  config.train.batch_size = 16
  validate(config, Mesh())
  config.model.moe.num_experts = 3
  config.model.moe.top_k = 1
  with pytest.raises(UserError, match='renormalize with model.moe.top_k=1 makes every gate weight 1'):
    validate(config, Mesh())
  config.model.moe.renormalize = False
  with pytest.raises(UserError, match='num_experts=3 does not divide over the 2 expert shards'):
    validate(config, Mesh())


# The rules that the optimizer, the model, the data pipeline and interop checked while running, now written
# once in validate: each bad value is one line from validate, before anything is built (mesh: its axis sizes).
MOVED_RULES = [
    ({'optim.schedule': 'step'}, None, "optim.schedule must be one of 'cosine', 'wsd', 'constant', got 'step'"),
    ({'optim.schedule': 'wsd', 'optim.decay_shape': 'exp'}, None,
     "optim.decay_shape must be one of 'linear', 'cosine', '1-sqrt', got 'exp'"),
    ({'model.rope_scaling.type': 'ntk'}, None, "model.rope_scaling.type must be one of 'none', 'yarn', got 'ntk'"),
    ({'model.rope_scaling.type': 'yarn', 'model.rope_scaling.factor': 0.5}, None,
     'model.rope_scaling.factor must be >= 1, got 0.5'),
    ({'model.rope_scaling.type': 'yarn', 'model.rope_scaling.original_max_position': 0}, None,
     'model.rope_scaling.original_max_position must be >= 1, got 0'),
    ({'data.seq_len': 1}, None, 'data.seq_len must be >= 2, got 1'),
    ({'data.seq_len': 18}, {'data': 2, 'context': 4},
     r'data.seq_len=18 does not divide the context mesh axis \(4 devices\)'),
    ({'sharding_rules': (('batch', 'data'), ('length', None))}, {'data': 2, 'context': 4},
     r"mesh.context=4 needs the sharding rule \('length', 'context'\), got \('length', None\)"),
    ({'data.name': 'text_files', 'data.path': ''}, None,
     "data.name='text_files' needs --config.data.path=FOLDER\\|GLOB\\|FILE.txt\\|FILE.jsonl"),
    ({'train.init_from': '/runs/a', 'train.init_from_hf': '/hf/b'}, None,
     'set train.init_from or train.init_from_hf, not both'),
]


@pytest.mark.parametrize('over, axes, message', MOVED_RULES)
def test_rules_once_in_validate(over, axes, message):
  class Mesh:
    shape = {'data': 1, 'fsdp': 1, 'expert': 1, 'context': 1, 'tensor': 1, **(axes or {})}
  config = schema.get_config('pico')
  for key, value in over.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(UserError, match=f'^{message}$'):
    validate(config, Mesh() if axes else None)
  if axes:
    validate(config)  # a mesh rule: only the mesh makes the value wrong


def test_unknown_key_is_refused():
  config = schema.get_config('pico')
  config.train.stepz = 10
  with pytest.raises(UserError, match="unknown config key 'train.stepz'"):
    validate(config)


# --- every key the code reads is in the schema ------------------------------------------------------------

SECTIONS = set(schema.SECTIONS)
CONFIG_METHODS = {'get', 'items', 'keys', 'values', 'unlocked', 'lock', 'unlock', 'to_dict', 'to_json',
                  'to_json_best_effort', 'copy_and_resolve_references', 'update', 'ignore_type', 'as_configdict',
                  'is_locked', 'update_from_flattened_dict'}
# What a name means by convention, where it is a function parameter (sktlm/model/: `config` and `self.config` are
# the model's config). Aliases assigned from a config path (`moe = config.model.moe`) are followed.
PARAMS = {'mc': 'model', 'model_cfg': 'model', 'moe': 'model.moe', 'data_cfg': 'data', 'optim_cfg': 'optim',
          'mesh_cfg': 'mesh'}
MODULES_WITH_CONFIG = {'jax', 'flax', 'tfds'}  # `jax.config` is jax's, not a run's


class Reads:
  """Config paths read in one module: `config.train.steps`, `mc.get('remat')`, `m['dtype']`, `p.config.train`,
  via aliases and via functions of the module that return a config section (`ys = rope_scaling(mc)`).

  Names are followed in source order, block by block: an alias holds from its assignment until the name is
  rebound to something else, and a name that is an alias in one branch of an if, a loop or a try stays one
  after it (a conditional alias). The conventional names (`config`, PARAMS) keep their meaning when rebound
  from any expression (`config = spec.load_run_config(...)`): the code names nothing else so. An attribute
  that is called is a method, not a key.
  """

  def __init__(self, tree, in_model: bool):
    self.root = 'model' if in_model else ''
    self.conventions = {**PARAMS, 'config': self.root}  # names that keep their meaning when rebound
    self.found: list[tuple[int, str]] = []
    self.returns: dict[str, set] = {}  # module function -> the config sections it returns
    self.calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for final in (False, True):  # the first pass learns what each function returns
      self.found, self._record = [], final
      for fn in fns:
        if not getattr(fn, '_nested', False):
          self.function(fn, {})

  def function(self, fn, outer: dict):
    env = {**outer, 'config': {self.root}}
    for a in fn.args.args + fn.args.kwonlyargs:
      if a.arg in PARAMS:
        env[a.arg] = {PARAMS[a.arg]}
    self._fn = fn.name
    self.block(fn.body, env)

  def block(self, stmts, env: dict) -> dict:
    for st in stmts:
      env = self.statement(st, env)
    return env

  def statement(self, st, env: dict) -> dict:
    if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):  # a closure sees the enclosing aliases
      st._nested = True
      fn = self._fn
      self.function(st, env)
      self._fn = fn
      return env
    if isinstance(st, ast.If):
      self.reads(st.test, env)
      return merge(self.block(st.body, dict(env)), self.block(st.orelse, dict(env)))
    if isinstance(st, (ast.For, ast.AsyncFor, ast.While)):
      self.reads(st.iter if isinstance(st, (ast.For, ast.AsyncFor)) else st.test, env)
      inner = dict(env)
      if isinstance(st, (ast.For, ast.AsyncFor)):
        self.bind(st.target, None, inner)
      inner = self.block(st.body, inner)
      return merge(env, inner, self.block(st.orelse, dict(env)))
    if isinstance(st, ast.Try):
      branches = [self.block(st.body, dict(env))]
      branches += [self.block(h.body, dict(env)) for h in st.handlers]
      branches.append(self.block(st.orelse, dict(branches[0])))
      return self.block(st.finalbody, merge(*branches))
    if isinstance(st, (ast.With, ast.AsyncWith)):
      for item in st.items:
        self.reads(item.context_expr, env)
      return self.block(st.body, env)
    if isinstance(st, ast.Return) and st.value is not None:
      self.returns.setdefault(self._fn, set()).update(self.paths(st.value, env) & SECTIONS)
    if isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      if st.value is not None:
        self.reads(st.value, env)
      for target in (st.targets if isinstance(st, ast.Assign) else [st.target]):
        self.bind(target, st.value if not isinstance(st, ast.AugAssign) else None, env)
        self.reads(target, env)  # `config.train.steps = 5` writes a key: it must exist too
      return env
    self.reads(st, env)
    return env

  def bind(self, target, value, env: dict) -> None:
    """The name(s) of an assignment now mean the value's config sections, or no config."""
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
      for t, v in zip(target.elts, value.elts, strict=False):
        self.bind(t, v, env)
    elif isinstance(target, (ast.Tuple, ast.List)):
      for t in target.elts:
        self.bind(t, None, env)
    elif isinstance(target, ast.Name):
      sections = self.paths(value, env) & SECTIONS if value is not None else set()
      if sections:
        env[target.id] = sections
      elif target.id in self.conventions:  # `config = spec.load_run_config(...)`, `mc = as_dict(mc)`
        env[target.id] = {self.conventions[target.id]}
      else:  # the name holds something else from here on
        env.pop(target.id, None)

  def reads(self, node, env: dict) -> None:
    if not self._record:
      return
    for n in ast.walk(node):
      if id(n) in self.calls:  # a method (`config.to_dict()`, `self.config.partition(':')`)
        continue
      for path in self.paths(n, env):
        self.found.append((n.lineno, path))

  def paths(self, node, env: dict) -> set:
    """The config paths an expression may read."""
    if isinstance(node, ast.Name):
      return set(env.get(node.id, ()))
    if isinstance(node, ast.IfExp):  # `mc.rope_scaling if ... else None`: either
      return self.paths(node.body, env) | self.paths(node.orelse, env)
    if isinstance(node, ast.BoolOp):
      return set().union(*(self.paths(v, env) for v in node.values))
    if isinstance(node, ast.Attribute):
      if node.attr == 'config':  # p.config, self.p.config, run.config, setup.config: a whole config
        if isinstance(node.value, ast.Name) and node.value.id in MODULES_WITH_CONFIG:
          return set()
        return {self.root}
      if node.attr in CONFIG_METHODS:
        return set()
      return {f'{b}.{node.attr}'.lstrip('.') for b in self.paths(node.value, env) if b in SECTIONS}
    if isinstance(node, ast.Call):
      if isinstance(node.func, ast.Attribute) and node.func.attr == 'get' and node.args and isinstance(
          node.args[0], ast.Constant):
        return {f'{b}.{node.args[0].value}'.lstrip('.') for b in self.paths(node.func.value, env) if b in SECTIONS}
      if isinstance(node.func, ast.Name):  # a function of this module that returns a config section
        return set(self.returns.get(node.func.id, ()))
      return set()
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
      return {f'{b}.{node.slice.value}'.lstrip('.') for b in self.paths(node.value, env) if b in SECTIONS}
    return set()


def merge(*envs: dict) -> dict:
  """After branches: a name means every config section it means in some branch."""
  out: dict = {}
  for e in envs:
    for k, v in e.items():
      out[k] = out.get(k, set()) | v
  return out


def code_reads() -> dict[str, list[str]]:
  """{config path: ['file:line', ...]} of every read in sktlm/."""
  out: dict[str, list[str]] = {}
  pkg = os.path.join(ROOT, 'sktlm')
  for folder, _, names in os.walk(pkg):
    for name in names:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, ROOT)
      with open(path) as f:
        tree = ast.parse(f.read())
      reads = Reads(tree, in_model=rel.startswith(os.path.join('sktlm', 'model')))
      for line, key in reads.found:
        out.setdefault(key, []).append(f'{rel}:{line}')
  return out


def test_every_key_the_code_reads_is_in_the_schema_with_a_doc():
  reads = code_reads()
  unknown = {k: v for k, v in reads.items() if k not in schema.BY_KEY and k not in SECTIONS}
  assert not unknown, f'read but not in sktlm/config/schema.py: {unknown}'
  # the scan sees the reads it must: a sample from each part of the tree
  for key in ('train.steps', 'model.remat', 'model.moe.top_k', 'model.mla.kv_lora_rank', 'data.seq_len',
              'optim.peak_lr', 'optim.b1', 'metrics.peak_flops', 'model.attention_impl', 'seed'):
    assert key in reads, key
  # and the reads the blind spots hid: through `p.config` (train/start.py), a rebound `config` (tools/runs.py),
  # a conditional alias and a function returning a section (model/layers.py: `ys = rope_scaling(mc)`)
  assert 'sktlm/train/start.py' in ' '.join(reads['train.resume_step'])
  assert 'sktlm/tools/runs.py' in ' '.join(reads['train.batch_size'])
  assert {'model.rope_scaling.type', 'model.rope_scaling.factor', 'model.rope_scaling.beta_fast'} <= set(reads)
  assert all(schema.BY_KEY[k].doc for k in reads if k in schema.BY_KEY)


def test_sweep_dry_run_validates_each_run():
  from sktlm.sweep import spec
  with pytest.raises(UserError, match='model.remat'):
    spec.load_run_config(os.path.join(ROOT, 'experiments', 'lm.py'),
                         {'arg.size': 'pico', 'config.model.remat': 'everything'})


def test_cli_refuses_a_bad_value_in_one_line_and_writes_nothing(tmp_path):
  import subprocess
  import sys
  workdir = tmp_path / 'run'
  r = subprocess.run([sys.executable, '-m', 'sktlm.cli', 'train', f'--config={ROOT}/experiments/lm.py:size=pico',
                      '--config.model.remat=everything', f'--workdir={workdir}'],
                     capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT})
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip() == ("sktlm train: error: model.remat must be one of 'none', 'full', 'dots', "
                              "'dots_no_batch', got 'everything'")
  assert not workdir.exists()
