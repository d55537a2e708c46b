"""sslbench_jax: a JAX/Flax evaluator for self-supervised image backbones."""

__version__ = "0.1.0"
