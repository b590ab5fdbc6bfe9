"""The ~500B sparse MoE flagship (A.X K1 / DeepSeek-V3 shape) and reduced variants of it for tests.

  sktlm plan --config=experiments/flagship.py --topology=v5p:8x16x16
  sktlm plan --config=experiments/flagship.py:layers=2,experts=8 --topology=v5p:2x2x1
  python experiments/flagship.py            # prints the parameter and FLOP counts

Published target (A.X K1): ~519B total / ~33B active parameters; 61 layers, the first dense; d_model 7168;
64 attention heads; 192 routed experts + 1 shared, 8 routed active per token, expert hidden 2048;
vocabulary 163,840; context 131,072. Choices here (counts: `python experiments/flagship.py`):
- Attention is grouped-query (64 query heads of 128, 8 KV heads), the attention this codebase has.
  DeepSeek-V3 / A.X K1 use multi-head latent attention (MLA: queries through a 1536 low-rank bottleneck,
  keys/values through a shared 512-dim latent plus a 64-dim decoupled RoPE key, 128+64 query/key head dim).
  Gap: GQA here has ~132M attention weights per layer against MLA's ~101M (+~2B total, +~2B active), a
  KV cache of 2 x 8 x 128 = 2048 values per token per layer against MLA's 576, and no low-rank compression.
  Training FLOPs per token differ by the same few percent; inference memory differs a lot.
- Dense first layer: SwiGLU d_ff 18432 (DeepSeek-V3's dense width).
- Routing: sigmoid gates with top-k renormalisation (DeepSeek-V3); their auxiliary-loss-free bias balancing
  is not implemented, so a small Switch load-balancing loss (1e-4, DeepSeek-V3's sequence-wise coefficient)
  stands in. Capacity factor 1.25 (token dropping) so that experts shard over the `expert` mesh axis with
  all-to-all token exchange; DeepSeek-V3 trains dropless (capacity_factor=0 here, not expert-parallel).
- Training shape: sequence 4096 (DeepSeek-V3 pretrains at 4K and extends context afterwards), 2048
  sequences per step (8.4M tokens), bf16 compute, float32 parameters and AdamW moments, full remat.
- Mesh for a v5p:8x16x16 slice (2048 chips): fsdp=32 x expert=64 (3 experts per device).

Arguments: layers=61, experts=192, top_k=8, seq_len=4096, batch=2048, fsdp=32, expert=64, remat=full,
capacity=1.25. Reduced variants keep every width (d_model, heads, expert d_ff, vocab).
"""

import ml_collections

from sktlm import base_config, configs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = configs.parse_arg(arg, layers=61, experts=192, top_k=8, seq_len=4096, batch=2048, fsdp=32, expert=64,
                          remat='full', capacity=1.25)
  config = base_config.get_config()
  m = config.model
  m.size = 'flagship'
  m.n_layers = arg.layers
  m.d_model = 7168
  m.n_heads = 64
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 18432               # the dense first layer
  m.vocab_size = 163840
  m.rope_theta = 10_000.0
  m.tie_embeddings = False
  m.dtype = 'bfloat16'
  m.attention_dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.attention_block = 512      # 8 query blocks at T=4096: 56% of the dense score work, 1/8 of its memory
  m.remat = arg.remat
  m.moe.num_experts = arg.experts
  m.moe.top_k = min(arg.top_k, arg.experts)
  m.moe.num_shared_experts = 1
  m.moe.expert_d_ff = 2048
  m.moe.n_dense_layers = 1
  m.moe.gate = 'sigmoid'
  m.moe.renormalize = True
  m.moe.aux_loss_coef = 1e-4
  m.moe.router_z_loss_coef = 1e-3
  m.moe.capacity_factor = arg.capacity

  config.data.seq_len = arg.seq_len
  config.train.batch_size = arg.batch
  config.optim.peak_lr = 2.2e-4        # DeepSeek-V3's peak learning rate
  config.optim.schedule = 'wsd'
  config.optim.weight_decay = 0.1
  config.mesh.data = -1
  config.mesh.fsdp = arg.fsdp
  config.mesh.expert = arg.expert
  config.lock()
  return config


if __name__ == '__main__':
  import sys

  from sktlm import flops

  cfg = get_config(sys.argv[1] if len(sys.argv) > 1 else None)
  counts = flops.param_counts(cfg.model)
  for k, v in counts.items():
    print(f'{k:>22}: {v:>16,d}  ({flops.human(v)})')
  for k, v in flops.flops_per_token(cfg.model, cfg.data.seq_len).items():
    print(f'{"FLOPs/token " + k:>22}: {flops.human(v)}')
