"""sktlm: language-model scaling experiments in JAX/Flax."""

__version__ = "0.1.0"
