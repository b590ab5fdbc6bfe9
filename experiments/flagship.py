"""The ~500B sparse MoE flagship (A.X K1 / DeepSeek-V3 shape) and reduced variants of it for tests.

  sktlm plan --config=experiments/flagship.py --topology=v5p:8x16x16
  sktlm plan --config=experiments/flagship.py:layers=2,experts=8 --topology=v5p:2x2x1
  python experiments/flagship.py            # prints the parameter and FLOP counts

Published target (A.X K1): ~519B total / ~33B active parameters; 61 layers, the first dense; d_model 7168;
64 attention heads; 192 routed experts + 1 shared, 8 routed active per token, expert hidden 2048;
vocabulary 163,840; context 131,072. Choices here (counts: `python experiments/flagship.py`):
- Attention is DeepSeek-V3's multi-head latent attention (sktlm/model/mla.py, model.mla): 64 heads, queries through a
  1536 low-rank bottleneck, keys/values from a shared 512-dim latent plus one 64-dim decoupled RoPE key,
  128 + 64 query/key dims per head, 128 value dims; ~101M attention weights per layer, a 576-value KV cache
  per token per layer. Counts: 519.0B total / 32.8B active against the published ~519B / ~33B.
- Dense first layer: SwiGLU d_ff 18432 (DeepSeek-V3's dense width).
- Routing as DeepSeek-V3: sigmoid gates with top-k renormalisation, then x 2.5 (routed_scaling_factor),
  group-limited routing (8 groups of 24 experts, one per 8 expert shards; a token's 8 experts come from its 4
  best groups, `groups=1` turns it off), auxiliary-loss-free balancing (a per-expert bias for group and top-k
  selection only, updated by 1e-3 x sign of the load error after each step; sktlm/model/moe.py) plus
  the small sequence-wise balance loss (1e-4), latent RMSNorm epsilon 1e-6 (V3's), and dropless expert-parallel
  dispatch (sktlm/model/moe_ep.py: tokens
  exchanged by all-to-all over the `expert` mesh axis in buffers of twice the balanced load per device pair;
  a layer where some pair overflows runs a second exchange for the rest, so no token is ever dropped).
  `ep_buffer=0` uses one worst-case buffer instead; `capacity=1.25` the older token-dropping capacity dispatch.
- Training shape: sequence 4096 (DeepSeek-V3 pretrains at 4K and extends context afterwards), 2048
  sequences per step (8.4M tokens), bf16 compute, float32 parameters and AdamW moments, full remat.
- Mesh for a v5p:8x16x16 slice (2048 chips): fsdp=32 x expert=64 (3 experts per device). Parameters shard
  their `embed` (and MLA latent) axis over fsdp x context, so a context-parallel mesh still shards them over
  every device.
- Long context (131K): the `context` mesh axis splits each sequence (sktlm/model/context.py), e.g.
  `flagship.py:seq_len=131072,batch=64,fsdp=1,context=32,block=128,yarn=32` on the same slice: 64 sequences over
  the 64 expert shards, each over 32 devices (4096 tokens per device, as at 4K); `yarn=F` extends RoPE by YaRN
  with factor F over the 4K pretraining context (DeepSeek-V3's form and its beta/mscale values; V3 uses 40).
- Not modelled: multi-token prediction (V3's MTP module), FP8 training, and DeepSeek's interleaved rope layout
  (equivalent up to a fixed permutation, applied on export: sktlm/interop/deepseek.py).

Arguments: layers=61, experts=192, top_k=8, seq_len=4096, batch=2048, fsdp=32, expert=64, context=1,
remat=full, capacity=0 (dropless EP; >0: capacity dispatch), ep_buffer=2 (dropless EP's first buffer, x the
balanced load; 0: one worst-case buffer), block=512 (attention query block), groups=8 and topk_groups=4
(group-limited routing; groups=1: off), yarn=0 (YaRN factor; 0: plain RoPE). Reduced
variants keep every width (d_model, heads, MLA ranks, expert d_ff, vocab).
"""

import ml_collections

from sktlm.config import load, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = load.parse_arg(arg, layers=61, experts=192, top_k=8, seq_len=4096, batch=2048, fsdp=32, expert=64,
                          context=1, remat='full', capacity=0.0, ep_buffer=2.0, block=512, groups=8, topk_groups=4,
                          yarn=0.0)
  config = schema.get_config()
  m = config.model
  m.size = 'flagship'
  m.n_layers = arg.layers
  m.d_model = 7168
  m.n_heads = 64
  m.n_kv_heads = 8             # GQA only (attention=gqa): MLA's heads all read the shared latent
  m.head_dim = 128             # GQA only
  m.attention = 'mla'          # DeepSeek-V3's multi-head latent attention (model.mla: its defaults are V3's)
  m.d_ff = 18432               # the dense first layer
  m.vocab_size = 163840
  m.rope_theta = 10_000.0
  if arg.yarn > 0:  # DeepSeek-V3's YaRN (beta 32/1, mscale 1/1) over the 4K pretraining context
    m.rope_scaling.update(type='yarn', factor=float(arg.yarn), original_max_position=4096)
  m.mla.latent_norm_eps = 1e-6  # V3's, for the q and kv latent norms
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.attention_dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.attention_block = arg.block  # 512: 8 query blocks at T=4096, 56% of the dense score work, 1/8 of its memory
  m.remat = arg.remat
  m.moe.num_experts = arg.experts
  m.moe.top_k = min(arg.top_k, arg.experts)
  m.moe.num_shared_experts = 1
  m.moe.expert_d_ff = 2048
  m.moe.n_dense_layers = 1
  m.moe.gate = 'sigmoid'
  m.moe.renormalize = True
  m.moe.routed_scaling_factor = 2.5
  per_group = arg.experts // arg.groups
  fits = (arg.experts % arg.groups == 0 and per_group >= 2
          and min(arg.topk_groups, arg.groups) * per_group >= m.moe.top_k)
  m.moe.n_group = arg.groups if fits else 1  # reduced variants: off where the groups cannot be formed
  m.moe.topk_group = min(arg.topk_groups, m.moe.n_group)
  m.moe.balance = 'aux_free'
  m.moe.bias_update_rate = 1e-3
  m.moe.seq_aux_loss_coef = 1e-4
  m.moe.router_z_loss_coef = 1e-3
  m.moe.capacity_factor = arg.capacity
  m.moe.dispatch = 'dropless_ep' if arg.capacity <= 0 else 'capacity'
  m.moe.ep_buffer_factor = arg.ep_buffer  # first exchange: 2x the balanced load; overflow: a second exchange
  m.moe.ep_overflow = 'exchange'

  config.data.seq_len = arg.seq_len
  config.train.batch_size = arg.batch
  config.optim.peak_lr = 2.2e-4        # DeepSeek-V3's peak learning rate
  config.optim.schedule = 'wsd'
  config.optim.weight_decay = 0.1
  config.mesh.data = -1
  config.mesh.fsdp = arg.fsdp
  config.mesh.expert = arg.expert
  config.mesh.context = arg.context
  fsdp_axes = ('embed', 'q_lora', 'kv_lora')  # parameters shard over fsdp x context: every device holds 1/(f c)
  config.sharding_rules = tuple((name, ('fsdp', 'context') if name in fsdp_axes else axes)
                                for name, axes in config.sharding_rules)
  config.lock()
  return config


if __name__ == '__main__':
  import sys

  from sktlm.config import accounting

  cfg = get_config(sys.argv[1] if len(sys.argv) > 1 else None)
  counts = accounting.param_counts(cfg.model)
  for k, v in counts.items():
    print(f'{k:>22}: {v:>16,d}  ({accounting.human(v)})')
  for k, v in accounting.flops_per_token(cfg.model, cfg.data.seq_len).items():
    print(f'{"FLOPs/token " + k:>22}: {accounting.human(v)}')
