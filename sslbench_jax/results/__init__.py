"""sslbench_jax.results."""
