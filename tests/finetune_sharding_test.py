"""1 vs 8 devices: same parameters after k steps, SyncBN = full-batch statistics,
and gradient accumulation = the whole-batch step."""

import textwrap

import numpy as np

from multiprocess_util import run_on_devices

SCRIPT = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from sslbench_jax import parallel
  from sslbench_jax.finetune import model as model_lib, optim, recipes, step as step_lib
  out, = sys.argv[1:]
  MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  rs = np.random.RandomState(0)
  batches = [(rs.randint(0, 256, (16, 32, 32, 3)).astype(np.uint8),
              rs.randint(0, 5, 16).astype(np.int32)) for _ in range(3)]
  saved = {}

  def train(arch, options, **kw):
    r = recipes.Recipe(**{"protocol": "full", "epochs": 2, "batch_size": 16,
                          "warmup_epochs": 1, "lr": 1.0, "label_smoothing": 0.1, **kw})
    model = model_lib.build(arch, 5, head_bn=r.head_bn, arch_options=options)
    variables = model_lib.init_variables(model, 1)
    mesh = parallel.make_mesh()
    tx = optim.make_optimizer(r, arch, variables["params"], 2)
    steps = step_lib.Steps(model, r, tx, mesh, MEAN, STD)
    state = steps.init_state(variables)
    first = None
    for x, y in batches:
      state, _ = steps.train(state, jax.device_put(x, steps.data), jax.device_put(y, steps.data))
      if first is None:
        first = jax.device_get(state["batch_stats"])
    return model, variables, jax.device_get(steps.variables(state)), first

  rn = dict(stage_sizes=(1, 1))
  model, init, final, first = train("resnet18", rn, head_bn=True)
  for p, v in jax.tree_util.tree_leaves_with_path(final):
    saved["rn" + jax.tree_util.keystr(p)] = np.asarray(v)
  # SyncBN: after one step the head BN running mean is 0.9 * 0 + 0.1 * the
  # mean over the WHOLE global batch of the representation (train mode).
  x0 = (batches[0][0].astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
  feats, _ = model.backbone.apply({"params": init["params"]["backbone"],
                                   "batch_stats": init["batch_stats"]["backbone"]},
                                  jnp.asarray(x0), train=True, mutable=["batch_stats"])
  f = np.asarray(feats["pre_logits"], np.float64)
  np.testing.assert_allclose(first["head_bn"]["mean"], 0.1 * f.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(first["head_bn"]["var"], 0.9 + 0.1 * f.var(0), rtol=1e-4, atol=1e-6)

  vit = dict(patch_size=8, width=32, depth=2, num_heads=2, img_size=32)
  # SGD: Adam would amplify the rounding noise of the key bias, whose gradient
  # is exactly zero in theory (softmax is shift invariant).
  _, _, whole, _ = train("vit_small_patch16", vit, lr=0.5, layer_decay=0.7)
  _, _, accum, _ = train("vit_small_patch16", vit, lr=0.5, layer_decay=0.7,
                         accum_steps=2)
  for (p, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(whole),
                            jax.tree_util.tree_leaves_with_path(accum)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg="accum " + str(p))
    saved["vit" + jax.tree_util.keystr(p)] = np.asarray(a)
  np.savez(out, **saved)
  print("devices", jax.device_count(), "OK")
""")


def test_one_vs_eight_devices_same_params_and_syncbn(tmp_path):
  outs = {}
  for n in (1, 8):
    outs[n] = str(tmp_path / f"d{n}.npz")
    run_on_devices(SCRIPT.replace("out, = sys.argv[1:]", f"out = {outs[n]!r}"), n,
                   timeout=600)
  with np.load(outs[1]) as a, np.load(outs[8]) as b:
    assert sorted(a.files) == sorted(b.files) and any("var" in k for k in a.files)
    for k in a.files:
      scale = max(np.abs(a[k]).max(), 1e-3)
      assert np.abs(a[k] - b[k]).max() / scale <= 1e-5, k
