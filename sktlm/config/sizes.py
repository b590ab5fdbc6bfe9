"""The dense size ladder: one table, used by experiments, sweep planners and scaling analysis.

Each row is (n_layers, d_model, n_heads, n_kv_heads, d_ff). head_dim = d_model // n_heads.
Non-embedding parameters (see sktlm.config.accounting.param_counts) grow ~3x per rung, from ~0.1M to ~1B.
"""

# name: (n_layers, d_model, n_heads, n_kv_heads, d_ff)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    'pico':   (2,   64,  4,  4,  192),   # ~0.1M non-embedding
    'nano':   (3,   96,  4,  4,  256),   # ~0.3M
    'micro':  (4,  128,  4,  4,  384),   # ~0.8M
    'mini':   (5,  160,  5,  5,  448),   # ~1.6M
    'tiny':   (6,  192,  6,  6,  512),   # ~2.7M
    'small':  (8,  320,  5,  5,  864),   # ~10M
    'medium': (12, 512,  8,  8, 1408),   # ~39M
    'base':   (16, 768, 12, 12, 2048),   # ~113M
    'large':  (28, 1024, 16, 8, 2816),   # ~330M (GQA)
    'xl':     (24, 2048, 16, 8, 5632),   # ~1.1B (GQA)
}

SIZE_NAMES = tuple(SIZES)
