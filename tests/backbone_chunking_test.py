"""Eval forward passes in batch chunks (`backbones/_chunking.py`).

Reference: the PyTorch ResNet of tests/torch_resnet.py on the whole batch,
and the same Flax module with chunking off. Tiny inputs (32 px, resnet18).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sslbench_jax.backbones import _chunking
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import resnet
from sslbench_jax.convert import _family
from sslbench_jax.convert import resnet_keys
import torch_resnet


def _setup(num_classes=None, seed=2):
  tmodel = torch_resnet.randomize(
      torch_resnet.resnet("resnet18", num_classes=num_classes), seed=seed)
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  variables = resnet_keys.to_flax(_family.SourceState(state), "resnet18",
                                  {"num_classes": num_classes})
  return tmodel, variables


def _has_loop(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return "while[" in text or "scan[" in text


def test_chunked_resnet_equals_whole_batch_and_torch():
  tmodel, variables = _setup(num_classes=7)
  # 19 rows in chunks of 4: 5 chunks, the last padded with 1 zero row.
  x = np.random.RandomState(0).randn(19, 32, 32, 3).astype(np.float32)
  chunked = registry.create_model("resnet18", num_classes=7, eval_chunk=4)
  whole = registry.create_model("resnet18", num_classes=7, eval_chunk=0)
  got = jax.jit(lambda v, x: chunked.apply(v, x, train=False))(variables, x)
  want = jax.jit(lambda v, x: whole.apply(v, x, train=False))(variables, x)
  assert _has_loop(lambda v, x: chunked.apply(v, x), variables, x)
  assert not _has_loop(lambda v, x: whole.apply(v, x), variables, x)
  assert set(got) == set(want) == {"pre_logits", "layer3_avg", "logits"}
  for key in want:
    assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype
    # rows are independent in eval mode: the same numbers (1e-6: any backend)
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
  with torch.no_grad():
    ref = tmodel.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert np.std(ref) > 0.05
  np.testing.assert_allclose(got["pre_logits"], ref, atol=1e-4, rtol=0)


def _tiny(stages=(1, 1, 1, 1), **kw):
  # one block per stage: the structure of resnet18 at a fraction of the work
  return resnet.ResNet(stage_sizes=stages, block="basic", **kw)


def test_bfloat16_chunked_within_bf16_rounding_of_whole_batch():
  x = np.random.RandomState(1).randn(8, 32, 32, 3).astype(np.float32)
  # two stages: XLA:CPU compiles bf16 convolutions slowly
  variables = jax.jit(_tiny((1, 1)).init)(jax.random.PRNGKey(0), x)
  out = {c: jax.jit(_tiny((1, 1), dtype=jnp.bfloat16, eval_chunk=c).apply)(variables, x)
         for c in (0, 2)}
  # XLA may round a bf16 result differently per batch shape (not bit-identical,
  # unlike float32): within the bf16 feature bound of precision_test (1e-2).
  a, b = (np.asarray(out[c]["pre_logits"], np.float64) for c in (2, 0))
  assert np.abs(a - b).max() / np.abs(b).max() < 1e-2


def test_training_runs_the_whole_batch():
  x = np.random.RandomState(2).randn(8, 32, 32, 3).astype(np.float32)
  model = _tiny(eval_chunk=2)
  # init (shapes only, no variables yet) is never chunked
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert set(variables) == {"params", "batch_stats"}
  train = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))
  assert not _has_loop(train(model), variables, x)
  (out, stats), (ref, ref_stats) = train(model)(variables, x), train(_tiny(eval_chunk=0))(
      variables, x)
  # batch statistics over all 8 rows, not per chunk
  np.testing.assert_array_equal(out["pre_logits"], ref["pre_logits"])
  jax.tree.map(np.testing.assert_array_equal, stats, ref_stats)


def test_chunk_size_rules(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  rn50_224 = 56 * 56 * 256 * 4   # ResNet-50 float32 first-stage output per image
  assert _chunking.chunk_size(None, 128, rn50_224) == 8   # 8 x 3.2 MB <= 32 MB
  assert _chunking.chunk_size(None, 128, rn50_224 // 2) == 16   # bfloat16
  assert _chunking.chunk_size(None, 15, rn50_224) == 0   # fewer than two chunks
  assert _chunking.chunk_size(None, 16, rn50_224) == 8
  assert _chunking.chunk_size(None, 256, 8 * 8 * 64 * 4) == 0   # 32 px: whole batch
  assert _chunking.chunk_size(None, 4, 10 ** 9) == 1   # huge images: one at a time
  assert _chunking.chunk_size(0, 128, rn50_224) == 0
  assert _chunking.chunk_size(32, 128, rn50_224) == 32
  with pytest.raises(ValueError, match="eval_chunk"):
    _chunking.chunk_size(-1, 128, rn50_224)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert _chunking.chunk_size(None, 128, rn50_224) == 0   # sharded batch: whole
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _chunking.chunk_size(None, 128, rn50_224) == 0   # accelerators: whole batch
  assert _chunking.chunk_size(16, 128, rn50_224) == 16


def test_resnet50_at_224_is_chunked_by_8_small_inputs_are_not():
  model = registry.create_model("resnet50")
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  apply = lambda v, x: model.apply(v, x)
  big = jax.ShapeDtypeStruct((16, 224, 224, 3), jnp.float32)
  # lax.map = a scan over 2 chunks of 8 images
  assert "length=2" in str(jax.make_jaxpr(apply)(variables, big))
  assert not _has_loop(apply, variables, jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32))
