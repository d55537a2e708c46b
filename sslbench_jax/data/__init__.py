"""sslbench_jax.data."""
