"""BYOL's official Haiku pickle -> Flax ResNet-50, against PyTorch.

The fixture is written the way ``byol/utils/checkpointing.py`` does it: a
protocol-2 pickle of ``dict(experiment_state=_ByolExperimentState(...),
step=..., rng=...)`` whose NamedTuple class lives in ``byol.byol_experiment``
(a stand-in module registered only while the file is written), with Haiku
module names as ``networks.ResNet50`` + ``hk.nets.ResNet.BlockGroup`` /
``BlockV1`` create them. The Haiku tensors are made from a random PyTorch
ResNet-50, so the converted Flax model must reproduce its forward pass.
"""

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest

from sslbench_jax.backbones import registry
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
import torch
import torch_resnet

_INPUT = np.random.RandomState(0).randn(2, 48, 48, 3).astype(np.float32)


def _haiku_bn(module, state_dict, tv):
  c = state_dict[tv + ".weight"].shape[0]
  params = {module: {"scale": state_dict[tv + ".weight"].numpy(),
                     "offset": state_dict[tv + ".bias"].numpy()}}
  state = {}
  for ema, stat in (("mean_ema", "running_mean"), ("var_ema", "running_var")):
    avg = state_dict[f"{tv}.{stat}"].numpy().reshape(1, 1, 1, c)
    state[f"{module}/~/{ema}"] = {"average": avg, "hidden": avg * 0.5,
                                  "counter": np.array(1000, np.int32)}
  return params, state


def _haiku_trees(model, root="res_net50"):
  """(params, state) Haiku trees written independently of the converter."""
  sd = model.state_dict()
  params, state = {}, {}

  def conv(module, tv):  # OIHW -> HWIO
    params[module] = {"w": sd[tv + ".weight"].numpy().transpose(2, 3, 1, 0).copy()}

  def bn(module, tv):
    p, s = _haiku_bn(module, sd, tv)
    params.update(p)
    state.update(s)

  conv(f"{root}/~/initial_conv", "conv1")
  bn(f"{root}/~/initial_batchnorm", "bn1")
  for g in range(4):
    b = 0
    while f"layer{g + 1}.{b}.conv1.weight" in sd:
      block = f"{root}/~/block_group_{g}/~/block_{b}/~/"
      for k in range(3):
        conv(block + f"conv_{k}", f"layer{g + 1}.{b}.conv{k + 1}")
        bn(block + f"batchnorm_{k}", f"layer{g + 1}.{b}.bn{k + 1}")
      if f"layer{g + 1}.{b}.downsample.0.weight" in sd:
        conv(block + "shortcut_conv", f"layer{g + 1}.{b}.downsample.0")
        bn(block + "shortcut_batchnorm", f"layer{g + 1}.{b}.downsample.1")
      b += 1
  rng = np.random.RandomState(1)
  params["projector/~/linear"] = {"w": rng.randn(2048, 64).astype(np.float32),
                                  "b": np.zeros(64, np.float32)}
  params["projector/~/batch_norm"] = {"scale": np.ones(64, np.float32),
                                      "offset": np.zeros(64, np.float32)}
  params["projector/~/linear_1"] = {"w": rng.randn(64, 16).astype(np.float32)}
  params["predictor/~/linear"] = {"w": rng.randn(16, 64).astype(np.float32),
                                  "b": np.zeros(64, np.float32)}
  params["classifier"] = {"w": np.zeros((2048, 1000), np.float32),
                          "b": np.zeros(1000, np.float32)}
  state["projector/~/batch_norm/~/mean_ema"] = {
      "average": np.zeros((1, 64), np.float32), "hidden": np.zeros((1, 64), np.float32),
      "counter": np.array(3, np.int32)}
  return params, state


def _write_experiment_state(path, online, target):
  """Pickles like BYOL's Checkpointer (protocol 2, NamedTuple by reference)."""
  fields = ("online_params", "target_params", "online_state", "target_state",
            "opt_state")
  module = types.ModuleType("byol.byol_experiment")
  cls = collections.namedtuple("_ByolExperimentState", fields)
  cls.__module__ = "byol.byol_experiment"
  module._ByolExperimentState = cls  # pylint: disable=protected-access
  saved = {k: sys.modules.get(k) for k in ("byol", "byol.byol_experiment")}
  sys.modules["byol"] = types.ModuleType("byol")
  sys.modules["byol.byol_experiment"] = module
  try:
    momentum = {k: {p: np.zeros_like(v) for p, v in d.items()}
                for k, d in online[0].items()}
    state = cls(online[0], target[0], online[1], target[1], (momentum, {}))
    with open(path, "wb") as f:
      pickle.dump({"experiment_state": state, "step": 5004,
                   "rng": np.array([0, 42], np.uint32)}, f, protocol=2)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _torch_features(model, x=_INPUT):
  with torch.no_grad():
    return model.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _flax_features(variables, meta, x=_INPUT):
  model = registry.create_model(meta["arch"], **meta["arch_options"])
  return np.asarray(model.apply(variables, x, train=False)["pre_logits"])


@pytest.fixture(scope="module")
def byol_release(tmp_path_factory):
  online = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=11)
  target = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=12)
  path = str(tmp_path_factory.mktemp("byol") / "pretrain_res50x1.pkl")
  _write_experiment_state(path, _haiku_trees(online), _haiku_trees(target))
  return path, online, target


def test_official_pickle_converts_online_encoder(byol_release, tmp_path):
  path, online, _ = byol_release
  out = str(tmp_path / "byol.npz")
  variables, meta = convert_checkpoint(path, "resnet50", out)
  assert meta["source_format"] == "haiku_pickle"
  assert meta["source"] == "byol" and meta["prefix"] == "online."
  assert meta["arch_options"] == {}
  assert "online.projector.linear.w" in meta["dropped_keys"]
  assert "online.classifier.w" in meta["dropped_keys"]
  assert any(k.startswith("target.") for k in meta["dropped_keys"])
  assert os.path.exists(out)
  np.testing.assert_allclose(_flax_features(variables, meta),
                             _torch_features(online), atol=1e-4, rtol=0)


def test_target_encoder_by_select(byol_release):
  path, online, target = byol_release
  variables, meta = convert_checkpoint(path, "resnet50", select="target")
  assert meta["prefix"] == "target."
  ours = _flax_features(variables, meta)
  np.testing.assert_allclose(ours, _torch_features(target), atol=1e-4, rtol=0)
  assert np.abs(ours - _torch_features(online)).max() > 1e-2


def test_bare_haiku_tree_with_keepdims_params(tmp_path):
  """A plain {module: {name: array}} pickle (params + state merged)."""
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=13)
  params, state = _haiku_trees(model, root="encoder/~/res_net50")
  # Older Haiku kept BatchNorm parameters as (1, 1, 1, C).
  params = {k: {p: (v.reshape(1, 1, 1, -1) if p in ("scale", "offset") and v.ndim == 1
                    else v) for p, v in d.items()} for k, d in params.items()}
  path = str(tmp_path / "byol_tree.pkl")
  with open(path, "wb") as f:
    pickle.dump({**params, **state}, f, protocol=4)
  variables, meta = convert_checkpoint(path, "resnet50")
  assert meta["prefix"] == "encoder."
  np.testing.assert_allclose(_flax_features(variables, meta),
                             _torch_features(model), atol=1e-4, rtol=0)


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({self.marker!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_pickle_payloads_stay_inert(tmp_path, payload):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pkl")
  with open(path, "wb") as f:
    pickle.dump({"experiment_state": payload(str(marker)),
                 "res_net50/~/initial_conv": {"w": payload(str(marker))}}, f,
                protocol=2)
  with pytest.raises(ConversionError, match="evil.pkl: .*Haiku ResNet"):
    convert_checkpoint(path, "resnet50", str(tmp_path / "out.npz"))
  assert not marker.exists()
  assert not (tmp_path / "out.npz").exists()


def test_unknown_haiku_module_is_named(tmp_path):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=14)
  params, state = _haiku_trees(model)
  params["res_net50/~/block_group_0/~/block_0/~/sk_conv"] = {"w": np.zeros((3, 3, 4, 4))}
  path = str(tmp_path / "odd.pkl")
  with open(path, "wb") as f:
    pickle.dump({**params, **state}, f, protocol=2)
  with pytest.raises(ConversionError, match="sk_conv"):
    convert_checkpoint(path, "resnet50")


def test_pickle_without_resnet_says_so(tmp_path):
  path = str(tmp_path / "other.pkl")
  with open(path, "wb") as f:
    pickle.dump({"weights": np.zeros(3)}, f, protocol=2)
  with pytest.raises(ConversionError, match="no '.../initial_conv'"):
    convert_checkpoint(path, "resnet50")


# --- genuine dill bytes (tests/fixtures/make_byol_dill.py, dill 0.4.1) --------

_DILL_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "byol_dill_tiny.pkl")


def test_dill_written_checkpoint_is_read_inertly():
  """dill's _create_namedtuple / _create_array are rebuilt without dill."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
  import byol_dill_values  # pylint: disable=import-outside-toplevel
  from sslbench_jax.convert import haiku_pickle  # pylint: disable=import-outside-toplevel
  obj = haiku_pickle.load_pickle(_DILL_FIXTURE)
  state = obj["experiment_state"]
  assert list(state) == ["online_params", "target_params", "online_state",
                         "target_state", "opt_state"]  # field names from dill
  np.testing.assert_array_equal(obj["rng"], [0, 42])
  dicts = haiku_pickle.byol_state_dicts(obj)
  for role, offset in (("online", 0.0), ("target", 1.0)):
    params, ema = byol_dill_values.byol_tiny_trees(offset)
    got = dicts[role]
    np.testing.assert_array_equal(
        got["conv1.weight"],
        params["res_net50/~/initial_conv"]["w"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(got["bn1.weight"],
                                  params["res_net50/~/initial_batchnorm"]["scale"])
    np.testing.assert_array_equal(
        got["bn1.running_var"],
        ema["res_net50/~/initial_batchnorm/~/var_ema"]["average"].reshape(-1))
    np.testing.assert_array_equal(got["projector.linear.w"],
                                  params["projector/~/linear"]["w"])
  assert "bn1.mean_ema" not in " ".join(dicts["online"])  # hidden/counter left out


def test_dill_array_built_by_another_callable_is_refused(tmp_path):
  """A `_create_array` record whose builder is not NumPy's is not called."""
  raw = open(_DILL_FIXTURE, "rb").read()
  evil = raw.replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                     b"cposix\nsystem\n", 1)
  assert evil != raw
  path = str(tmp_path / "evil_dill.pkl")
  with open(path, "wb") as f:
    f.write(evil)
  with pytest.raises(ConversionError, match="other than NumPy's _reconstruct"):
    convert_checkpoint(path, "resnet50")


def test_haiku_flatmapping_wrappers_are_walked(tmp_path):
  """Haiku 0.0.x kept params in FlatMapping, pickled as FlatMapping(dict)."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
  import byol_dill_values  # pylint: disable=import-outside-toplevel
  from sslbench_jax.convert import haiku_pickle  # pylint: disable=import-outside-toplevel

  class FlatMapping(dict):
    def __reduce__(self):
      return (FlatMapping, (dict(self),))

  FlatMapping.__module__ = "haiku._src.data_structures"
  FlatMapping.__qualname__ = "FlatMapping"
  module = types.ModuleType("haiku._src.data_structures")
  module.FlatMapping = FlatMapping
  saved = {k: sys.modules.get(k) for k in ("haiku", "haiku._src", module.__name__)}
  sys.modules.update({"haiku": types.ModuleType("haiku"),
                      "haiku._src": types.ModuleType("haiku._src"),
                      module.__name__: module})
  try:
    params, state = byol_dill_values.byol_tiny_trees(0.5)
    wrapped = FlatMapping({k: FlatMapping(v) for k, v in {**params, **state}.items()})
    path = str(tmp_path / "flat.pkl")
    with open(path, "wb") as f:
      pickle.dump({"online_params": wrapped}, f, protocol=2)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  got = haiku_pickle.read_byol_pickle(path)["online"]
  np.testing.assert_array_equal(
      got["conv1.weight"], params["res_net50/~/initial_conv"]["w"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(got["bn1.bias"], params["res_net50/~/initial_batchnorm"]["offset"])
