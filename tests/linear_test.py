"""Multi-head linear probe vs a PyTorch training loop, selection hygiene."""

import math
import sys
import textwrap

import numpy as np
import pytest
import torch

from sslbench_jax.probes import linear
import multiprocess_util


def _data(seed, n=203, dim=16, classes=5, sep=1.5):
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=sep, size=(classes, dim))
  y = rng.integers(0, classes, n)
  x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
  return x, y


def _torch_train(x, y, classes, w0, b0, cfg, tc):
  """PyTorch reference: Linear (+ BatchNorm1d(affine=False)), SGD/AdamW,
  LambdaLR warmup+cosine stepped per epoch, clip_grad_norm_, same order."""
  torch.manual_seed(0)
  head = torch.nn.Linear(x.shape[1], classes)
  with torch.no_grad():
    head.weight.copy_(torch.tensor(w0.T))
    head.bias.copy_(torch.tensor(b0))
  bn = torch.nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6)
  model = torch.nn.Sequential(bn, head) if cfg.batchnorm else head
  if cfg.optimizer == "sgd":
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=tc.momentum,
                          weight_decay=cfg.weight_decay)
  else:
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
  w = tc.warmup_epochs

  def factor(e):
    if e < w:
      return (e + 1) / (w + 1)
    return 0.5 * (1 + math.cos(math.pi * (e - w) / (tc.epochs - w)))

  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  xt, yt = torch.tensor(x), torch.tensor(y)
  model.train()
  for epoch in range(tc.epochs):
    order = torch.tensor(linear.epoch_order(tc.seed, epoch, len(x)))
    for start in range(0, len(x), tc.batch_size):
      idx = order[start:start + tc.batch_size]
      opt.zero_grad()
      loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
      loss.backward()
      torch.nn.utils.clip_grad_norm_(head.parameters(), tc.clip_norm)
      opt.step()
    sched.step()
  return (head.weight.detach().numpy().T, head.bias.detach().numpy(),
          bn.running_mean.numpy(), bn.running_var.numpy())


@pytest.mark.parametrize("budget", [None, 3 * 32 * 16 * 4])  # resident / streamed
@pytest.mark.parametrize("cfg", [
    linear.HeadConfig("x", lr=0.4, weight_decay=1e-3),
    linear.HeadConfig("x", lr=0.2, weight_decay=1e-2, batchnorm=True),
    linear.HeadConfig("x", lr=0.01, weight_decay=0.05, optimizer="adamw"),
])
def test_one_head_matches_pytorch(cfg, budget):
  x, y = _data(0)
  tc = linear.TrainConfig(epochs=4, batch_size=32, warmup_epochs=1,
                          clip_norm=0.5, seed=3)
  rng = np.random.default_rng(1)
  w0 = (0.01 * rng.normal(size=(16, 5))).astype(np.float32)
  b0 = np.zeros(5, np.float32)
  heads = linear.train({"x": x}, y, 5, [cfg], tc, init=[(w0, b0)],
                       device_budget_bytes=budget)
  w, b, rm, rv = _torch_train(x, y, 5, w0, b0, cfg, tc)
  assert np.abs(heads.weights[0] - w0).max() > 1e-2  # it did train
  np.testing.assert_allclose(heads.weights[0], w, atol=1e-4)
  np.testing.assert_allclose(heads.biases[0], b, atol=1e-4)
  if cfg.batchnorm:
    np.testing.assert_allclose(heads.bn_stats["x"][0], rm, atol=1e-5)
    np.testing.assert_allclose(heads.bn_stats["x"][1], rv, rtol=1e-5)


def test_many_heads_equal_heads_trained_separately():
  x, y = _data(2)
  x2 = np.concatenate([x, x[:, :4] ** 2], axis=1)  # a wider second source
  feats = {"a": x, "b": x2}
  configs = (linear.grid(["a", "b"], [0.05, 0.3], [0.0, 1e-3])
             + linear.grid(["a"], [0.003], [0.01], optimizers=["adamw"]))
  assert len(configs) == 2 * 2 * 2 * 2 + 2
  tc = linear.TrainConfig(epochs=3, batch_size=40, warmup_epochs=1, seed=7)
  together = linear.train(feats, y, 5, configs, tc)
  for i in (0, 5, 11, 16, 17):
    alone = linear.train(feats, y, 5, [configs[i]], tc,
                         init=[(together_init(tc, i, feats[configs[i].source]), np.zeros(5))])
    np.testing.assert_allclose(together.weights[i], alone.weights[0], atol=2e-6)
    np.testing.assert_allclose(together.biases[i], alone.biases[0], atol=2e-6)


def together_init(tc, i, x):
  """The default initialisation of head ``i`` (seeded per head index)."""
  import jax
  key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 1000 + i)
  return np.asarray(tc.init_std * jax.random.normal(key, (x.shape[1], 5)))


def test_selection_never_touches_test_labels():
  x, y = _data(3, n=300)
  xt, yt = _data(4, n=120)
  configs = linear.grid(["x"], [0.001, 0.1, 1.0], [0.0], batchnorm=[False, True])
  tc = linear.TrainConfig(epochs=3, batch_size=64, warmup_epochs=1, seed=0)
  r1 = linear.fit_select({"x": x}, y, {"x": xt}, yt, 5, configs, tc)
  perm = np.random.default_rng(0).permutation(yt)
  r2 = linear.fit_select({"x": x}, y, {"x": xt}, perm, 5, configs, tc)
  assert r1.selected == r2.selected and r1.holdout_top1 == r2.holdout_top1
  assert r1.selection == "holdout" and r1.test_top1 != r2.test_top1
  # the retrained head's test accuracy is computed from its logits
  heads = linear.train({"x": x}, y, 5, [r1.selected], tc)
  logits = heads.logits({"x": xt}, 0)
  pred = logits.argmax(1)
  assert r1.test_top1 == pytest.approx(100 * np.mean(pred == yt))
  # ... and carried as test_scores, for the test set's other metrics
  np.testing.assert_allclose(r1.test_scores, logits, rtol=1e-6, atol=1e-6)
  # without test labels (scored elsewhere): same head, same scores, no top-k
  r0 = linear.fit_select({"x": x}, y, {"x": xt}, None, 5, configs, tc)
  assert r0.selected == r1.selected and np.isnan(r0.test_top1)
  np.testing.assert_array_equal(r0.test_scores, r1.test_scores)
  assert r0.n_test == 120
  # "max over test" picks the config that is best on test
  r3 = linear.fit_select({"x": x}, y, {"x": xt}, yt, 5, configs, tc, select_on_test=True)
  assert r3.selection == "max over test"
  assert r3.test_top1 == pytest.approx(max(r3.holdout_top1))
  assert r3.test_top1 == pytest.approx(100 * np.mean(r3.test_scores.argmax(1) == yt))
  with pytest.raises(ValueError, match="needs single-label"):
    linear.fit_select({"x": x}, y, {"x": xt}, None, 5, configs, tc, select_on_test=True)


def test_stratified_split():
  y = np.repeat(np.arange(4), [10, 20, 3, 1])
  fit, held = linear.stratified_split(y, 0.1, seed=0)
  assert sorted(np.bincount(y[held], minlength=4).tolist()) == [0, 1, 1, 2]
  np.testing.assert_array_equal(np.bincount(y[held], minlength=4), [1, 2, 1, 0])
  assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == len(y)
  _, held2 = linear.stratified_split(y, 0.1, seed=0)
  _, held3 = linear.stratified_split(y, 0.1, seed=1)
  np.testing.assert_array_equal(held, held2)
  assert not np.array_equal(held, held3)


def test_lr_factor_is_the_studys_schedule():
  f = [float(linear.lr_factor(e, 100, 5)) for e in range(100)]
  np.testing.assert_allclose(f[:6], [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0], rtol=1e-6)
  assert f[52] == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)), rel=1e-6)


def test_bad_config_is_rejected():
  x, y = _data(5, n=20)
  with pytest.raises(ValueError, match="feature source 'cls'"):
    linear.train({"x": x}, y, 5, [linear.HeadConfig("cls", 0.1)])
  with pytest.raises(ValueError, match="optimizer"):
    linear.train({"x": x}, y, 5, [linear.HeadConfig("x", 0.1, optimizer="lamb")])


def test_evaluate_matches_numpy_topk():
  x, y = _data(6, n=150)
  configs = linear.grid(["x"], [0.05, 0.5], [0.0], batchnorm=[False, True])
  tc = linear.TrainConfig(epochs=2, batch_size=64, warmup_epochs=1)
  heads = linear.train({"x": x}, y, 5, configs, tc)
  acc = linear.evaluate(heads, {"x": x}, y, ks=(1, 2), batch_size=40)
  for i in range(len(configs)):
    logits = heads.logits({"x": x}, i)
    order = np.argsort(-logits, axis=1, kind="stable")
    for j, k in enumerate((1, 2)):
      ref = 100 * np.mean(np.any(order[:, :k] == y[:, None], axis=1))
      assert acc[i, j] == pytest.approx(ref)


_EIGHT_DEVICES = textwrap.dedent("""
    import numpy as np, jax
    from sslbench_jax.probes import linear
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(11)
    centres = rng.normal(scale=1.5, size=(5, 12))
    y = rng.integers(0, 5, 203)
    x = (centres[y] + rng.normal(size=(203, 12))).astype(np.float32)
    feats = {"a": x, "b": x[:, :6] ** 2}
    configs = (linear.grid(["a", "b"], [0.05, 0.4], [0.0, 1e-3])
               + linear.grid(["a"], [0.01], [0.05], optimizers=["adamw"]))
    # batch 37: neither it nor the last partial batch (18) divides by 8
    tc = linear.TrainConfig(epochs=3, batch_size=37, warmup_epochs=1, seed=2)
    one = linear.train(feats, y, 5, configs, tc, devices=jax.devices()[:1])
    eight = linear.train(feats, y, 5, configs, tc)
    for i in range(len(configs)):
      assert np.abs(one.weights[i]).max() > 0.05  # trained
      np.testing.assert_allclose(eight.weights[i], one.weights[i], atol=1e-5)
      np.testing.assert_allclose(eight.biases[i], one.biases[i], atol=1e-5)
    for s in one.bn_stats:
      for a, b in zip(one.bn_stats[s], eight.bn_stats[s]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    acc1 = linear.evaluate(one, feats, y, ks=(1, 2))
    acc8 = linear.evaluate(eight, feats, y, ks=(1, 2))
    np.testing.assert_array_equal(acc1, acc8)
    print("OK")
""")


def test_eight_devices_equal_one_device():
  multiprocess_util.run_on_devices(_EIGHT_DEVICES, 8)


_TWO_PROCESSES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from sslbench_jax.probes import linear
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    rng = np.random.default_rng(12)
    centres = rng.normal(scale=1.5, size=(5, 12))
    y = rng.integers(0, 5, 203)
    x = (centres[y] + rng.normal(size=(203, 12))).astype(np.float32)
    configs = linear.grid(["a"], [0.05, 0.4], [1e-3], batchnorm=[False, True])
    tc = linear.TrainConfig(epochs=3, batch_size=37, warmup_epochs=1, seed=2)
    both = linear.train({"a": x}, y, 5, configs, tc)   # rows over 2 processes
    local = linear.train({"a": x}, y, 5, configs, tc,
                         devices=jax.local_devices())
    for i in range(len(configs)):
      np.testing.assert_allclose(both.weights[i], local.weights[i], atol=1e-5)
      np.testing.assert_allclose(both.biases[i], local.biases[i], atol=1e-5)
    np.testing.assert_allclose(both.bn_stats["a"][1], local.bn_stats["a"][1],
                               rtol=1e-5)
    print("OK")
""")


def test_two_processes_equal_one_process():
  multiprocess_util.run_two_processes(_TWO_PROCESSES)


def test_progress_bar_changes_no_number(capfd, caplog):
  x, y = _data(7, n=90)
  configs = linear.grid(["x"], [0.05, 0.5], [1e-3], batchnorm=[False, True])
  tc = linear.TrainConfig(epochs=3, batch_size=32, warmup_epochs=1, seed=4)
  capfd.readouterr()
  quiet = linear.train({"x": x}, y, 5, configs, tc, progress=False)
  assert "linear (4 heads)" not in capfd.readouterr().err
  with caplog.at_level("INFO", logger="absl"):
    shown = linear.train({"x": x}, y, 5, configs, tc, progress=True)
  err = capfd.readouterr().err
  # the bar counts examples: 3 epochs x 90, with a rate in examples/s
  assert "linear (4 heads)" in err and "270/270" in err and "ex/s" in err
  assert "epoch=3/3" in err
  assert "examples/s" in caplog.text  # the one absl line per training pass
  for i in range(len(configs)):
    np.testing.assert_array_equal(shown.weights[i], quiet.weights[i])
    np.testing.assert_array_equal(shown.biases[i], quiet.biases[i])
  for a, b in zip(shown.bn_stats["x"], quiet.bn_stats["x"]):
    np.testing.assert_array_equal(a, b)
  assert np.abs(quiet.weights[0]).max() > 0.05  # it trained
