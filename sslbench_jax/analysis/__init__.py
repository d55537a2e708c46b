"""sslbench_jax.analysis."""
