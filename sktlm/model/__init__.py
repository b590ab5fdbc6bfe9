"""The model: plain Flax linen that reads like the math (transformer, layers, attention, MLA, MoE and its
expert-parallel dispatch, context parallelism, muP) and `kernels/`, the platform implementations.
"""
