"""Configs: the schema and defaults, loading and overrides, checks, the size tables, and the model's
parameter/FLOP accounting. A leaf: imports nothing else of sktlm but errors.
"""
