"""sslbench_jax.features."""
