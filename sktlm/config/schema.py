"""The config schema: every key sktlm reads, one line each: default, allowed values, restart rule, doc.

`get_config(size)` builds the defaults from `KEYS`; `sktlm.config.validate` checks a config against it;
`sktlm.config.load.diff_configs` takes the restart rule from it; docs/config.md and the restart rules in
docs/run_files.md are generated from it (`python -m sktlm.config.docs`, checked by tests/test_config_schema.py).
Adding a key = one line here + the code that reads it (then regenerate the docs).

A line is K(key, default, allowed, restart, doc[, export]):
- default: its type is the key's type (an int default takes ints only, a float one ints or floats); SIZE (an
  int) and SIZE_NAME: from the size table (sktlm.config.sizes) of get_config(size).
- allowed: None (any value of the type), a tuple of values, or a range: '>=0', '>0', '<1', '[0, 1]', '[0, 1)'.
- restart: BREAKS if changing it makes a run's checkpoint or data position meaningless (a restart with a new
  value is refused), OK if a run may continue with a new value.
- export (model keys, optional): how `sktlm export` and train.init_from_hf (sktlm/interop) treat the key, per
  Hugging Face format (`Export`); left out, the key is a feature no format computes: export refused unless it is
  at its default, so a new key never breaks exporting the models that leave it alone.
Experiments (`experiments/*.py`) start from `get_config()` and override what they change. A leaf (no jax).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sktlm.config import sizes
from sktlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class FromSizeTable:
  type: type


SIZE, SIZE_NAME = FromSizeTable(int), FromSizeTable(str)  # defaults from the size table of get_config(size)
BREAKS, OK = True, False
FLOATS = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class Export:
  """A model key's export rule for each Hugging Face format (sktlm/interop), one of
  - 'mapped': the format's converter reads the key and refuses, in one line, a value it cannot represent;
  - 'neutral': the key changes neither the function nor the parameter layout (dtypes, kernels, training-only
    losses), so every value exports;
  - 'default': a feature the format does not compute; export is refused unless the key is at its default."""
  llama: str        # LlamaForCausalLM (dense grouped-query models)
  deepseek_v3: str  # DeepseekV3ForCausalLM (MLA, MLA + MoE)

  def rule(self, fmt: str) -> str:
    return getattr(self, fmt)


EXPORT_RULES = ('mapped', 'neutral', 'default')
MAPPED, NEUTRAL, DEFAULT_ONLY = Export('mapped', 'mapped'), Export('neutral', 'neutral'), Export('default', 'default')
LLAMA_MAPPED = Export(llama='mapped', deepseek_v3='neutral')  # read by the grouped-query (Llama) model only
V3_MAPPED = Export(llama='neutral', deepseek_v3='mapped')     # read by MLA / MoE (DeepSeek-V3) models only


@dataclasses.dataclass(frozen=True)
class Key:
  key: str
  default: Any
  allowed: tuple | str | None
  breaks: bool
  doc: str
  export: Export = DEFAULT_ONLY  # model keys only (sktlm/interop)

  @property
  def type(self) -> type:
    return self.default.type if isinstance(self.default, FromSizeTable) else type(self.default)


K = Key

# Section docs (docs/config.md), in order.
SECTIONS = {
    '': 'top level',
    'model': 'the model (sktlm/model); config.model is what the model code receives',
    'model.rope_scaling': "RoPE context extension (DeepSeek-V3's YaRN, sktlm/model/layers.py); type='yarn' only",
    'model.mla': "DeepSeek-V2/V3 multi-head latent attention (sktlm/model/mla.py); read only when attention='mla'",
    'model.moe': 'mixture of experts (sktlm/model/moe.py, moe_ep.py); read only when num_experts > 0',
    'data': 'the training text and its tokenizer (sktlm/data)',
    'train': 'the loop (sktlm/train/loop.py): steps, batch, evaluation, checkpoints, spike policy, init',
    'optim': 'AdamW and the learning-rate schedule (sktlm/train/optim.py)',
    'mesh': 'mesh axis sizes; -1 fills with the remaining devices; the product must equal the device count',
    'distributed': 'multi-host start-up (jax.distributed)',
    'metrics': 'logging (sktlm/train/metrics.py)',
}

KEYS = (
    K('seed',                     0,            None,         BREAKS, 'PRNG seed of the init and of the data order'),
    K('sharding_rules', (
        ('batch', ('data', 'fsdp', 'expert')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
        ('kv_heads', 'tensor'), ('vocab', 'tensor'), ('exp', 'expert'),
        ('q_lora', 'fsdp'), ('kv_lora', 'fsdp'),  # MLA's latent axes: wq_b, wk_b, wv_b (no embed axis) shard here
        ('length', 'context'), ('act_heads', 'tensor'), ('act_kv_heads', 'tensor'), ('act_mlp', 'tensor'),
        ('act_vocab', 'tensor')),                None,         OK,     'logical axis -> mesh axes (sktlm/sharding.py); '
                                                                       'unlisted logical axes are replicated'),
    # model
    K('model.size',               SIZE_NAME,    None,         OK,     'the size-table row the shapes came from',
                                                                      NEUTRAL),
    K('model.n_layers',           SIZE,         '>=1',        BREAKS, 'transformer blocks', MAPPED),
    K('model.d_model',            SIZE,         '>=1',        BREAKS, 'residual stream width', MAPPED),
    K('model.n_heads',            SIZE,         '>=1',        BREAKS, 'query heads', MAPPED),
    K('model.n_kv_heads',         SIZE,         '>=1',        BREAKS, 'key/value heads (GQA); must divide '
                                                                      'n_heads', LLAMA_MAPPED),
    K('model.head_dim',           0,            '>=0',        BREAKS, '0: d_model // n_heads; must be even '
                                                                      '(RoPE)', LLAMA_MAPPED),
    K('model.d_ff',               SIZE,         '>=1',        BREAKS, 'SwiGLU hidden width of the dense MLP', MAPPED),
    K('model.vocab_size',         0,            '>=0',        BREAKS, '0: from the tokenizer, padded to a multiple '
                                                                      'of vocab_multiple', MAPPED),
    K('model.vocab_multiple',     128,          '>=1',        BREAKS, 'vocab_size 0 pads the tokenizer vocabulary '
                                                                      'to a multiple of this', NEUTRAL),
    K('model.rope_theta',         10_000.0,     '>0',         BREAKS, 'RoPE base frequency', MAPPED),
    K('model.rope_scaling.type',  'none',       ('none', 'yarn'), BREAKS, 'RoPE context extension: none | yarn '
                                                                      "(DeepSeek-V3's YaRN, model/layers.py)", MAPPED),
    K('model.rope_scaling.factor', 1.0,         '>=1',        BREAKS, 'yarn: context multiplier, new / original '
                                                                      'context (>= 1; DeepSeek-V3: 40)', MAPPED),
    K('model.rope_scaling.original_max_position', 4096, '>=1', BREAKS, 'yarn: the pretraining context the ramp is '
                                                                      'measured against', MAPPED),
    K('model.rope_scaling.beta_fast', 32.0,     '>0',         BREAKS, 'yarn: dims rotating more often than this in '
                                                                      'it keep their frequency', MAPPED),
    K('model.rope_scaling.beta_slow', 1.0,      '>0',         BREAKS, 'yarn: dims rotating less often are '
                                                                      'interpolated by 1/factor', MAPPED),
    K('model.rope_scaling.mscale', 1.0,         '>=0',        BREAKS, 'yarn: cos/sin x mscale(factor, mscale) / '
                                                                      'mscale(factor, mscale_all_dim)', MAPPED),
    K('model.rope_scaling.mscale_all_dim', 1.0, '>=0',        BREAKS, 'yarn: softmax scale x mscale(factor, '
                                                                      'mscale_all_dim)^2 (0: not scaled)', MAPPED),
    K('model.norm_eps',           1e-5,         '>0',         BREAKS, 'RMSNorm epsilon', MAPPED),
    K('model.tie_embeddings',     False,        None,         BREAKS, 'output head = the transposed token '
                                                                      'table', MAPPED),
    K('model.init_std',           0.02,         '>=0',        BREAKS, 'normal init std (muP scales it per '
                                                                      'class)', NEUTRAL),
    K('model.parametrization',    'sp',         ('sp', 'mup', 'completep', 'depth_mup'), BREAKS, 'sp | mup (width) '
                                                                      '| completep (width and depth, alpha 1) | '
                                                                      'depth_mup (alpha 0.5): sktlm/model/mup.py',
                                                                      MAPPED),
    K('model.base_width',         0,            '>=0',        BREAKS, 'mup/completep/depth_mup: the d_model whose LR '
                                                                      'transfers (> 0; at d_model = base_width '
                                                                      'and n_layers = base_depth it is SP)',
                                                                      LLAMA_MAPPED),
    K('model.base_depth',         0,            '>=0',        BREAKS, 'completep/depth_mup: the n_layers whose LR '
                                                                      'transfers (> 0); ignored under sp/mup',
                                                                      NEUTRAL),
    K('model.base_head_dim',      0,            '>=0',        BREAKS, 'muP attention 1/d_head: the head dim at '
                                                                      'base width (0: head_dim x base_width / '
                                                                      'd_model, i.e. heads fixed, head dim grows)',
                                                                      LLAMA_MAPPED),
    K('model.allow_depth_change', False,        None,         OK,     'a sweep may change n_layers under mup (the '
                                                                      'validator refuses it otherwise: muP transfers '
                                                                      'across width only)', NEUTRAL),
    K('model.z_loss',             0.0,          '>=0',        BREAKS, 'coefficient of log(Z)^2 in the loss (PaLM '
                                                                      'uses 1e-4)', NEUTRAL),
    K('model.dtype',              'float32',    FLOATS,       OK,     'compute dtype; params are always '
                                                                      'param_dtype', NEUTRAL),
    K('model.param_dtype',        'float32',    FLOATS,       BREAKS, 'dtype of the parameters and optimizer '
                                                                      'state', NEUTRAL),
    K('model.scan_layers',        True,         None,         BREAKS, 'nn.scan over the block stack: compile time '
                                                                      'independent of depth', NEUTRAL),
    K('model.kernels',            'auto',       ('auto', 'plain', 'cpu', 'tpu', 'gpu'),
                                                              OK,     'platform kernel set (sktlm/model/kernels); '
                                                                      "auto: the mesh's platform, resolved by "
                                                                      'train/resolve.py, recorded in config.json',
                                                                      NEUTRAL),
    K('model.scan_unroll',        0,            '>=0',        OK,     'layers per scan iteration; 0 (auto): all on '
                                                                      'CPU (faster step), 1 on TPU/GPU', NEUTRAL),
    K('model.remat',              'none',       ('none', 'full', 'dots', 'dots_no_batch'),
                                                              OK,     'recompute in the backward pass: none | full '
                                                                      '| dots (save matmul outputs) | '
                                                                      'dots_no_batch', NEUTRAL),
    K('model.attention_dtype',    '',           ('',) + FLOATS, OK,   "q, k, v and the probabilities as matmul "
                                                                      "operands ('': the compute dtype); scores, "
                                                                      'softmax and accumulation are float32', NEUTRAL),
    K('model.attention_impl',     'auto',       ('auto', 'dense', 'blocked', 'blocked_vjp', 'splash', 'flash'),
                                                              OK,     'attention kernel (sktlm/model/kernels); auto: '
                                                                      'cpu blocked_vjp (16-bit) or blocked, tpu '
                                                                      'splash, gpu flash, else blocked', NEUTRAL),
    K('model.attention_block',    64,           '>=0',        OK,     'queries per block (0: one block); keys past a '
                                                                      "block's end are never computed", NEUTRAL),
    K('model.attention',          'gqa',        ('gqa', 'mla'), BREAKS, 'gqa (grouped-query, n_kv_heads) | mla '
                                                                      '(multi-head latent attention, '
                                                                      'model.mla)', MAPPED),
    K('model.mla.q_lora_rank',    1536,         '>=0',        BREAKS, 'query low-rank bottleneck; 0: a direct D -> '
                                                                      'heads projection (V2-Lite)', V3_MAPPED),
    K('model.mla.kv_lora_rank',   512,          '>0',         BREAKS, 'the shared key/value latent (what an MLA KV '
                                                                      'cache stores, with the rope key)', V3_MAPPED),
    K('model.mla.qk_nope_head_dim', 128,        '>0',         BREAKS, 'per-head query/key dims without RoPE '
                                                                      '(up-projected from the latents)', V3_MAPPED),
    K('model.mla.qk_rope_head_dim', 64,         '>0',         BREAKS, 'decoupled RoPE dims (even): per-head on '
                                                                      'queries, one key shared by all heads',
                                                                      V3_MAPPED),
    K('model.mla.v_head_dim',     128,          '>0',         BREAKS, 'per-head value dim', V3_MAPPED),
    K('model.mla.latent_norm_eps', 0.0,         '>=0',        BREAKS, 'epsilon of the q/kv latent RMSNorms; 0: '
                                                                      'model.norm_eps (DeepSeek-V3: 1e-6)', V3_MAPPED),
    K('model.moe.num_experts',    0,            '>=0',        BREAKS, 'routed experts; 0: dense model', MAPPED),
    K('model.moe.top_k',          2,            '>=1',        BREAKS, 'experts per token (<= num_experts)', V3_MAPPED),
    K('model.moe.num_shared_experts', 0,        '>=0',        BREAKS, 'experts every token passes through', V3_MAPPED),
    K('model.moe.expert_d_ff',    0,            '>=0',        BREAKS, "an expert's SwiGLU width; 0: d_ff", V3_MAPPED),
    K('model.moe.n_dense_layers', 0,            '>=0',        BREAKS, 'the first n layers keep a dense MLP', V3_MAPPED),
    K('model.moe.gate',           'softmax',    ('softmax', 'sigmoid'), BREAKS, 'router scores', V3_MAPPED),
    K('model.moe.renormalize',    True,         None,         BREAKS, 'renormalise the top-k gate weights to sum '
                                                                      'to 1', V3_MAPPED),
    K('model.moe.routed_scaling_factor', 1.0,   '>0',         BREAKS, "routed experts' gate weights x this, after "
                                                                      'renormalising (DeepSeek-V3: 2.5)', V3_MAPPED),
    K('model.moe.n_group',        1,            '>=1',        BREAKS, 'group-limited routing: experts in n_group '
                                                                      'equal groups of contiguous ids; 1: off '
                                                                      '(V3: 8)', V3_MAPPED),
    K('model.moe.topk_group',     1,            '>=1',        BREAKS, "a token's experts come from its topk_group "
                                                                      'best groups (sum of 2 best scores; V3: '
                                                                      '4)', V3_MAPPED),
    K('model.moe.balance',        'aux_loss',   ('aux_loss', 'aux_free'), BREAKS, 'aux_loss: Switch loss '
                                                                      '(aux_loss_coef) | aux_free: DeepSeek-V3 '
                                                                      'routing bias', V3_MAPPED),
    K('model.moe.aux_loss_coef',  0.01,         '>=0',        BREAKS, 'load-balancing loss (Switch/GShard form); '
                                                                      'balance=aux_loss only', NEUTRAL),
    K('model.moe.bias_update_rate', 1e-3,       '>=0',        BREAKS, 'aux_free: bias += rate * sign(mean load - '
                                                                      'load) per expert after each step', NEUTRAL),
    K('model.moe.seq_aux_loss_coef', 0.0,       '>=0',        BREAKS, 'DeepSeek-V3 sequence-wise balance loss (V3 '
                                                                      'uses 1e-4), either balance mode', NEUTRAL),
    K('model.moe.router_z_loss_coef', 0.001,    '>=0',        BREAKS, "coefficient of the router logits' "
                                                                      'log(Z)^2', NEUTRAL),
    K('model.moe.capacity_factor', 0.0,         '>=0',        BREAKS, '0: dropless; > 0: per-expert capacity, '
                                                                      'overflow tokens dropped', NEUTRAL),
    K('model.moe.dispatch',       'auto',       ('auto', 'capacity', 'dropless', 'dropless_ep'),
                                                              BREAKS, 'auto: capacity if capacity_factor > 0, else '
                                                                      'dropless_ep (expert-parallel under an expert '
                                                                      'axis > 1); capacity needs capacity_factor '
                                                                      '> 0', NEUTRAL),
    K('model.moe.ep_buffer_factor', 0.0,        '>=0',        BREAKS, 'dropless_ep: 0: one worst-case buffer; f > 0: '
                                                                      'f x the balanced load per device pair, '
                                                                      'overflow as ep_overflow says', NEUTRAL),
    K('model.moe.ep_overflow',    'exchange',   ('exchange', 'drop'), BREAKS, 'exchange: a second exchange, only '
                                                                      'when some pair overflows (dropless) | drop: '
                                                                      'overflow slots dropped', NEUTRAL),
    # data
    K('data.name',                'stdlib',     None,         BREAKS, 'stdlib | text_files | any TFDS catalog name '
                                                                      '(e.g. lm1b, tiny_shakespeare)'),
    K('data.path',                '',           None,         BREAKS, 'text_files: folder, glob, .txt or .jsonl'),
    K('data.text_field',          'text',       None,         BREAKS, 'jsonl / TFDS feature holding the text'),
    K('data.data_dir',            '',           None,         OK,     "TFDS data dir; '' -> $SKTLM_DATA_DIR or "
                                                                      '~/.cache/sktlm/tfds'),
    K('data.tokenizer',           'bytes',      None,         BREAKS, 'bytes | path to a SentencePiece .model'),
    K('data.seq_len',             256,          '>=2',        BREAKS, 'tokens per training sequence'),
    K('data.num_workers',         0,            '>=0',        OK,     'grain worker processes (0: in-process)'),
    K('data.strict',              False,        None,         OK,     'text_files: fail the build on a skipped '
                                                                      'file/line instead of counting it'),
    # train
    K('train.steps',              1000,         '>=1',        OK,     'optimizer steps of the whole run'),
    K('train.batch_size',         16,           '>=1',        BREAKS, 'global, in sequences; a multiple of '
                                                                      'grad_accum x the batch shards of the mesh'),
    K('train.grad_accum',         1,            '>=1',        OK,     'micro-batches per step (must divide '
                                                                      'batch_size)'),
    K('train.log_every',          10,           '>=1',        OK,     'steps per train record in metrics.jsonl'),
    K('train.eval_every',         200,          '>=1',        OK,     'steps between held-out evaluations'),
    K('train.eval_batches',       8,            '>=0',        OK,     'held-out batches per evaluation (0: none)'),
    K('train.checkpoint_every',   500,          '>=1',        OK,     'steps between checkpoints'),
    K('train.keep_checkpoints',   3,            '>=0',        OK,     'checkpoints kept on disk'),
    K('train.async_checkpoint',   True,         None,         OK,     'write checkpoints in the background'),
    K('train.init_from',          '',           None,         OK,     'workdir of another run: start from its '
                                                                      'checkpoint (e.g. WSD decay branch)'),
    K('train.init_step',          -1,           None,         OK,     'which step of init_from (-1: latest)'),
    K('train.resume_step',        -1,           '>=-1',       OK,     'restore this step of the run\'s own checkpoints '
                                                                      '(-1: the newest that restores); newer ones are '
                                                                      'moved to checkpoints.quarantine/, once'),
    K('train.spike_factor',       0.0,          '>=0',        OK,     'loss-spike policy (0: off, else > 1): a step '
                                                                      'loss above factor x the window mean rolls '
                                                                      'back to the last checkpoint'),
    K('train.spike_window',       50,           '>=1',        OK,     'step losses in the running window (the check '
                                                                      'starts once it is full)'),
    K('train.spike_max_rollbacks', 3,           '>=0',        OK,     'more spikes than this in one attempt stop the '
                                                                      'run as diverged'),
    K('train.compile_cache',      '',           None,         OK,     'JAX persistent compilation cache folder, '
                                                                      "shared by all runs ('' -> $SKTLM_COMPILE_CACHE"
                                                                      " or ~/.cache/sktlm/jax; 'off': none)"),
    K('train.init_from_hf',       '',           None,         OK,     'Hugging Face Llama or DeepSeek-V3 folder: '
                                                                      'start from its weights with a fresh optimizer '
                                                                      '(interop/hf.py)'),
    # optim
    K('optim.peak_lr',            3e-3,         '>=0',        OK,     'peak learning rate (muP: of the base width)'),
    K('optim.schedule',           'cosine',     ('cosine', 'wsd', 'constant'), OK, 'learning-rate schedule after '
                                                                      'the linear warmup'),
    K('optim.warmup_steps',       100,          '>=0',        OK,     'linear warmup steps'),
    K('optim.min_lr_ratio',       0.1,          '[0, 1]',     OK,     'final lr = peak_lr * min_lr_ratio'),
    K('optim.decay_fraction',     0.2,          '[0, 1]',     OK,     'wsd: the last fraction of steps decays'),
    K('optim.decay_shape',        '1-sqrt',     ('linear', 'cosine', '1-sqrt'), OK, 'wsd: shape of the decay'),
    K('optim.decay_start',        -1,           None,         OK,     'wsd: explicit decay start step (-1: steps * '
                                                                      '(1 - decay_fraction))'),
    K('optim.b1',                 0.9,          '[0, 1)',     OK,     'Adam first-moment decay'),
    K('optim.b2',                 0.95,         '[0, 1)',     OK,     'Adam second-moment decay'),
    K('optim.eps',                1e-8,         '>=0',        OK,     'Adam epsilon'),
    K('optim.weight_decay',       0.1,          '>=0',        OK,     'decoupled (AdamW); not applied to norms and '
                                                                      'biases'),
    K('optim.clip_norm',          1.0,          '>=0',        OK,     'global gradient-norm clipping (0: off)'),
    # mesh
    K('mesh.data',                -1,           None,         OK,     'data-parallel axis'),
    K('mesh.fsdp',                1,            None,         OK,     'parameter/optimizer sharding axis (ZeRO-3)'),
    K('mesh.expert',              1,            None,         OK,     'expert-parallel axis (MoE)'),
    K('mesh.context',             1,            None,         OK,     'context parallelism: each sequence split '
                                                                      'over its devices (sktlm/model/context.py)'),
    K('mesh.tensor',              1,            None,         OK,     'tensor-parallel axis (heads, mlp, vocab)'),
    # distributed
    K('distributed.initialize',   False,        None,         OK,     'call jax.distributed.initialize() '
                                                                      '(multi-host)'),
    K('distributed.coordinator_address', '',    None,         OK,     "host:port of process 0 ('': from the "
                                                                      'environment)'),
    K('distributed.num_processes', -1,          None,         OK,     'processes in the job (-1: from the '
                                                                      'environment)'),
    K('distributed.process_id',   -1,           None,         OK,     "this process's index (-1: from the "
                                                                      'environment)'),
    # metrics
    K('metrics.peak_flops',       0.0,          '>=0',        OK,     'per-device peak FLOP/s for MFU; 0: chip '
                                                                      'table, or measured on CPU'),
    K('metrics.tensorboard',      True,         None,         OK,     'also write TensorBoard events under W/tb'),
    K('metrics.progress',         True,         None,         OK,     'progress bar on a TTY'),
)

BY_KEY = {k.key: k for k in KEYS}
assert len(BY_KEY) == len(KEYS), 'a key is listed twice'


def choices(key: str) -> tuple:
  """The allowed values of an enum key (for the code that dispatches on them)."""
  return BY_KEY[key].allowed


def breaks_on_restart(key: str) -> bool:
  """Whether changing `key` between two starts of a run is refused; a key not in the schema (a run written by
  another version) is refused under model.* and allowed elsewhere."""
  entry = BY_KEY.get(key)
  return entry.breaks if entry else key.startswith('model.')


def get_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  """Every key with its default, for the dense model `size` of sktlm.config.sizes (unlocked)."""
  if size not in sizes.SIZES:
    raise UserError(f"unknown size '{size}' (known: {', '.join(sizes.SIZE_NAMES)})")
  from_table = dict(zip(('n_layers', 'd_model', 'n_heads', 'n_kv_heads', 'd_ff'), sizes.SIZES[size], strict=True))
  from_table['size'] = size
  tree: dict = {}
  for k in KEYS:
    *parents, leaf = k.key.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = from_table[leaf] if isinstance(k.default, FromSizeTable) else k.default
  return ml_collections.ConfigDict(tree)


def model_config(size: str) -> ml_collections.ConfigDict:
  return get_config(size).model
