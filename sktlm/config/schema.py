"""The config schema: every key sktlm reads, its default and one line of doc.

Experiments (`experiments/*.py`) start from `get_config()` and override what they change; commands run
without --config (`sktlm data`, `sktlm tokenizer`) use it as it is. A leaf module (no jax).
"""

from __future__ import annotations

import ml_collections

from sktlm.config import sizes
from sktlm.errors import UserError


def model_config(size: str) -> ml_collections.ConfigDict:
  if size not in sizes.SIZES:
    raise UserError(f"unknown size '{size}' (known: {', '.join(sizes.SIZE_NAMES)})")
  n_layers, d_model, n_heads, n_kv_heads, d_ff = sizes.SIZES[size]
  return ml_collections.ConfigDict(dict(
      size=size,
      n_layers=n_layers,
      d_model=d_model,
      n_heads=n_heads,
      n_kv_heads=n_kv_heads,
      head_dim=0,            # 0: d_model // n_heads
      d_ff=d_ff,
      vocab_size=0,          # 0: from the tokenizer, padded to a multiple of vocab_multiple
      vocab_multiple=128,
      rope_theta=10_000.0,
      norm_eps=1e-5,
      tie_embeddings=False,
      init_std=0.02,
      parametrization='sp',  # sp | mup (maximal update: init, Adam LR and output multipliers per sktlm/model/mup.py)
      base_width=0,          # mup: the d_model whose LR transfers (at d_model = base_width muP equals SP)
      z_loss=0.0,            # coefficient of log(Z)^2 in the loss (PaLM uses 1e-4)
      dtype='float32',       # compute dtype; params are always param_dtype
      param_dtype='float32',
      scan_layers=True,      # nn.scan over the block stack: compile time independent of depth
      kernels='auto',        # auto | plain | cpu | tpu | gpu: platform kernel set (model/kernels); auto: the mesh's
                             # platform, resolved in train.build and recorded in config.json
      scan_unroll=0,         # layers per scan iteration; 0 (auto): all on CPU (faster step), 1 on TPU/GPU
      remat='none',          # none | full | dots (save matmul outputs only)
      attention_dtype='',    # q, k, v and the probabilities as matmul operands ('': the compute dtype); scores,
                             # softmax and accumulation are float32 whatever it is
      attention_impl='auto',   # auto | dense | blocked | blocked_vjp | splash | flash (sktlm/model/kernels); auto: by
                               # the kernels: cpu blocked_vjp (16-bit) or blocked, tpu splash, gpu flash, else blocked
      attention_block=64,      # queries per block; keys past a block's end are never computed
      attention='gqa',         # gqa (grouped-query, n_kv_heads) | mla (multi-head latent attention, model.mla)
      mla=ml_collections.ConfigDict(dict(  # DeepSeek-V2/V3 MLA (sktlm/model/mla.py); read only when attention='mla'
          q_lora_rank=1536,      # query low-rank bottleneck; 0: a direct D -> heads projection (V2-Lite)
          kv_lora_rank=512,      # the shared key/value latent (what an MLA KV cache stores, with the rope key)
          qk_nope_head_dim=128,  # per-head query/key dims without RoPE (up-projected from the latents)
          qk_rope_head_dim=64,   # decoupled RoPE dims: per-head on queries, one key shared by all heads
          v_head_dim=128,        # per-head value dim
      )),
      moe=ml_collections.ConfigDict(dict(
          num_experts=0,         # 0: dense model
          top_k=2,
          num_shared_experts=0,
          expert_d_ff=0,         # 0: d_ff
          n_dense_layers=0,      # the first n layers keep a dense MLP
          gate='softmax',        # softmax | sigmoid
          renormalize=True,      # renormalise the top-k gate weights to sum to 1
          balance='aux_loss',    # aux_loss: Switch loss (aux_loss_coef) | aux_free: DeepSeek-V3 routing bias
          aux_loss_coef=0.01,    # load-balancing loss (Switch/GShard form); used by balance=aux_loss only
          bias_update_rate=1e-3,  # aux_free: bias += rate * sign(mean load - load) per expert after each step
          seq_aux_loss_coef=0.0,  # DeepSeek-V3 sequence-wise balance loss (V3 uses 1e-4), either balance mode
          router_z_loss_coef=0.001,
          capacity_factor=0.0,   # 0: dropless; >0: per-expert capacity, overflow tokens dropped
          dispatch='auto',       # auto | capacity | dropless | dropless_ep (sktlm/model/moe.py); auto: capacity if
                                 # capacity_factor > 0, else dropless_ep (expert-parallel under an expert axis > 1)
          ep_buffer_factor=0.0,  # dropless_ep: 0: one worst-case buffer; f > 0: f x the balanced load per
                                 # (source, destination) device pair, overflow as ep_overflow says (model/moe_ep.py)
          ep_overflow='exchange',  # exchange: a second exchange, only when some pair overflows (dropless) |
                                   # drop: overflow slots dropped (memory and traffic bounded by f)
      )),
  ))


def get_config(size: str = 'tiny') -> ml_collections.ConfigDict:
  """The full schema with defaults, for the dense model `size` of sktlm.config.sizes (unlocked)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(size)

  config.data = ml_collections.ConfigDict(dict(
      name='stdlib',        # stdlib | text_files | any TFDS catalog name (e.g. lm1b, tiny_shakespeare)
      path='',              # text_files: folder, glob, .txt or .jsonl
      text_field='text',    # jsonl / TFDS feature holding the text
      data_dir='',          # TFDS data dir; '' -> $SKTLM_DATA_DIR or ~/.cache/sktlm/tfds
      tokenizer='bytes',    # bytes | path to a SentencePiece .model
      seq_len=256,
      num_workers=0,        # grain worker processes (0: in-process)
      strict=False,         # text_files: fail the build on a skipped file/line instead of counting it
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=16,          # global, in sequences
      grad_accum=1,           # micro-batches per step (batch_size must divide)
      log_every=10,
      eval_every=200,
      eval_batches=8,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoint=True,
      init_from='',           # workdir of another run: start from its checkpoint (e.g. WSD decay branch)
      init_step=-1,           # which step of init_from (-1: latest)
      resume_step=-1,         # restore this step of the workdir's own checkpoints (-1: the newest that restores);
                              # the newer ones are moved to checkpoints.quarantine/ (never deleted), once
      spike_factor=0.0,       # loss-spike policy (0: off): a step loss above factor x the mean of the last
                              # spike_window step losses rolls back to the last checkpoint, skipping the batches
      spike_window=50,        # step losses in the running window (the check starts once it is full)
      spike_max_rollbacks=3,  # more spikes than this in one attempt stop the run as diverged
      init_from_hf='',        # Hugging Face Llama folder (config.json + safetensors): start from its weights with a
                              # fresh optimizer and data stream; its shapes must match config.model (interop/hf.py)
  ))

  config.optim = ml_collections.ConfigDict(dict(
      peak_lr=3e-3,
      schedule='cosine',      # cosine | wsd | constant
      warmup_steps=100,
      min_lr_ratio=0.1,       # final lr = peak_lr * min_lr_ratio
      decay_fraction=0.2,     # wsd: the last fraction of steps decays
      decay_shape='1-sqrt',   # wsd: linear | cosine | 1-sqrt
      decay_start=-1,         # wsd: explicit decay start step (-1: steps * (1 - decay_fraction))
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,       # decoupled (AdamW); not applied to norms and biases
      clip_norm=1.0,
  ))

  # Mesh axis sizes; -1 fills with the remaining devices. The product must equal the device count.
  # context: sequence (context) parallelism, each sequence split over its devices (sktlm/model/context.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, context=1, tensor=1))
  # Logical axis -> mesh axes. Unlisted logical axes are replicated.
  config.sharding_rules = (
      ('batch', ('data', 'fsdp', 'expert')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('vocab', 'tensor'),
      ('exp', 'expert'),
      ('q_lora', 'fsdp'),       # MLA's latent axes: weights without an embed axis (wq_b, wk_b, wv_b) shard here
      ('kv_lora', 'fsdp'),
      ('length', 'context'),
      ('act_heads', 'tensor'),
      ('act_kv_heads', 'tensor'),
      ('act_mlp', 'tensor'),
      ('act_vocab', 'tensor'),
  )

  config.distributed = ml_collections.ConfigDict(dict(
      initialize=False,       # call jax.distributed.initialize() (multi-host)
      coordinator_address='',
      num_processes=-1,
      process_id=-1,
  ))

  config.metrics = ml_collections.ConfigDict(dict(
      peak_flops=0.0,         # per-device peak FLOP/s for MFU; 0: chip table, or measured on CPU
      tensorboard=True,
      progress=True,          # progress bar on a TTY
  ))

  return config
