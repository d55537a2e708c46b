"""sslbench_jax.features: representations of a dataset, extracted once and cached.

* ``extract.extract``: data-parallel extraction over all devices of all
  processes, sharded and resumable through the cache;
* ``cache``: the on-disk cache (``CacheKey``, checksummed shards, manifest,
  ``cache.load`` -> ``FeatureSet``);
* ``io``: the ``FeatureSet`` file format;
* ``image_folder``: a folder of images as a source;
* ``command``: ``sslbench-jax features``.

Modules are imported explicitly (``from sslbench_jax.features import
extract``) so that reading a feature file does not import JAX.
"""
