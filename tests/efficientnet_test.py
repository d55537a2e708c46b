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
  model.train()
  try:
    pre, logits = _torch_forward(model, images)
  finally:
    model.eval()
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
  assert set(out) == {"pre_logits"} and out["pre_logits"].shape == (1, 1280)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((1, 3, 32, 32)))
