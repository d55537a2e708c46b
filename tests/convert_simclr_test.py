"""SimCLR's TensorFlow checkpoints, read without TensorFlow.

* The tensor-bundle reader against bundles TensorFlow itself wrote
  (``tests/fixtures/tf_bundle``, made by ``fixtures/make_tf_bundles.py`` with
  ``tensorflow-cpu`` 2.21 in a separate venv): values, dtypes, skipped string
  tensors, corruption and truncation.
* SimCLR v1 (TF1 ``base_model/conv2d_N``) and v2 TF2 (``resnet_model/...``)
  naming, written with this file's own bundle writer from a random PyTorch
  ResNet-50: the converted Flax model reproduces its forward pass.
"""

import os
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

from sslbench_jax.backbones import registry
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
from sslbench_jax.convert import tf_bundle
import torch_resnet

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import tf_bundle_values  # pylint: disable=wrong-import-position

_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf_bundle")
_INPUT = np.random.RandomState(0).rand(2, 48, 48, 3).astype(np.float32)
_TF2 = "/.ATTRIBUTES/VARIABLE_VALUE"


# --- a minimal tensor-bundle writer (LevelDB table + BundleEntryProto) -------

def _varint(n):
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number, wire, payload):
  tag = _varint(number << 3 | wire)
  if wire == 0:
    return tag + _varint(payload)
  if wire == 5:
    return tag + struct.pack("<I", payload)
  return tag + _varint(len(payload)) + payload


_TF_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2,
              np.dtype(np.int32): 3, np.dtype(np.int64): 9}


def _block(entries):
  body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v
                  for k, v in entries)
  return body + struct.pack("<II", 0, 1)  # one restart point at 0


def write_bundle(prefix, tensors, strings=()):
  """Writes ``prefix.index`` / ``prefix.data-00000-of-00001``."""
  data, entries = bytearray(), []
  for name in sorted(tensors):
    raw = np.ascontiguousarray(tensors[name]).tobytes()
    shape = b"".join(_field(2, 2, _field(1, 0, d)) for d in tensors[name].shape)
    entry = (_field(1, 0, _TF_DTYPES[tensors[name].dtype]) + _field(2, 2, shape)
             + _field(4, 0, len(data)) + _field(5, 0, len(raw))
             + _field(6, 5, tf_bundle.masked_crc32c(raw)))
    entries.append((name.encode(), entry))
    data += raw
  for name in strings:  # a string tensor, as TF2's object graph
    entries.append((name.encode(), _field(1, 0, 7) + _field(4, 0, len(data))
                    + _field(5, 0, 3)))
    data += b"\x02ab"
  entries.sort()
  header = _field(1, 0, 1) + _field(3, 2, _field(1, 0, 1))
  index = bytearray()

  def put(block):
    offset = len(index)
    index.extend(block + b"\x00" + struct.pack(
        "<I", tf_bundle.masked_crc32c(block + b"\x00")))
    return _varint(offset) + _varint(len(block))

  data_handle = put(_block([(b"", header)] + entries))
  meta_handle = put(_block([]))
  index_handle = put(_block([(entries[-1][0] + b"\xff", data_handle)]))
  footer = meta_handle + index_handle
  index += footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
  with open(prefix + ".index", "wb") as f:
    f.write(index)
  with open(prefix + ".data-00000-of-00001", "wb") as f:
    f.write(data)
  return prefix + ".index"


# --- SimCLR namings, from google-research/simclr resnet.py / tf2/resnet.py ---

def _order(sd):
  """torchvision (conv, bn) pairs in SimCLR's TF1 creation order."""
  pairs = [("conv1", "bn1")]
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      if j == 0:
        pairs.append((f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1"))
      pairs += [(f"layer{i}.{j}.conv{k}", f"layer{i}.{j}.bn{k}") for k in (1, 2, 3)]
      j += 1
  return pairs


def _bn_vars(sd, bn):
  return {"gamma": sd[bn + ".weight"], "beta": sd[bn + ".bias"],
          "moving_mean": sd[bn + ".running_mean"],
          "moving_variance": sd[bn + ".running_var"]}


def simclr_v1_tensors(model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  out = {"global_step": np.array(250228, np.int64),
         "head_supervised/linear_layer/dense/kernel":
             np.zeros((2048, 1000), np.float32),
         "head_supervised/linear_layer/dense/bias": np.zeros(1000, np.float32)}
  for i, (conv, bn) in enumerate(_order(sd)):
    suffix = f"_{i}" if i else ""
    kernel = sd[conv + ".weight"].transpose(2, 3, 1, 0).copy()
    out[f"base_model/conv2d{suffix}/kernel"] = kernel
    if i < 3:  # LARS momentum slots of some variables
      out[f"base_model/conv2d{suffix}/kernel/Momentum"] = np.zeros_like(kernel)
    for var, value in _bn_vars(sd, bn).items():
      out[f"base_model/batch_normalization{suffix}/{var}"] = value
  return out


def simclr_v2_tf2_tensors(model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  root = "model/resnet_model/"
  out = {"model/supervised_head/linear_layer/dense/kernel" + _TF2:
             np.zeros((2048, 1000), np.float32),
         "save_counter" + _TF2: np.array(1, np.int64)}

  def put(path, conv, bn, conv_i, bn_i):
    kernel = sd[conv + ".weight"].transpose(2, 3, 1, 0).copy()
    out[f"{root}{path}/{conv_i}/conv2d/kernel{_TF2}"] = kernel
    out[f"{root}{path}/{conv_i}/conv2d/kernel/.OPTIMIZER_SLOT/optimizer/"
        f"Momentum{_TF2}"] = np.zeros_like(kernel)
    for var, value in _bn_vars(sd, bn).items():
      out[f"{root}{path}/{bn_i}/bn/{var}{_TF2}"] = value

  put("initial_conv_relu_max_pool", "conv1", "bn1", 0, 2)
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      block = f"block_groups/{i - 1}/layers/{j}/"
      if j == 0:
        put(block + "projection_layers", f"layer{i}.0.downsample.0",
            f"layer{i}.0.downsample.1", 0, 1)
      for k, (c, b) in enumerate(((0, 1), (3, 4), (6, 7)), start=1):
        put(block + "conv_relu_dropblock_layers", f"layer{i}.{j}.conv{k}",
            f"layer{i}.{j}.bn{k}", c, b)
      j += 1
  return out


@pytest.fixture(scope="module")
def rn50():
  return torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=21)


def _parity(variables, meta, model):
  ours = registry.create_model(meta["arch"], **meta["arch_options"]).apply(
      variables, _INPUT, train=False)["pre_logits"]
  with torch.no_grad():
    ref = model.features(torch.from_numpy(_INPUT.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


# --- the reader against TensorFlow-written bytes ------------------------------

@pytest.mark.parametrize("which,spec", [("tf1", tf_bundle_values.TF1_NAMES),
                                        ("tf2", tf_bundle_values.TF2_PATHS)])
def test_reader_matches_tensorflow_written_bundles(which, spec):
  index = tf_bundle.find_index(os.path.join(_FIXTURES, which))
  got = tf_bundle.read_bundle(index)
  expected = tf_bundle_values.expected(spec)
  if which == "tf2":
    expected = {k + _TF2: v for k, v in expected.items()}
  assert set(got) == set(expected)  # the string object graph is skipped
  for name, value in expected.items():
    assert got[name].shape == value.shape, name
    if value.dtype.name in ("float16", "bfloat16"):
      assert got[name].dtype == np.float32
    else:
      assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value.astype(got[name].dtype))


def test_find_index_accepts_prefix_directory_and_shard(tmp_path):
  tf1 = os.path.join(_FIXTURES, "tf1")
  index = os.path.join(tf1, "model.ckpt-7.index")
  assert tf_bundle.find_index(tf1) == index  # via the `checkpoint` file
  assert tf_bundle.find_index(os.path.join(tf1, "model.ckpt-7")) == index
  assert tf_bundle.find_index(index) == index
  assert tf_bundle.find_index(os.path.join(tf1, "model.ckpt-7.data-00000-of-00001")) == index
  assert tf_bundle.find_index(str(tmp_path)) is None
  not_a_table = tmp_path / "x.index"
  not_a_table.write_bytes(b"\x00" * 100)
  assert tf_bundle.find_index(str(not_a_table)) is None


def test_own_writer_agrees_with_tensorflow(tmp_path):
  """The test writer's bytes read back like TensorFlow's (same reader)."""
  tensors = {k: v for k, v in tf_bundle_values.expected(tf_bundle_values.TF1_NAMES).items()
             if v.dtype in _TF_DTYPES}
  index = write_bundle(str(tmp_path / "own"), tensors, strings=["_CHECKPOINTABLE_OBJECT_GRAPH"])
  got = tf_bundle.read_bundle(index)
  assert set(got) == set(tensors)
  ours = tf_bundle.read_bundle(os.path.join(_FIXTURES, "tf1", "model.ckpt-7.index"))
  for name in tensors:
    np.testing.assert_array_equal(got[name], ours[name])


def _copy_fixture(tmp_path):
  dst = tmp_path / "tf1"
  shutil.copytree(os.path.join(_FIXTURES, "tf1"), dst)
  return dst / "model.ckpt-7.index", dst / "model.ckpt-7.data-00000-of-00001"


def test_corrupt_data_names_the_tensor(tmp_path):
  index, data = _copy_fixture(tmp_path)
  raw = bytearray(data.read_bytes())
  raw[5] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(ConversionError, match="tensor '.*' fails its checksum"):
    tf_bundle.read_bundle(str(index))


def test_corrupt_or_truncated_index_is_one_line(tmp_path):
  index, data = _copy_fixture(tmp_path)
  raw = index.read_bytes()
  index.write_bytes(raw[:100] + bytes([raw[100] ^ 0x55]) + raw[101:])
  with pytest.raises(ConversionError, match="checksum"):
    tf_bundle.read_bundle(str(index))
  index.write_bytes(raw[:-10])
  with pytest.raises(ConversionError, match="no table magic"):
    tf_bundle.read_bundle(str(index))
  index.write_bytes(raw)
  data.write_bytes(data.read_bytes()[:-7])
  with pytest.raises(ConversionError, match="past the end"):
    tf_bundle.read_bundle(str(index))
  os.remove(data)
  with pytest.raises(ConversionError, match="data file .* is missing"):
    tf_bundle.read_bundle(str(index))


# --- SimCLR naming -> Flax ResNet-50, against PyTorch -------------------------

def test_simclr_v1_tf1_checkpoint(tmp_path, rn50):
  index = write_bundle(str(tmp_path / "model.ckpt-250228"), simclr_v1_tensors(rn50))
  out = str(tmp_path / "simclr.npz")
  variables, meta = convert_checkpoint(index, "resnet50", out)
  assert meta["source_format"] == "tf_bundle" and meta["prefix"] == "base_model."
  assert "head_supervised/linear_layer/dense/kernel" in meta["dropped_keys"]
  assert "global_step" in meta["dropped_keys"]
  assert not any("Momentum" in k for k in meta["dropped_keys"])
  assert os.path.exists(out)
  _parity(variables, meta, rn50)


def test_simclr_v2_tf2_checkpoint(tmp_path, rn50):
  index = write_bundle(str(tmp_path / "ckpt-1"), simclr_v2_tf2_tensors(rn50),
                       strings=["_CHECKPOINTABLE_OBJECT_GRAPH"])
  variables, meta = convert_checkpoint(index, "resnet50")
  assert meta["prefix"] == "resnet_model."
  assert "model/supervised_head/linear_layer/dense/kernel" + _TF2 in meta["dropped_keys"]
  _parity(variables, meta, rn50)


def test_prefix_path_asks_for_the_index(tmp_path):
  write_bundle(str(tmp_path / "model.ckpt-1"), {"global_step": np.array(1, np.int64)})
  with pytest.raises(ConversionError, match="pass its index file .*model.ckpt-1.index"):
    convert_checkpoint(str(tmp_path / "model.ckpt-1"), "resnet50")


def test_selective_kernel_and_wide_variants_are_refused(tmp_path):
  stem = {"base_model/conv2d/kernel": np.zeros((3, 3, 3, 32), np.float32)}
  index = write_bundle(str(tmp_path / "sk"), stem)
  with pytest.raises(ConversionError, match="selective-kernel .*sk1.* not supported"):
    convert_checkpoint(index, "resnet50")
  wide = {"base_model/conv2d/kernel": np.zeros((7, 7, 3, 128), np.float32)}
  index = write_bundle(str(tmp_path / "wide"), wide)
  with pytest.raises(ConversionError, match="width 2x .*only 1x"):
    convert_checkpoint(index, "resnet50")
  tf2 = {"model/resnet_model/initial_conv_relu_max_pool/4/conv2d/kernel" + _TF2:
         np.zeros((3, 3, 32, 64), np.float32)}
  index = write_bundle(str(tmp_path / "sk_tf2"), tf2)
  with pytest.raises(ConversionError, match="selective-kernel"):
    convert_checkpoint(index, "resnet50")


def test_not_simclr_names_what_it_found(tmp_path):
  index = write_bundle(str(tmp_path / "other"), {"dense/kernel": np.zeros((2, 2), np.float32)})
  with pytest.raises(ConversionError, match="without SimCLR's base_model/ .*dense/kernel"):
    convert_checkpoint(index, "resnet50")


def test_skip_leaves_tensors_unread(tmp_path):
  tensors = {"a/kernel": np.ones((2, 2), np.float32),
             "a/kernel/Momentum": np.zeros((2, 2), np.float32)}
  index = write_bundle(str(tmp_path / "s"), tensors)
  data = tmp_path / "s.data-00000-of-00001"
  raw = bytearray(data.read_bytes())
  raw[-1] ^= 0xFF  # corrupt the (sorted last) Momentum slot
  data.write_bytes(bytes(raw))
  got = tf_bundle.read_bundle(index, skip=lambda n: n.endswith("/Momentum"))
  assert list(got) == ["a/kernel"]
  with pytest.raises(ConversionError, match="'a/kernel/Momentum' fails its checksum"):
    tf_bundle.read_bundle(index)


def _crc32c_bitwise(data: bytes) -> int:
  """Textbook reflected CRC-32C, one bit at a time (independent reference)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("size", [0, 9, 4095, 4096 * 64 // 8 + 3, 70001])
def test_crc32c_against_bitwise_reference(size):
  data = b"123456789" if size == 9 else np.random.RandomState(size).bytes(size)
  assert tf_bundle.crc32c(data) == _crc32c_bitwise(data)
  if size == 9:
    assert tf_bundle.crc32c(data) == 0xE3069283  # the CRC-32C check value
