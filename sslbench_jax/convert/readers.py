"""Torch-free checkpoint readers: PyTorch zip and legacy pickles, safetensors, npz.

Untrusted files are data, never code. Every pickle the project reads (the
five pickles of a legacy PyTorch file, ``data.pkl`` of a zip file, and plain
pickles through ``load_pickle``) goes through one restricted unpickler whose
``find_class`` resolves an explicit allow-list to the reader's *own*
functions, never to the library callables named in the file:

* PyTorch tensor/parameter rebuilds (``_rebuild_tensor_v2`` and friends)
  record their arguments; ``_rebuild_from_type_v2`` only forwards to one of
  these, anything else it is given becomes a placeholder;
* ``collections.OrderedDict``, ``set``, ``frozenset``, ``slice``,
  ``torch.Size`` (as ``tuple``), and ``_codecs.encode`` for latin-1 text only;
* NumPy's array pickling (``_reconstruct``/``ndarray``/``dtype``/``scalar``/
  ``_frombuffer``) through validating builders: plain numeric, bool and
  fixed-width string dtypes only (object, structured and sub-array dtypes are
  refused), and the raw bytes must have exactly the declared size.

Every other global (``argparse.Namespace``, config classes, ``torch.device``,
``os.system``...) becomes an inert placeholder class: calling it, building it
or setting its state does nothing. Persistent ids are accepted only where the
format has storages and only in PyTorch's ``("storage", type, key, ...)``
shape. Tensors are rebuilt as NumPy arrays honouring their storage offset,
size and stride; float16/bfloat16 become float32.

Resource bounds: a storage must fit in the bytes the file has for it (legacy:
the rest of the file; zip: the entry's size), a zip entry may not inflate more
than ``_MAX_INFLATE_RATIO`` times its compressed size, and all materialised
tensors together may not exceed a small multiple of the file size (strided
views with zero strides could otherwise expand a tiny storage). Each violation
is a one-line ``ConversionError`` raised before the memory is allocated.

The format is sniffed from the file's bytes, not its extension.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

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
_LEGACY_PROTOCOL = 1001
_LOW_PRECISION = (np.float16, ml_dtypes.bfloat16)
# A zip entry may inflate at most this many times its compressed size (once
# it is larger than _INFLATE_FLOOR); PyTorch stores entries uncompressed.
_MAX_INFLATE_RATIO = 100
_INFLATE_FLOOR = 64 << 20
# All tensors of a file together may hold at most this many bytes per byte of
# file (float16 -> float32 widening doubles; views may share a storage), plus
# _MATERIALIZE_SLACK.
_MATERIALIZE_FACTOR = 4
_MATERIALIZE_SLACK = 256 << 20
_MAX_NESTING = 64
_MAX_SAFETENSORS_HEADER = 100 << 20
# NumPy dtype kinds a pickle may rebuild: bool, ints, floats, complex, bytes, str.
_NUMPY_KINDS = "biufcSU"
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_LATIN1 = ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1")


class _Inert:
  """Base of the reader's own objects: state from the pickle is refused.

  ``BUILD`` on any object calls its ``__setstate__``; without this, a pickle
  could overwrite attributes (even ``__class__``) of the reader's objects.
  """

  def __setstate__(self, state: Any) -> None:
    raise ConversionError(f"pickle sets state on a {type(self).__name__}")


class _Storage(_Inert):
  """A typed storage whose bytes are attached after unpickling."""

  def __init__(self, dtype: Any, key: str, numel: int):
    self.dtype = np.dtype(dtype)
    self.key = key
    self.numel = numel
    self.data: np.ndarray | None = None


class _StorageView(_Inert):
  """Legacy-format view of a root storage (``view_metadata``)."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel


def _int(value: Any, what: str) -> int:
  """``value`` if it is a plain int (bools and placeholders are refused)."""
  if type(value) is not int:  # pylint: disable=unidiomatic-typecheck
    raise ConversionError(f"{what} is a {type(value).__name__}, not an int")
  return value


def _ints(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)):
    raise ConversionError(f"{what} is a {type(values).__name__}, not a tuple")
  return tuple(_int(v, what) for v in values)


class _Budget:
  """Bytes the materialised arrays of one file may still take."""

  def __init__(self, file_bytes: int):
    self.file_bytes = file_bytes
    self.left = _MATERIALIZE_FACTOR * file_bytes + _MATERIALIZE_SLACK

  def take(self, nbytes: int, what: str) -> None:
    if nbytes > self.left:
      raise ConversionError(
          f"{what} would take {nbytes} bytes, more than a {self.file_bytes}-byte "
          "file can hold (corrupt or malicious sizes)")
    self.left -= nbytes


class _LazyTensor(_Inert):
  """``_rebuild_tensor_v2`` arguments, materialised once storages are read."""

  def __init__(self, storage, offset, size, stride):
    self.storage = storage
    self.offset = _int(offset, "tensor storage offset")
    self.size = _ints(size, "tensor size")
    self.stride = _ints(stride, "tensor stride")
    if len(self.size) != len(self.stride):
      raise ConversionError(f"tensor size {self.size} and stride {self.stride} "
                            "differ in length")
    if any(n < 0 for n in self.size) or any(st < 0 for st in self.stride):
      raise ConversionError(f"tensor with negative size {self.size} or stride "
                            f"{self.stride}")

  def materialize(self, budget: _Budget) -> np.ndarray:
    storage, offset = self.storage, self.offset
    if isinstance(storage, _StorageView):
      offset += storage.offset
      storage = storage.root
    if not isinstance(storage, _Storage) or storage.data is None:
      raise ConversionError("tensor refers to a storage missing from the file")
    flat = storage.data
    dtype = _widen(flat.dtype)
    budget.take(math.prod(self.size) * dtype.itemsize,
                f"tensor of size {self.size}")
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, dtype)
    last = offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if offset < 0 or last >= flat.size:
      raise ConversionError(
          f"tensor needs storage element {last} but the storage has "
          f"{flat.size} (file truncated or corrupt)")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=self.size,
        strides=tuple(st * flat.itemsize for st in self.stride), writeable=False)
    return np.array(view, dtype=dtype)


def _widen(dtype: np.dtype) -> np.dtype:
  return np.dtype(np.float32) if dtype in _LOW_PRECISION else np.dtype(dtype)


class _Opaque:
  """Inert stand-in for any global the checkpoint references but we don't need.

  Calling the placeholder class, ``BUILD``, ``SETITEMS`` and ``APPENDS`` on
  its instances are all accepted and do nothing.
  """

  global_name = "?"

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

  def __repr__(self) -> str:
    return f"<placeholder for {self.global_name}>"


def _opaque_global(module: str, name: str) -> type:
  full = f"{module}.{name}"[:200]
  return type("Placeholder", (_Opaque,), {"global_name": full})


def is_placeholder(obj: Any) -> bool:
  """Whether ``obj`` is an inert stand-in for a global a pickle referenced.

  The readers return such placeholders (instances, or the class itself when
  the pickle only named it) for every class or function outside the
  allow-list, e.g. an ``argparse.Namespace`` of training arguments.
  """
  return isinstance(obj, _Opaque) or (isinstance(obj, type) and
                                      issubclass(obj, _Opaque))


class _OrderedDict(collections.OrderedDict):
  """``OrderedDict`` whose pickled attribute state (``_metadata``) is dropped."""

  def __setstate__(self, state):
    pass


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_REBUILDS = (_rebuild_tensor_v2, _rebuild_parameter)


def _rebuild_from_type_v2(func, new_type, args, state):
  # PyTorch calls ``func(*args)``; here ``func`` may only be one of our own
  # rebuilds (an allow-listed name resolved by ``find_class``).
  if any(func is f for f in _REBUILDS) and isinstance(args, tuple):
    return func(*args)
  return _opaque_global("torch._tensor", "_rebuild_from_type_v2")()


def _codecs_encode(text, encoding="latin1"):
  # Protocol-2 pickles spell bytes as ``_codecs.encode(str, "latin1")``; only
  # that codec is honoured (a codec lookup may import a module by name).
  if not isinstance(text, str) or not isinstance(encoding, str) or \
      encoding.lower() not in _LATIN1:
    raise ConversionError(f"pickle encodes text with codec {str(encoding)[:20]!r}")
  return text.encode("latin1")


def _bytes(*args):
  # Protocol-2 pickles spell ``b""`` as ``bytes()``; ``bytes(n)`` would allocate
  # ``n`` bytes, so only the empty call and a copy of bytes are honoured.
  if not args:
    return b""
  if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
    return bytes(args[0])
  raise ConversionError("pickle calls bytes() with arguments")


def _bytearray(*args):
  return bytearray(_bytes(*args))


class _NDArrayToken(_Inert):
  """What ``numpy.ndarray`` resolves to: an argument, never callable."""


_NDARRAY = _NDArrayToken()


class _PendingDtype(_Inert):
  """``numpy.dtype(obj, align, copy)`` + its ``BUILD`` state, checked."""

  def __init__(self, obj=None, align=False, copy=False):
    self.obj, self.state = obj, None

  def __setstate__(self, state):
    self.state = state

  def resolve(self) -> np.dtype:
    if not isinstance(self.obj, str) or len(self.obj) > 8:
      raise ConversionError(f"pickled NumPy dtype {str(self.obj)[:20]!r} is not allowed")
    try:
      dtype = np.dtype(self.obj)
    except TypeError:
      raise ConversionError(f"unknown pickled NumPy dtype {self.obj!r}") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
      raise ConversionError(f"pickled NumPy dtype {self.obj!r} is not allowed "
                            "(numeric, bool and string dtypes only)")
    state = self.state
    if state is None:
      return dtype
    if not isinstance(state, tuple) or len(state) < 5 or \
        any(s is not None for s in state[2:5]):
      raise ConversionError("structured or sub-array NumPy dtypes are not allowed")
    endian = state[1]
    if endian not in ("<", ">", "|", "="):
      raise ConversionError(f"pickled NumPy dtype with byte order {str(endian)[:8]!r}")
    if dtype.kind in "SU" and len(state) >= 6:
      # Flexible dtypes carry their item size in the state, not in ``obj``.
      elsize = _int(state[5], "dtype item size")
      if dtype.kind == "U":
        elsize //= 4
      dtype = np.dtype(f"{dtype.kind}{elsize}")
    return dtype.newbyteorder(endian) if endian in "<>" else dtype


def _dtype_of(value: Any) -> np.dtype:
  if isinstance(value, _PendingDtype):
    return value.resolve()
  raise ConversionError(f"expected a pickled NumPy dtype, got {type(value).__name__}")


def _py2_bytes(data: Any) -> Any:
  # Python 2 pickles hold byte strings as ``str``; read with latin-1 (as every
  # pickle here is), they come back as text whose code points are the bytes.
  return data.encode("latin1") if isinstance(data, str) else data


def _array_from_bytes(data: Any, dtype: np.dtype, shape: tuple[int, ...],
                      order: str) -> np.ndarray:
  data = _py2_bytes(data)
  if not isinstance(data, (bytes, bytearray)):
    raise ConversionError(f"NumPy array data is a {type(data).__name__}, not bytes")
  if any(n < 0 for n in shape):
    raise ConversionError(f"NumPy array with negative shape {shape}")
  nbytes = math.prod(shape) * dtype.itemsize
  if len(data) != nbytes:
    raise ConversionError(f"NumPy array of shape {shape} and dtype {dtype} needs "
                          f"{nbytes} bytes, the pickle has {len(data)}")
  array = np.frombuffer(data, dtype).reshape(shape, order="F" if order == "F" else "C")
  return np.array(array, dtype=dtype.newbyteorder("="), order="C")


class _PendingArray(_Inert):
  """``numpy._reconstruct(ndarray, ...)``; the array comes with its ``BUILD``."""

  def __init__(self):
    self.array: np.ndarray | None = None

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) not in (4, 5) or \
        self.array is not None:
      raise ConversionError("malformed NumPy array state in the pickle")
    shape, dtype, fortran, data = state[-4:]
    self.array = _array_from_bytes(data, _dtype_of(dtype), _ints(shape, "array shape"),
                                   "F" if fortran is True else "C")


def _np_reconstruct(cls, shape, typecode):
  if cls is not _NDARRAY:
    raise ConversionError("pickle reconstructs a NumPy array of a non-ndarray class")
  return _PendingArray()


def _np_scalar(dtype, data=None):
  dtype = _dtype_of(dtype)
  data = _py2_bytes(data)
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise ConversionError(f"malformed pickled NumPy scalar of dtype {dtype}")
  return np.frombuffer(data, dtype)[0]


def _np_frombuffer(buf, dtype, shape, order):
  return _array_from_bytes(buf, _dtype_of(dtype), _ints(shape, "array shape"), order)


_NUMPY_ALLOWED: dict[tuple[str, str], Any] = {}
for _mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray",
             "numpy.core.numeric", "numpy._core.numeric"):
  _NUMPY_ALLOWED.update({
      (_mod, "_reconstruct"): _np_reconstruct, (_mod, "scalar"): _np_scalar,
      (_mod, "ndarray"): _NDARRAY, (_mod, "dtype"): _PendingDtype,
      (_mod, "_frombuffer"): _np_frombuffer,
  })
_PLAIN_ALLOWED = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): _bytes, ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray, ("__builtin__", "bytearray"): _bytearray,
    ("_codecs", "encode"): _codecs_encode,
    **_NUMPY_ALLOWED,
}
_TORCH_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    **_PLAIN_ALLOWED,
}


class _StorageType(_Inert):
  """What ``torch.FloatStorage`` etc. resolve to: an argument, never callable."""

  def __init__(self, name: str):
    self.name = name


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


def _refuse_extension(unused_self):
  raise ConversionError("pickle uses an extension-registry opcode (EXT1/2/4); "
                        "refused")


def _load_build(self):
  # ``BUILD`` sets state on the object below it: with the default behaviour
  # a pickle could set attributes of the reader's own classes and functions
  # (``setattr(_Budget, "take", ...)``, a function's ``__defaults__``) and so
  # change how later files in this process are read. Only the reader's own
  # instances (of this project's classes, e.g. placeholders, pending arrays,
  # a subclass's records), whose ``__setstate__`` checks or ignores the state,
  # take it.
  state = self.stack.pop()
  inst = self.stack[-1]
  cls = type(inst)
  if isinstance(inst, type) or not cls.__module__.startswith("sslbench_jax.") or \
      getattr(cls, "__setstate__", None) is None:
    raise ConversionError(f"pickle sets state on a {cls.__name__}")
  inst.__setstate__(state)


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The one restricted unpickler: allow-listed globals, checked storages.

  Built on the pure-Python unpickler so that its opcode table can be changed:
  the EXT opcodes resolve globals through ``copyreg``'s process-wide
  extension cache, which the C unpickler consults *before* ``find_class`` (a
  global any code in the process once loaded by code would come back as the
  real object), so they are refused outright; ``BUILD`` is limited to the
  reader's own instances (``_load_build``). PyTorch's pickles hold no tensor
  data (storages are separate), so the slower unpickler costs little.

  Args:
    file: binary file positioned at a pickle.
    storage_fn: ``(dtype, pid[2:]) -> storage`` for PyTorch persistent ids, or
      ``None`` where the format has no storages (any persistent id fails).
    torch: whether PyTorch's rebuild functions and storage types resolve.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access
  for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
    dispatch[_op[0]] = _refuse_extension
  del _op
  dispatch[pickle.BUILD[0]] = _load_build

  def __init__(self, file: BinaryIO, storage_fn=None, torch: bool = True):
    super().__init__(file, encoding="latin1")
    self._storage_fn = storage_fn
    self._allowed = _TORCH_ALLOWED if torch else _PLAIN_ALLOWED
    self._torch = torch

  def find_class(self, module: str, name: str) -> Any:
    found = self._allowed.get((module, name))
    if found is not None:
      return found
    if self._torch and module == "torch" and name in _STORAGE_TYPES:
      return _STORAGE_TYPES[name]
    return _opaque_global(str(module), str(name))

  def persistent_load(self, pid: Any) -> Any:
    if self._storage_fn is None:
      raise ConversionError("pickle refers to external data (persistent id) "
                            "where the format has none")
    if not isinstance(pid, tuple) or len(pid) < 5 or _ascii(pid[0]) != "storage":
      raise ConversionError(f"unsupported persistent id {str(pid)[:40]}")
    storage_type = pid[1]
    if not isinstance(storage_type, _StorageType):
      raise ConversionError(f"unsupported storage type {str(storage_type)[:40]}")
    key = _ascii(pid[2])
    if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
      raise ConversionError(f"malformed storage key {str(key)[:40]!r}")
    numel = _int(pid[4], f"size of storage {key}")
    if numel < 0:
      raise ConversionError(f"storage {key} has negative size {numel}")
    return self._storage_fn(_STORAGE_DTYPES[storage_type.name], key, numel, pid[5:])


def _ascii(x: Any) -> Any:
  return x.decode("ascii") if isinstance(x, bytes) else x


def _materialize(obj: Any, budget: _Budget) -> Any:
  """Replaces every pending tensor/array in nested containers with its array.

  Shared sub-objects are converted once (memo by identity), so a pickle that
  references one list from many places cannot blow up exponentially.
  """
  memo: dict[int, Any] = {}
  active: set[int] = set()

  def walk(x: Any, depth: int) -> Any:
    if depth > _MAX_NESTING:
      raise ConversionError("checkpoint nesting is too deep")
    if not isinstance(x, (_LazyTensor, _PendingArray, dict, list, tuple, np.ndarray)):
      return x
    if id(x) in memo:
      return memo[id(x)]
    if id(x) in active:
      raise ConversionError("checkpoint contains a reference cycle")
    active.add(id(x))
    if isinstance(x, _LazyTensor):
      out = x.materialize(budget)
    elif isinstance(x, _PendingArray):
      if x.array is None:
        raise ConversionError("pickled NumPy array without its data")
      budget.take(x.array.nbytes, f"array of shape {x.array.shape}")
      out = _widen_array(x.array)
    elif isinstance(x, np.ndarray):
      out = _widen_array(x)
    elif isinstance(x, dict):
      out = {k: walk(v, depth + 1) for k, v in x.items()}
    else:
      items = [walk(v, depth + 1) for v in x]
      out = tuple(items) if isinstance(x, tuple) else items
    active.discard(id(x))
    memo[id(x)] = out
    return out

  return walk(obj, 0)


def _widen_array(array: np.ndarray) -> np.ndarray:
  return array.astype(np.float32) if array.dtype in _LOW_PRECISION else array


def _load(f: BinaryIO, what: str, storage_fn=None, torch: bool = True) -> Any:
  try:
    return _Unpickler(f, storage_fn, torch).load()
  except ConversionError as e:
    raise ConversionError(f"{what}: {e}") from None


def load_pickle(source: str | os.PathLike | bytes | BinaryIO) -> Any:
  """Reads an untrusted pickle of NumPy arrays and plain containers; runs no code.

  The same restricted unpickler as the checkpoint readers, without PyTorch's
  names: dicts, lists, tuples, sets, ``OrderedDict`` (returned as ``dict``),
  str/bytes/numbers, and NumPy arrays, scalars and dtypes (numeric, bool and
  fixed-width string dtypes). Any other global the pickle names becomes an
  inert placeholder (see ``is_placeholder``); nothing from the pickle is ever
  imported or called, persistent ids are refused, and arrays may not exceed a
  small multiple of the pickle's size in total.

  Args:
    source: a path, the pickle's bytes, or a binary file positioned at it.

  Returns:
    The unpickled object; NumPy float16/bfloat16 arrays come back as float32.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: not a pickle, truncated, malformed or over the bounds (one
      line naming the source when it is a path).
  """
  name = "pickle"
  if isinstance(source, (bytes, bytearray)):
    f: BinaryIO = io.BytesIO(source)
    size, close = len(source), True
  elif isinstance(source, (str, os.PathLike)):
    name = os.fspath(source)
    if not os.path.isfile(name):
      raise FileNotFoundError(f"pickle {name} does not exist")
    f, size, close = open(name, "rb"), os.path.getsize(name), True
  else:
    f, close = source, False
    try:
      size = os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
      size = len(f.getbuffer()) if isinstance(f, io.BytesIO) else 0
  try:
    return _guarded(name, "pickle",
                    lambda: _materialize(_Unpickler(f, None, torch=False).load(),
                                         _Budget(size)))
  finally:
    if close:
      f.close()


def _entry_checked(archive: zipfile.ZipFile, name: str, archive_bytes: int
                   ) -> zipfile.ZipInfo:
  info = archive.getinfo(name)
  if info.compress_size > archive_bytes:
    raise ConversionError(f"zip entry {name} claims {info.compress_size} bytes, more "
                          "than the whole file (truncated or corrupt)")
  if info.file_size > _INFLATE_FLOOR and \
      info.file_size > _MAX_INFLATE_RATIO * max(info.compress_size, 1):
    raise ConversionError(
        f"zip entry {name} would inflate from {info.compress_size} to "
        f"{info.file_size} bytes (more than {_MAX_INFLATE_RATIO}x: a zip bomb?); "
        "refused")
  return info


def _read_torch_zip(path: str) -> Any:
  file_bytes = os.path.getsize(path)
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ConversionError("zip archive without a single data.pkl")
    for name in names:  # before anything is inflated
      _entry_checked(archive, name, file_bytes)
    root = pkl[0][:-len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
      with archive.open(root + "byteorder") as f:
        byteorder = f.read(16).decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise ConversionError(f"unknown byteorder {byteorder[:16]!r}")
    storages: dict[str, _Storage] = {}
    # Entries under _INFLATE_FLOOR skip the ratio check; together they may not
    # inflate past this either (many small bombs).
    inflate_left = [_INFLATE_FLOOR + _MAX_INFLATE_RATIO * file_bytes]

    def storage_fn(dtype, key, numel, unused_rest):
      if key not in storages:
        storage = _Storage(dtype, key, numel)
        entry = f"{root}data/{key}"
        if entry not in names:
          raise ConversionError(f"storage {key} is missing from the archive")
        dt = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        nbytes = numel * dt.itemsize
        size = archive.getinfo(entry).file_size
        if nbytes > size:
          raise ConversionError(f"storage {key} declares {nbytes} bytes but its "
                                f"entry has {size} (truncated or corrupt)")
        inflate_left[0] -= nbytes
        if inflate_left[0] < 0:
          raise ConversionError(
              f"storages would inflate to more than {_MAX_INFLATE_RATIO}x the "
              f"{file_bytes}-byte archive (a zip bomb?); refused at storage {key}")
        with archive.open(entry) as f:
          raw = f.read(nbytes)  # never more than declared and checked
        if len(raw) < nbytes:
          raise ConversionError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dt, count=numel).astype(
            storage.dtype, copy=False)
        storages[key] = storage
      elif storages[key].dtype != np.dtype(dtype) or storages[key].numel != numel:
        raise ConversionError(f"storage {key} is declared twice differently")
      return storages[key]

    with archive.open(pkl[0]) as f:
      obj = _load(f, "data.pkl", storage_fn)
    return _materialize(obj, _Budget(file_bytes))


def _read_torch_legacy(path: str) -> Any:
  file_bytes = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = _load(f, "magic-number pickle")
    if type(magic) is not int or magic != _LEGACY_MAGIC:  # pylint: disable=unidiomatic-typecheck
      raise ConversionError("pickle without the PyTorch magic number")
    protocol = _load(f, "protocol-version pickle")
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:  # pylint: disable=unidiomatic-typecheck
      raise ConversionError(f"unsupported legacy protocol version {str(protocol)[:40]}")
    sys_info = _load(f, "sys-info pickle")
    if not isinstance(sys_info, dict):
      raise ConversionError(f"sys-info pickle holds a {type(sys_info).__name__}, "
                            "not a dict")
    if not sys_info.get("little_endian", True):
      raise ConversionError("big-endian legacy checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def storage_fn(dtype, key, numel, rest):
      if len(rest) != 1:
        raise ConversionError(f"malformed legacy persistent id for storage {key}")
      view = rest[0]
      if key not in storages:
        storages[key] = _Storage(dtype, key, numel)
      elif storages[key].dtype != np.dtype(dtype) or storages[key].numel != numel:
        raise ConversionError(f"storage {key} is declared twice differently")
      if view is not None:
        if not isinstance(view, tuple) or len(view) != 3:
          raise ConversionError(f"malformed view of storage {key}")
        offset = _int(view[1], "view offset")
        view_numel = _int(view[2], "view size")
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
          raise ConversionError(f"view [{offset}, {offset + view_numel}) lies "
                                f"outside storage {key} of {numel} elements")
        return _StorageView(storages[key], offset, view_numel)
      return storages[key]

    result = _load(f, "main pickle", storage_fn)
    keys = _load(f, "storage-keys pickle")
    if not isinstance(keys, list) or not all(
        isinstance(_ascii(k), str) for k in keys):
      raise ConversionError("storage-keys pickle is not a list of names")
    for key in keys:
      key = _ascii(key)
      if key not in storages:
        raise ConversionError(f"storage {key[:40]!r} is listed but no tensor uses it")
      storage = storages[key]
      header = f.read(8)
      if len(header) != 8:
        raise ConversionError("storage data is truncated")
      numel = struct.unpack("<q", header)[0]
      if numel != storage.numel:
        raise ConversionError(f"storage {key} holds {numel} elements, its tensors "
                              f"declare {storage.numel}")
      nbytes = numel * storage.dtype.itemsize
      left = file_bytes - f.tell()
      if nbytes > left:  # checked before the read allocates ``nbytes``
        raise ConversionError(f"storage {key} declares {nbytes} bytes but only "
                              f"{left} remain in the file (truncated or corrupt)")
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise ConversionError("storage data is truncated")
      storage.data = np.frombuffer(raw, storage.dtype.newbyteorder("<"))
    return _materialize(result, _Budget(file_bytes))


def _safetensors_header(f: BinaryIO, file_bytes: int) -> tuple[dict[str, Any], int]:
  head = f.read(8)
  if len(head) != 8:
    raise ConversionError("safetensors file shorter than its 8-byte header length")
  (header_len,) = struct.unpack("<Q", head)
  if header_len > file_bytes - 8 or header_len > _MAX_SAFETENSORS_HEADER:
    raise ConversionError(f"safetensors header length {header_len} exceeds the "
                          f"{file_bytes}-byte file")
  try:
    header = json.loads(f.read(header_len))
  except (ValueError, UnicodeDecodeError) as e:
    raise ConversionError(f"safetensors header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise ConversionError("safetensors header is not a JSON object")
  return header, 8 + header_len


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  file_bytes = os.path.getsize(path)
  with open(path, "rb") as f:
    header, start_of_data = _safetensors_header(f, file_bytes)
    data_bytes = file_bytes - start_of_data
    entries = []
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
        raise ConversionError(f"tensor {name!r}: malformed header entry")
      if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"tensor {name!r} has unsupported dtype "
                              f"{str(info.get('dtype'))[:20]}")
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      shape = _ints(info.get("shape"), f"shape of tensor {name!r}")
      if any(n < 0 for n in shape):
        raise ConversionError(f"tensor {name!r} has negative dimensions {shape}")
      offsets = _ints(info.get("data_offsets"), f"data_offsets of tensor {name!r}")
      if len(offsets) != 2 or offsets[0] < 0 or offsets[1] < offsets[0]:
        raise ConversionError(f"tensor {name!r} has invalid data_offsets {offsets}")
      nbytes = math.prod(shape) * dtype.itemsize
      if offsets[1] - offsets[0] != nbytes:
        raise ConversionError(f"tensor {name!r}: data_offsets {offsets} span "
                              f"{offsets[1] - offsets[0]} bytes, {info['dtype']} "
                              f"{list(shape)} needs {nbytes}")
      entries.append((offsets[0], offsets[1], name, dtype, shape))
    # The format is a dense concatenation: sorted by offset, each tensor starts
    # where the previous ends (no overlap, no gap) and the last ends the file.
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for start, end, name, _, _ in entries:
      if start != position:
        kind = "overlaps another tensor" if start < position else "leaves a gap"
        raise ConversionError(f"tensor {name!r} at bytes [{start}, {end}) {kind}")
      position = end
    if position > data_bytes:
      raise ConversionError(f"tensors need {position} data bytes, the file has "
                            f"{data_bytes} (file truncated)")
    if position != data_bytes:
      raise ConversionError(f"{data_bytes - position} bytes after the last tensor")
    out = {}
    for start, end, name, dtype, shape in sorted(entries, key=lambda e: e[2]):
      f.seek(start_of_data + start)
      buf = bytearray(end - start)  # the one copy of the data (writeable)
      if f.readinto(buf) != len(buf):
        raise ConversionError(f"tensor {name!r} is truncated")
      array = np.frombuffer(buf, dtype).reshape(shape)
      out[name] = array.astype(_widen(dtype.newbyteorder("=")), copy=False)
    return out


def check_npz(path: str) -> None:
  """Checks an ``.npz``'s declared sizes before NumPy reads it.

  NumPy allocates each member's declared shape up front and inflates whole
  members, so this is checked first: no zip bomb (the entry ratios and totals
  of ``_read_torch_zip``), each ``.npy`` header's shape x itemsize within the
  member's size, no object dtype.

  Raises:
    ConversionError: one line naming the member.
  """
  file_bytes = os.path.getsize(path)
  left = _INFLATE_FLOOR + _MAX_INFLATE_RATIO * file_bytes
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      _entry_checked(archive, info.filename, file_bytes)
      with archive.open(info) as f:
        try:
          version = np.lib.format.read_magic(f)
          header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
          shape, _, dtype = header(f)
        except ValueError as e:
          raise ConversionError(f"member {info.filename}: not an .npy array "
                                f"({str(e).splitlines()[0][:80]})") from None
      if dtype.hasobject:
        raise ConversionError(f"member {info.filename} holds Python objects")
      nbytes = math.prod(shape) * dtype.itemsize
      if nbytes > info.file_size:
        raise ConversionError(f"member {info.filename} declares {nbytes} bytes but "
                              f"holds {info.file_size} (truncated or corrupt)")
      left -= nbytes
      if left < 0:
        raise ConversionError(f"members would inflate to more than "
                              f"{_MAX_INFLATE_RATIO}x the {file_bytes}-byte archive "
                              f"(a zip bomb?); refused at {info.filename}")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  check_npz(path)
  with np.load(path, allow_pickle=False) as z:
    return {k: _widen_array(z[k]) for k in z.files}


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


def _guarded(path: str, fmt: str, read) -> Any:
  """``read()`` with every failure turned into one ``ConversionError`` line."""
  try:
    return read()
  except ConversionError as e:
    raise ConversionError(f"{path}: {e}") from None
  except MemoryError:
    raise ConversionError(f"{path}: out of memory reading it as {fmt} (sizes in "
                          "the file are corrupt, or it is too large)") from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error,
          KeyError, ValueError, TypeError, IndexError, AttributeError,
          UnicodeDecodeError, OSError, RecursionError, OverflowError) as e:
    reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
    raise ConversionError(f"{path}: cannot read as {fmt} ({reason}); the file "
                          "is truncated or not a checkpoint") from None


def read_checkpoint(path: str) -> tuple[Any, str]:
  """Reads a checkpoint into nested dicts of NumPy arrays without torch.

  Args:
    path: a PyTorch file (zip or legacy format, any extension), a
      ``.safetensors`` or an ``.npz``.

  Returns:
    ``(obj, format)``: the unpickled object (tensors as float32/int NumPy
    arrays, unknown objects as inert placeholders, see ``is_placeholder``)
    and the format name from ``sniff_format``.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: unreadable, truncated, over the resource bounds, or not
      a checkpoint (one line naming the file).
  """
  # Other frameworks' release formats; their modules import this one.
  from sslbench_jax.convert import haiku_pickle, simclr_keys, tf_bundle  # pylint: disable=import-outside-toplevel
  index = tf_bundle.find_index(path)
  if index is not None:
    if not os.path.isfile(path):
      raise ConversionError(f"{path} is a TensorFlow checkpoint: pass its index "
                            f"file {index}")
    return _guarded(path, "tf_bundle", lambda: simclr_keys.read_simclr(index)), \
        "tf_bundle"
  fmt = sniff_format(path)
  reader = {"torch_zip": _read_torch_zip, "torch_legacy": _read_torch_legacy,
            "safetensors": _read_safetensors, "npz": _read_npz}[fmt]
  if fmt == "torch_legacy" and haiku_pickle.is_plain_pickle(path):
    fmt, reader = "haiku_pickle", haiku_pickle.read_byol_pickle
  return _guarded(path, fmt, lambda: reader(path)), fmt
