"""Torch-free checkpoint readers: PyTorch zip and legacy pickles, safetensors, npz.

PyTorch files are read with a restricted unpickler: only tensor/storage
rebuild functions, ``OrderedDict`` and NumPy's array reconstruction resolve to
real callables; every other global (``argparse.Namespace``, config classes,
``torch.device``...) becomes an inert placeholder, so reading a checkpoint
never runs code from it. Tensors are rebuilt as NumPy arrays honouring their
storage offset, size and stride; float16/bfloat16 become float32.

The format is sniffed from the file's bytes, not its extension.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from numpy._core import multiarray as _np_multiarray

from sslbench_jax.convert.errors import ConversionError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LOW_PRECISION = (np.float16, ml_dtypes.bfloat16)


class _Storage:
  """A typed storage whose bytes are attached after unpickling."""

  def __init__(self, dtype: Any, key: str, numel: int):
    self.dtype = np.dtype(dtype)
    self.key = key
    self.numel = int(numel)
    self.data: np.ndarray | None = None


class _StorageView:
  """Legacy-format view of a root storage (``view_metadata``)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, int(offset), int(numel)


class _LazyTensor:
  """``_rebuild_tensor_v2`` arguments, materialised once storages are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)

  def materialize(self) -> np.ndarray:
    storage, offset = self.storage, self.offset
    if isinstance(storage, _StorageView):
      offset += storage.offset
      storage = storage.root
    if not isinstance(storage, _Storage) or storage.data is None:
      raise ConversionError("tensor refers to a storage missing from the file")
    flat = storage.data
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, _widen(flat.dtype))
    if any(st < 0 for st in self.stride):
      raise ConversionError("tensor with negative strides is not supported")
    last = offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if offset < 0 or last >= flat.size:
      raise ConversionError(
          f"tensor needs storage element {last} but the storage has "
          f"{flat.size} (file truncated or corrupt)")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=self.size,
        strides=tuple(st * flat.itemsize for st in self.stride), writeable=False)
    return np.array(view, dtype=_widen(flat.dtype))


def _widen(dtype: np.dtype) -> np.dtype:
  return np.dtype(np.float32) if dtype in _LOW_PRECISION else dtype


class _Opaque:
  """Inert stand-in for any global the checkpoint references but we don't need."""

  def __new__(cls, *args, **kwargs):
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass

  def __setitem__(self, key, value):
    pass

  def append(self, value):
    pass

  def extend(self, values):
    pass


def _opaque_global(module: str, name: str) -> type:
  return type(f"Opaque[{module}.{name}]", (_Opaque,), {})


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


def _codecs_encode(text, encoding="utf-8"):
  return text.encode(encoding)


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray",
                  "numpy", "numpy.core.numeric", "numpy._core.numeric")
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set, ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
}
for _mod in _NUMPY_MODULES:
  # NumPy's own array pickling (VISSL/NPID checkpoints hold numpy arrays).
  _ALLOWED[(_mod, "_reconstruct")] = _np_multiarray._reconstruct  # pylint: disable=protected-access
  _ALLOWED[(_mod, "scalar")] = _np_multiarray.scalar
  _ALLOWED[(_mod, "ndarray")] = np.ndarray
  _ALLOWED[(_mod, "dtype")] = np.dtype


class _Unpickler(pickle.Unpickler):
  """Resolves only whitelisted globals; storages via ``persistent_load``."""

  def __init__(self, file: BinaryIO, storage_fn):
    super().__init__(file, encoding="latin1")
    self._storage_fn = storage_fn

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return ("storage_type", name)
    return _opaque_global(module, name)

  def persistent_load(self, pid: Any) -> Any:
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
      raise ConversionError(f"unsupported persistent id {str(pid)[:40]}")
    storage_type = pid[1]
    if not (isinstance(storage_type, tuple) and storage_type[0] == "storage_type"):
      raise ConversionError(f"unsupported storage type {storage_type!r}")
    return self._storage_fn(_STORAGE_DTYPES[storage_type[1]], pid[2:])


def _ascii(x: Any) -> Any:
  return x.decode("ascii") if isinstance(x, bytes) else x


def _materialize(obj: Any, depth: int = 0) -> Any:
  """Replaces every ``_LazyTensor`` in nested containers with its array."""
  if depth > 64:
    raise ConversionError("checkpoint nesting is too deep")
  if isinstance(obj, _LazyTensor):
    return obj.materialize()
  if isinstance(obj, dict):
    return {k: _materialize(v, depth + 1) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, depth + 1) for v in obj)
  if isinstance(obj, np.ndarray) and obj.dtype in _LOW_PRECISION:
    return obj.astype(np.float32)
  return obj


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ConversionError("zip archive without a single data.pkl")
    root = pkl[0][:-len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
      byteorder = archive.read(root + "byteorder").decode().strip()
    storages: dict[str, _Storage] = {}

    def storage_fn(dtype, args):
      key, _, numel = _ascii(args[0]), args[1], args[2]
      if key not in storages:
        storage = _Storage(dtype, key, numel)
        raw = archive.read(f"{root}data/{key}")
        dt = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        nbytes = storage.numel * dt.itemsize
        if len(raw) < nbytes:
          raise ConversionError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dt, count=storage.numel).astype(
            storage.dtype, copy=False)
        storages[key] = storage
      return storages[key]

    with archive.open(pkl[0]) as f:
      return _materialize(_Unpickler(f, storage_fn).load())


def _read_torch_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise ConversionError("pickle without the PyTorch magic number")
    pickle.load(f)  # protocol version
    sys_info = pickle.load(f)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise ConversionError("big-endian legacy checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def storage_fn(dtype, args):
      key, _, numel, view = _ascii(args[0]), args[1], args[2], args[3]
      if key not in storages:
        storages[key] = _Storage(dtype, key, numel)
      if view is not None:
        _, offset, view_numel = view
        return _StorageView(storages[key], offset, view_numel)
      return storages[key]

    result = _Unpickler(f, storage_fn).load()
    keys = pickle.load(f)
    for key in keys:
      storage = storages[_ascii(key)]
      header = f.read(8)
      if len(header) != 8:
        raise ConversionError("storage data is truncated")
      numel = struct.unpack("<q", header)[0]
      nbytes = numel * storage.dtype.itemsize
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise ConversionError("storage data is truncated")
      storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<"))
    return _materialize(result)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    raw = f.read()
  (header_len,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + header_len])
  data = memoryview(raw)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ConversionError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    start, end = info["data_offsets"]
    if end > len(data):
      raise ConversionError(f"tensor {name!r} lies past the end of the file "
                            "(file truncated)")
    array = np.frombuffer(data[start:end], dtype).reshape(info["shape"])
    out[name] = np.array(array, dtype=_widen(array.dtype.newbyteorder("=")))
  return out


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as z:
    return {k: np.array(z[k], dtype=_widen(z[k].dtype)) for k in z.files}


def sniff_format(path: str) -> str:
  """Names a file's format from its first bytes.

  Returns:
    One of ``"torch_zip"``, ``"torch_legacy"``, ``"safetensors"``, ``"npz"``.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: anything else (image, text, unknown binary).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except zipfile.BadZipFile as e:
      raise ConversionError(f"{path}: damaged zip archive ({e}); re-download "
                            "the checkpoint") from None
    if any(n.endswith("data.pkl") for n in names):
      return "torch_zip"
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    raise ConversionError(f"{path}: a zip archive that is neither a PyTorch "
                          "checkpoint nor an .npz")
  if head.startswith(b"\x80") and len(head) > 2:
    return "torch_legacy"
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  kind = _describe_non_checkpoint(head)
  raise ConversionError(f"{path} is not a checkpoint ({kind}); expected a "
                        ".pth/.pth.tar/.torch/.pt, .safetensors or .npz file")


def _describe_non_checkpoint(head: bytes) -> str:
  if not head:
    return "empty file"
  if head.startswith(b"\xff\xd8"):
    return "looks like a JPEG image"
  if head.startswith(b"\x89PNG"):
    return "looks like a PNG image"
  if head.startswith(b"\x1f\x8b"):
    return "gzip data: decompress it first"
  try:
    head.decode("utf-8")
    return "looks like a text file, e.g. an HTML error page from a failed download"
  except UnicodeDecodeError:
    return "unknown binary format"


def read_checkpoint(path: str) -> tuple[Any, str]:
  """Reads a checkpoint into nested dicts of NumPy arrays without torch.

  Args:
    path: a PyTorch file (zip or legacy format, any extension), a
      ``.safetensors`` or an ``.npz``.

  Returns:
    ``(obj, format)``: the unpickled object (tensors as float32/int NumPy
    arrays, unknown objects as inert placeholders) and the format name
    from ``sniff_format``.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: unreadable, truncated or not a checkpoint (one line).
  """
  fmt = sniff_format(path)
  reader = {"torch_zip": _read_torch_zip, "torch_legacy": _read_torch_legacy,
            "safetensors": _read_safetensors, "npz": _read_npz}[fmt]
  # Other frameworks' release formats; their modules import this one.
  from sslbench_jax.convert import haiku_pickle  # pylint: disable=import-outside-toplevel
  if fmt == "torch_legacy" and haiku_pickle.is_plain_pickle(path):
    fmt, reader = "haiku_pickle", haiku_pickle.read_byol_pickle
  try:
    return reader(path), fmt
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
          KeyError, ValueError, TypeError, IndexError, AttributeError,
          UnicodeDecodeError, OSError, RecursionError) as e:
    reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
    raise ConversionError(f"{path}: cannot read as {fmt} ({reason}); the file "
                          "is truncated or not a checkpoint") from None
