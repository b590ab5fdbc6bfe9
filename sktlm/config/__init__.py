"""Configs: the schema and defaults, validation, loading and overrides, generated docs, the size tables, and the model's
parameter/FLOP accounting. A leaf: imports nothing else of sktlm but errors.
"""
