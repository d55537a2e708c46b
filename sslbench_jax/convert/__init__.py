"""sslbench_jax.convert."""
