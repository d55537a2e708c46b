"""sslbench_jax.finetune."""
