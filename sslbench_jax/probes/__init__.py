"""sslbench_jax.probes."""
