"""extract_many: several models, one decode pass, features equal to extract's.

Reference: ``extract`` run on each model alone (itself tested against a
direct ``model.apply`` in extract_test.py); the per-model cache entries are
those ``extract`` writes, and a resumed pass finishes each model from its own
point.
"""

import jax
import numpy as np
import pytest

import extract_test as et
from sslbench_jax.features import cache as cache_lib
from sslbench_jax.features import extract as extract_lib
from sslbench_jax.features import image_folder


def _specs(images, cache):
  v1 = et.tiny_variables()
  v2 = jax.tree.map(lambda a: np.asarray(a) * 1.5 + 0.01, v1)  # another model
  keys = [et.tiny_key(images), et.tiny_key(images), et.tiny_key(images, "bfloat16")]
  keys[1] = cache_lib.CacheKey(**dict(keys[1].as_dict(), weights_sha256="1" * 64))
  variables = [v1, v2, v1]
  dtypes = ["float32", "float32", "bfloat16"]
  return [extract_lib.ModelSpec(et.TinyNet(), v, "pre_logits", d,
                                k if cache else None, {"model": i})
          for i, (v, d, k) in enumerate(zip(variables, dtypes, keys))]


def _many(images, cache=None, **kw):
  return extract_lib.extract_many(
      _specs(images, cache), image_folder.ImageFolder(images), et.tiny_preset(),
      batch_size_per_device=2, num_threads=2, cache_root=cache, steps_per_shard=1,
      progress=False, **kw)


def _alone(images, spec, cache=None):
  return extract_lib.extract(
      spec.model, spec.variables, image_folder.ImageFolder(images), et.tiny_preset(),
      representation=spec.representation, dtype=spec.dtype,
      batch_size_per_device=2, num_threads=2, cache_root=cache,
      key=spec.key if cache else None, steps_per_shard=1, meta=spec.meta,
      progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("img"))
  et.write_images(d)
  return d


def test_one_pass_equals_each_model_alone(images, tmp_path):
  many = _many(images, str(tmp_path / "many"))
  specs = _specs(images, True)
  assert len(many) == 3
  for spec, r in zip(specs, many):
    alone = _alone(images, spec, str(tmp_path / "alone"))
    np.testing.assert_array_equal(r.features.features, alone.features.features)
    assert list(r.features.ids) == list(alone.features.ids)
    assert r.features.meta == alone.features.meta
    # each model's entry holds the same shards as extract's
    m1 = cache_lib.read_manifest(r.entry_dir)
    m2 = cache_lib.read_manifest(alone.entry_dir)
    assert m1["status"] == m2["status"] == "complete"
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
  et.check_features(many[0].features, images)
  # the models differ (so the test could tell them apart)
  assert not np.allclose(many[0].features.features, many[1].features.features)
  assert not np.array_equal(many[0].features.features, many[2].features.features)
  np.testing.assert_allclose(many[2].features.features, many[0].features.features,
                             atol=5e-2)
  # without a cache too
  for spec, r in zip(_specs(images, None), _many(images)):
    np.testing.assert_array_equal(r.features.features,
                                  _alone(images, spec).features.features)


class _Stop(Exception):
  pass


def test_resumed_pass_finishes_models_from_their_own_points(images, tmp_path):
  cache = str(tmp_path / "cache")
  specs = _specs(images, True)
  _alone(images, specs[2], cache)           # model 2's entry is complete already

  def stop(model, shard):
    if (model, shard) == (0, 2):            # model 0 wrote shards 0-2, model 1 0-1
      raise _Stop()

  with pytest.raises(_Stop):
    _many(images, cache, on_shard_written=stop)
  for spec, status in zip(specs, ("interrupted", "interrupted", "complete")):
    m = cache_lib.read_manifest(cache_lib.entry_dir(cache, spec.key))
    assert m["status"] == status
  again = _many(images, cache)
  num_shards = again[0].stats.num_shards
  assert num_shards == 6    # 11 images, 2 per step, 1 step per shard
  assert (again[0].stats.shards_reused, again[0].stats.shards_written) == (3, 3)
  assert (again[1].stats.shards_reused, again[1].stats.shards_written) == (2, 4)
  assert again[2].stats.from_complete_entry
  for spec, r in zip(specs, again):
    np.testing.assert_array_equal(r.features.features,
                                  _alone(images, spec).features.features)
    assert cache_lib.read_manifest(r.entry_dir)["status"] == "complete"


def test_bad_arguments(images):
  with pytest.raises(ValueError, match="at least one model"):
    extract_lib.extract_many([], image_folder.ImageFolder(images), et.tiny_preset())
  spec = extract_lib.ModelSpec(et.TinyNet(), et.tiny_variables(), dtype="float16")
  with pytest.raises(ValueError, match="Unknown dtype 'float16'"):
    extract_lib.extract_many([spec], image_folder.ImageFolder(images), et.tiny_preset())
