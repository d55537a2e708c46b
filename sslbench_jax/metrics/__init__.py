"""sslbench_jax.metrics."""
