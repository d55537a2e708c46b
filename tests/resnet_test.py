"""backbones.resnet against the torchvision-structured PyTorch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sslbench_jax.backbones import registry
from sslbench_jax.convert import _family
from sslbench_jax.convert import resnet_keys
import torch_resnet


def _variables(torch_model, arch, num_classes=None):
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  return resnet_keys.to_flax(_family.SourceState(state), arch,
                             {"num_classes": num_classes})


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("arch,size,dim", [
    ("resnet18", 32, 512),
    ("resnet50", 32, 2048),
    ("resnet50x2", 32, 4096),
])
def test_pre_logits_match_torch(arch, size, dim):
  torch_model = torch_resnet.randomize(torch_resnet.resnet(arch), seed=1)
  x = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
  out = registry.create_model(arch).apply(_variables(torch_model, arch), x,
                                          train=False)
  with torch.no_grad():
    ref = torch_model.features(_nchw(x)).numpy()
  assert out["pre_logits"].shape == (2, dim)
  assert "logits" not in out
  assert np.std(ref) > 0.05  # a representation worth comparing
  np.testing.assert_allclose(out["pre_logits"], ref, atol=1e-4, rtol=0)


def test_layer3_average_pool_matches_torch():
  torch_model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=3)
  x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  out = registry.create_model("resnet18").apply(_variables(torch_model, "resnet18"), x,
                                                train=False)
  m = torch_model
  with torch.no_grad():
    h = m.maxpool(m.relu(m.bn1(m.conv1(_nchw(x)))))
    ref = m.layer3(m.layer2(m.layer1(h))).mean(dim=(2, 3)).numpy()
  assert out["layer3_avg"].shape == (2, 256)
  np.testing.assert_allclose(out["layer3_avg"], ref, atol=1e-4, rtol=0)


def test_odd_input_size_padding_matches_torch():
  # 37x41: every stride-2 layer sees an odd size, where "SAME" would differ.
  torch_model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=2)
  x = np.random.RandomState(1).randn(1, 37, 41, 3).astype(np.float32)
  out = registry.create_model("resnet18").apply(
      _variables(torch_model, "resnet18"), x)
  with torch.no_grad():
    ref = torch_model.features(_nchw(x)).numpy()
  np.testing.assert_allclose(out["pre_logits"], ref, atol=1e-4, rtol=0)


def test_logits_match_torch_fc():
  torch_model = torch_resnet.randomize(
      torch_resnet.resnet("resnet18", num_classes=10), seed=3)
  x = np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32)
  model = registry.create_model("resnet18", num_classes=10)
  out = model.apply(_variables(torch_model, "resnet18", 10), x)
  with torch.no_grad():
    ref = torch_model(_nchw(x)).numpy()
  assert out["logits"].shape == (2, 10)
  np.testing.assert_allclose(out["logits"], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet50x2"])
def test_parameter_count_matches_torch(arch):
  model = registry.create_model(arch, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  n_stats = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["batch_stats"]))
  torch_model = torch_resnet.resnet(arch, num_classes=1000)
  n_torch = sum(p.numel() for p in torch_model.parameters())
  n_torch_stats = sum(b.numel() for n, b in torch_model.named_buffers()
                      if not n.endswith("num_batches_tracked"))
  assert n_params == n_torch
  assert n_stats == n_torch_stats


def test_train_mode_batch_stats_follow_torch_momentum():
  torch_model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=4)
  variables = _variables(torch_model, "resnet18")
  x = np.random.RandomState(3).randn(4, 64, 64, 3).astype(np.float32)
  out, updates = registry.create_model("resnet18").apply(
      variables, x, train=True, mutable=["batch_stats"])
  torch_model.train()
  with torch.no_grad():
    ref = torch_model.features(_nchw(x)).numpy()
  np.testing.assert_allclose(out["pre_logits"], ref, atol=1e-4, rtol=0)
  # torch keeps the unbiased batch variance; flax the biased one: compare mean.
  np.testing.assert_allclose(updates["batch_stats"]["layer4_1"]["bn2"]["mean"],
                             torch_model.layer4[1].bn2.running_mean.numpy(),
                             atol=1e-5, rtol=0)


def test_bfloat16_compute_stays_close():
  torch_model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed=5)
  variables = _variables(torch_model, "resnet18")
  x = np.random.RandomState(4).randn(2, 32, 32, 3).astype(np.float32)
  out = registry.create_model("resnet18", dtype=jnp.bfloat16).apply(variables, x)
  with torch.no_grad():
    ref = torch_model.features(_nchw(x)).numpy()
  assert out["pre_logits"].dtype == jnp.float32
  rel = np.abs(np.asarray(out["pre_logits"]) - ref).max() / np.abs(ref).max()
  assert rel < 0.05


@pytest.mark.parametrize("arch,millions", [
    ("resnet50", 23.5), ("resnet50x2", 93.9), ("resnet50x4", 375.4)])
def test_wide_resnet_sizes_match_published_counts(arch, millions):
  # Trunk parameters (no fc) of SwAV's resnet50 / resnet50w2 / resnet50w4 and
  # SimCLR's r50_1x/2x/4x: 23.5M / 94M / 375M. Scaling the bottleneck inner
  # width by w**2 (an older SwAV revision) would give ~170M for x2.
  model = registry.create_model(arch)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert abs(n_params / 1e6 - millions) < 0.1
