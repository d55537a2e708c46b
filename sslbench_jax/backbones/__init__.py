"""sslbench_jax.backbones."""
