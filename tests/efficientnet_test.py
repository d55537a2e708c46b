"""EfficientNet-Lite0 (Flax) against the plain-PyTorch reference in torch_efficientnet.py."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_efficientnet  # pylint: disable=wrong-import-position

from sslbench_jax.backbones import efficientnet  # pylint: disable=wrong-import-position
from sslbench_jax.backbones import registry  # pylint: disable=wrong-import-position
from sslbench_jax.convert.converter import convert_checkpoint  # pylint: disable=wrong-import-position

ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory):
  """A torch Lite0 with random weights and BN stats, and its Flax conversion from disk."""
  gen = torch.Generator().manual_seed(0)
  torch.manual_seed(0)
  model = torch_efficientnet.EfficientNetLite0(num_classes=10)
  torch_efficientnet.randomize_batch_norm(model, gen).eval()
  path = str(tmp_path_factory.mktemp("effnet") / "lite0_random.pth")
  torch.save(model.state_dict(), path)
  variables, meta = convert_checkpoint(path, ARCH)
  return model, variables, meta


def _torch_forward(model, images_nhwc):
  with torch.no_grad():
    pre, logits = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
  return pre.numpy(), logits.numpy()


@pytest.mark.parametrize("height,width", [(224, 224), (97, 130)])
def test_matches_torch_reference(random_pair, height, width):
  model, variables, meta = random_pair
  assert meta["arch_options"] == {"num_classes": 10}
  images = np.random.RandomState(1).randn(2, height, width, 3).astype(np.float32)
  flax_model = registry.create_model(ARCH, **meta["arch_options"])
  out = jax.jit(flax_model.apply)(variables, images)
  pre, logits = _torch_forward(model, images)
  assert out["pre_logits"].shape == (2, 1280) and out["logits"].shape == (2, 10)
  # Scale check so the tolerance below means something.
  assert np.abs(logits).max() > 0.1 and np.abs(pre).max() > 0.1
  np.testing.assert_allclose(out["pre_logits"], pre, atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["logits"], logits, atol=1e-4, rtol=0)


def test_train_mode_uses_batch_statistics(random_pair):
  model, variables, meta = random_pair
  images = np.random.RandomState(2).randn(4, 64, 64, 3).astype(np.float32)
  flax_model = registry.create_model(ARCH, **meta["arch_options"])
  out, updates = jax.jit(lambda v, x: flax_model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  # A train-mode forward moves torch's running stats: restore them for the
  # other tests sharing this module-scoped model.
  saved = {k: v.clone() for k, v in model.state_dict().items()}
  model.train()
  try:
    pre, logits = _torch_forward(model, images)
  finally:
    model.eval()
    model.load_state_dict(saved)
  np.testing.assert_allclose(out["logits"], logits, atol=1e-4, rtol=0)
  # Running means move towards the batch mean with the TF decay 0.99.
  old = variables["batch_stats"]["stem_bn"]["mean"]
  new = np.asarray(updates["batch_stats"]["stem_bn"]["mean"])
  assert np.abs(new - old).max() > 0
  assert efficientnet.BN_MOMENTUM == 0.99 and efficientnet.BN_EPSILON == 1e-3


@pytest.mark.parametrize("impl", ["shifted", "grouped"])
@pytest.mark.parametrize("kernel,stride,height,width", [
    (3, 1, 9, 9), (3, 2, 10, 7), (5, 2, 11, 12), (5, 1, 6, 5)])
def test_depthwise_conv_matches_torch(impl, kernel, stride, height, width):
  x = np.random.RandomState(3).randn(2, height, width, 6).astype(np.float32)
  conv = efficientnet.DepthwiseConv(kernel, stride, impl=impl)
  variables = conv.init(jax.random.PRNGKey(0), x)
  w = np.array(variables["params"]["kernel"])
  assert w.shape == (kernel, kernel, 1, 6)
  ref = torch_efficientnet.SameConv2d(6, 6, kernel, stride, groups=6)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1)))
    expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(conv.apply(variables, x), expected, atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32(random_pair):
  _, variables, meta = random_pair
  images = np.random.RandomState(4).randn(2, 64, 64, 3).astype(np.float32)
  f32 = jax.jit(registry.create_model(ARCH, **meta["arch_options"]).apply)(
      variables, images)
  bf16 = jax.jit(registry.create_model(ARCH, dtype=jnp.bfloat16, **meta["arch_options"]).apply)(
      variables, images)
  assert bf16["logits"].dtype == jnp.float32
  scale = np.abs(f32["logits"]).max()
  assert np.abs(bf16["logits"] - f32["logits"]).max() < 0.1 * scale


def test_no_classifier_and_bad_input():
  model = registry.create_model(ARCH, num_classes=0)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert "classifier" not in variables["params"]
  variables = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), variables)
  out = jax.jit(model.apply)(variables, x)
  assert set(out) == {"pre_logits"} | {f"stage{n}_avg" for n in range(1, 8)}
  assert out["pre_logits"].shape == (1, 1280)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((1, 3, 32, 32)))


def _torch_stage_outputs(model, images_nhwc):
  """Pooled output of the last block of each stage, from the PyTorch reference."""
  ends = np.cumsum([repeats for *_, repeats in torch_efficientnet.STAGES])
  pooled = []
  with torch.no_grad():
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    x = torch.nn.functional.relu6(model._bn0(model._conv_stem(x)))  # pylint: disable=protected-access
    for i, block in enumerate(model._blocks):  # pylint: disable=protected-access
      x = block(x)
      if i + 1 in ends:
        pooled.append(x.mean(dim=(2, 3)).numpy())
  return pooled


@pytest.mark.parametrize("height,width", [(64, 64), (45, 70)])
def test_stage_outputs_match_torch_intermediate_blocks(random_pair, height, width):
  model, variables, meta = random_pair
  images = np.random.RandomState(5).randn(2, height, width, 3).astype(np.float32)
  out = jax.jit(registry.create_model(ARCH, **meta["arch_options"]).apply)(variables, images)
  expected = _torch_stage_outputs(model, images)
  assert len(expected) == 7
  for n, ref in enumerate(expected, start=1):
    got = out[f"stage{n}_avg"]
    assert got.shape == ref.shape == (2, torch_efficientnet.STAGES[n - 1][3])
    assert np.abs(ref).max() > 0.05  # the tolerance below means something
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"stage{n}_avg")


def test_early_stage_compiles_without_later_blocks(random_pair):
  """Selecting stage 2 only: XLA drops the later blocks (fewer flops than the head)."""
  _, variables, meta = random_pair
  model = registry.create_model(ARCH, **meta["arch_options"])
  x = jnp.zeros((1, 64, 64, 3))

  def flops(key):
    lowered = jax.jit(lambda v, im: model.apply(v, im)[key]).lower(variables, x)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  early, full = flops("stage2_avg"), flops("pre_logits")
  assert 0 < early < 0.5 * full
