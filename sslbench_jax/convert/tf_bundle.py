"""TensorFlow checkpoints (tensor bundles) read without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus ``PREFIX.data-SSSSS-of-NNNNN``.
The ``.index`` is a LevelDB-format table (TensorFlow's ``lib/io/table``):
blocks of prefix-compressed entries with restart points, each block followed
by a 1-byte compression type and a masked CRC-32C, an index block of
``BlockHandle``s (varint offset, varint size) and a 48-byte footer ending in
the magic ``0xdb4775248b80fb57``. Its entries map tensor names to serialized
``BundleEntryProto`` (dtype, shape, shard_id, offset, size, crc32c), the
empty key to the ``BundleHeaderProto`` (num_shards, endianness). Tensor
bytes are raw little-endian at ``offset`` in their shard, checked against the
entry's masked CRC-32C.

Everything is bounds-checked; any inconsistency raises ``ConversionError``
with one line naming the file and the offending entry. Only numeric dtypes
are returned; string tensors (the object graph of TF2 checkpoints) are
skipped, partitioned (sliced) variables refused.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import struct
from typing import Callable

from absl import logging
import ml_dtypes
import numpy as np

from sslbench_jax.convert.errors import ConversionError

_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_TRAILER = 5  # compression type byte + masked crc32c
_MAX_INDEX_BYTES = 1 << 30
# tensorflow/core/framework/types.proto
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16,
           6: np.int8, 9: np.int64, 10: np.bool_, 14: ml_dtypes.bfloat16,
           17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_DT_STRING = 7
_DATA_FILE = re.compile(r"^(.*)\.data-\d{5}-of-\d{5}$")

# CRC-32C (Castagnoli), reflected polynomial.
_POLY = 0x82F63B78


def _make_table() -> np.ndarray:
  table = np.zeros(256, np.uint32)
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ _POLY if c & 1 else c >> 1
    table[i] = c
  return table


_TABLE = _make_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _register(data: bytes | memoryview, reg: int) -> int:
  """Raw CRC-32C register update over ``data`` (no pre/post inversion)."""
  table = _TABLE_LIST
  for b in bytes(data):
    reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
  return reg


def _apply(cols: tuple[int, ...], v: int) -> int:
  """GF(2) matrix (given by its columns) times the bit vector ``v``."""
  out, i = 0, 0
  while v:
    if v & 1:
      out ^= cols[i]
    v >>= 1
    i += 1
  return out


def _square(cols: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(_apply(cols, c) for c in cols)


@functools.lru_cache(maxsize=None)
def _byte_power(k: int) -> tuple[int, ...]:
  """The operator advancing a register over 2**k zero bytes."""
  if k == 0:
    one_bit = tuple((_POLY if i == 0 else 0) ^ ((1 << i) >> 1) for i in range(32))
    op = one_bit
    for _ in range(3):  # 8 zero bits
      op = _square(op)
    return op
  return _square(_byte_power(k - 1))


def _zeros_operator(n: int) -> tuple[int, ...]:
  """Columns of the GF(2) 32x32 matrix advancing a register over n zero bytes."""
  result = tuple(1 << i for i in range(32))
  k = 0
  while n:
    if n & 1:
      power = _byte_power(k)
      result = tuple(_apply(power, c) for c in result)
    n >>= 1
    k += 1
  return result


def _advance(cols: tuple[int, ...], v: np.ndarray) -> np.ndarray:
  """Applies a ``_zeros_operator`` to every register in ``v``."""
  out = np.zeros_like(v)
  for i, col in enumerate(cols):
    out ^= np.where((v >> np.uint32(i)) & np.uint32(1), np.uint32(col), np.uint32(0))
  return out


def crc32c(data: bytes | memoryview) -> int:
  """CRC-32C of ``data``.

  Large buffers run as many parallel lanes (one NumPy table lookup per byte
  position for all lanes), whose registers are then merged pairwise: the
  register after ``A + B`` is ``advance(reg(A), len(B)) ^ reg(B)``.
  """
  buf = np.frombuffer(data, np.uint8)
  lanes = 1 << 16
  while lanes > 1 and buf.size < 64 * lanes:
    lanes >>= 1
  if lanes < 64:
    return _register(buf.tobytes(), 0xFFFFFFFF) ^ 0xFFFFFFFF
  chunk = buf.size // lanes
  # (position, lane), contiguous per position
  body = np.ascontiguousarray(buf[:chunk * lanes].reshape(lanes, chunk).T)
  reg = np.zeros(lanes, np.uint32)
  index = np.empty(lanes, np.uint32)
  for row in body:  # every lane's register from zero, all lanes at once
    np.bitwise_xor(reg, row, out=index)
    index &= np.uint32(0xFF)
    reg >>= np.uint32(8)
    reg ^= _TABLE[index]
  op = _zeros_operator(chunk)
  while reg.size > 1:  # merge neighbouring lanes; their length doubles
    reg = _advance(op, reg[0::2]) ^ reg[1::2]
    op = _square(op)
  init = _advance(op, np.array([0xFFFFFFFF], np.uint32))
  state = int(init[0] ^ reg[0])
  state = _register(buf[chunk * lanes:].tobytes(), state)
  return state ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
  """LevelDB/TensorFlow's masked CRC-32C."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class _Reader:
  """A bounds-checked cursor over bytes; errors name ``what``."""

  def __init__(self, data: bytes | memoryview, what: str):
    self.data, self.pos, self.what = memoryview(data), 0, what

  def done(self) -> bool:
    return self.pos >= len(self.data)

  def varint(self) -> int:
    result, shift = 0, 0
    while True:
      if self.pos >= len(self.data) or shift > 63:
        raise ConversionError(f"bad varint in {self.what}")
      b = self.data[self.pos]
      self.pos += 1
      result |= (b & 0x7F) << shift
      if not b & 0x80:
        return result
      shift += 7

  def take(self, n: int) -> memoryview:
    if n < 0 or self.pos + n > len(self.data):
      raise ConversionError(f"{self.what} is truncated")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out


def _fields(data: bytes | memoryview, what: str) -> list[tuple[int, int | memoryview]]:
  """Decodes a protobuf message into ``(field number, value)`` pairs."""
  r, out = _Reader(data, what), []
  while not r.done():
    tag = r.varint()
    number, wire = tag >> 3, tag & 7
    if wire == 0:
      out.append((number, r.varint()))
    elif wire == 1:
      out.append((number, struct.unpack("<Q", r.take(8))[0]))
    elif wire == 2:
      out.append((number, r.take(r.varint())))
    elif wire == 5:
      out.append((number, struct.unpack("<I", r.take(4))[0]))
    else:
      raise ConversionError(f"unsupported protobuf wire type {wire} in {what}")
  return out


def _block(data: memoryview, offset: int, size: int, what: str) -> memoryview:
  if offset < 0 or size < 0 or offset + size + _TRAILER > len(data):
    raise ConversionError(f"{what} lies outside the index file (truncated)")
  contents = data[offset:offset + size]
  kind = data[offset + size]
  (stored,) = struct.unpack("<I", data[offset + size + 1:offset + size + _TRAILER])
  if masked_crc32c(bytes(contents) + bytes([kind])) != stored:
    raise ConversionError(f"{what} fails its checksum (corrupt index file)")
  if kind != 0:
    raise ConversionError(f"{what} is compressed (type {kind}); only "
                          "uncompressed bundles are supported")
  return contents


def _entries(block: memoryview, what: str) -> list[tuple[bytes, memoryview]]:
  """The (key, value) entries of one table block."""
  if len(block) < 4:
    raise ConversionError(f"{what} is truncated")
  (restarts,) = struct.unpack("<I", block[-4:])
  end = len(block) - 4 - 4 * restarts
  if restarts < 1 or end < 0:
    raise ConversionError(f"{what} has a bad restart array")
  r, out, key = _Reader(block[:end], what), [], b""
  while not r.done():
    shared, unshared, size = r.varint(), r.varint(), r.varint()
    if shared > len(key):
      raise ConversionError(f"{what}: key shares {shared} bytes of a "
                            f"{len(key)}-byte key")
    key = key[:shared] + bytes(r.take(unshared))
    out.append((key, r.take(size)))
  return out


def _handle(value: bytes | memoryview, what: str) -> tuple[int, int]:
  r = _Reader(value, what)
  return r.varint(), r.varint()


def find_index(path: str) -> str | None:
  """The ``.index`` file of a TensorFlow checkpoint named by ``path``, or None.

  Accepts the ``.index`` itself, a ``.data-*`` shard, the checkpoint prefix
  (``model.ckpt-250228``), or a directory holding exactly one checkpoint (or
  a ``checkpoint`` file naming it). Anything else returns None.
  """
  if os.path.isdir(path):
    state = os.path.join(path, "checkpoint")
    if os.path.isfile(state):
      with open(state, encoding="utf-8", errors="replace") as f:
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.M)
      if m:
        prefix = m.group(1)
        prefix = prefix if os.path.isabs(prefix) else os.path.join(path, prefix)
        if os.path.isfile(prefix + ".index"):
          return prefix + ".index"
    found = sorted(glob.glob(os.path.join(path, "*.index")))
    return found[0] if len(found) == 1 else None
  if path.endswith(".index") and os.path.isfile(path):
    return path if _has_table_footer(path) else None
  m = _DATA_FILE.match(path)
  if m and os.path.isfile(m.group(1) + ".index"):
    return m.group(1) + ".index"
  if not os.path.exists(path) and os.path.isfile(path + ".index"):
    return path + ".index"
  return None


def _has_table_footer(path: str) -> bool:
  if os.path.getsize(path) < _FOOTER:
    return False
  with open(path, "rb") as f:
    f.seek(-8, os.SEEK_END)
    return struct.unpack("<Q", f.read(8))[0] == _MAGIC


def _entry(key: str, value: memoryview, what: str) -> dict:
  entry = {"dtype": 1, "shape": [], "shard": 0, "offset": 0, "size": 0,
           "crc": None, "sliced": False}
  for number, v in _fields(value, what):
    if number == 1:
      entry["dtype"] = v
    elif number == 2:
      for dim_field, dim in _fields(v, what):
        if dim_field == 2:
          size = dict(_fields(dim, what)).get(1, 0)
          if size >= 1 << 63:  # int64 -1: unknown dimension
            raise ConversionError(f"{what}: tensor {key!r} has an unknown dimension")
          entry["shape"].append(int(size))
        elif dim_field == 3 and dim:
          raise ConversionError(f"{what}: tensor {key!r} has an unknown rank")
    elif number == 3:
      entry["shard"] = v
    elif number == 4:
      entry["offset"] = v
    elif number == 5:
      entry["size"] = v
    elif number == 6:
      entry["crc"] = v
    elif number == 7:
      entry["sliced"] = True
  return entry


def read_bundle(index_path: str, *, verify: bool = True,
                skip: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
  """Reads every numeric tensor of a TensorFlow checkpoint.

  Args:
    index_path: the checkpoint's ``.index`` file (see ``find_index``).
    verify: check each tensor's CRC-32C (and always each index block's).
    skip: names for which it returns True are neither read nor returned
      (e.g. optimizer slots); their index entries are still checked.

  Returns:
    ``{variable name: array}`` (bfloat16/float16 widened to float32). String
    tensors are skipped (logged).

  Raises:
    ConversionError: not a bundle, truncated, corrupt, sliced variables,
      big-endian or unsupported dtypes (one line naming file and tensor).
  """
  name = os.path.basename(index_path)
  size = os.path.getsize(index_path)
  if size < _FOOTER or size > _MAX_INDEX_BYTES:
    raise ConversionError(f"{name}: {size} bytes is not a checkpoint index")
  with open(index_path, "rb") as f:
    data = memoryview(f.read())
  footer = data[-_FOOTER:]
  if struct.unpack("<Q", footer[-8:])[0] != _MAGIC:
    raise ConversionError(f"{name}: no table magic number at the end (not a "
                          "TensorFlow checkpoint index, or truncated)")
  r = _Reader(footer[:-8], f"{name} footer")
  r.varint(), r.varint()  # metaindex handle (unused by bundles)
  index_offset, index_size = r.varint(), r.varint()
  index = _block(data, index_offset, index_size, f"{name} index block")
  entries: list[tuple[bytes, memoryview]] = []
  for _, handle in _entries(index, f"{name} index block"):
    offset, block_size = _handle(handle, f"{name} block handle")
    what = f"{name} data block at {offset}"
    entries.extend(_entries(_block(data, offset, block_size, what), what))
  if not entries or entries[0][0] != b"":
    raise ConversionError(f"{name}: no bundle header (not a tensor bundle)")
  header = dict(_fields(entries[0][1], f"{name} header"))
  num_shards = header.get(1, 1)
  if header.get(2, 0) != 0:
    raise ConversionError(f"{name}: big-endian bundles are not supported")
  if not 1 <= num_shards <= 100000:
    raise ConversionError(f"{name}: header claims {num_shards} shards")
  prefix = index_path[:-len(".index")]
  shards: dict[int, np.memmap] = {}
  out: dict[str, np.ndarray] = {}
  skipped = []
  for raw_key, value in entries[1:]:
    key = raw_key.decode("utf-8", errors="replace")
    entry = _entry(key, value, name)
    if entry["sliced"]:
      raise ConversionError(f"{name}: tensor {key!r} is a partitioned "
                            "(sliced) variable, which is not supported")
    if entry["dtype"] == _DT_STRING:
      skipped.append(key)
      continue
    if skip is not None and skip(key):
      continue
    if entry["dtype"] not in _DTYPES:
      raise ConversionError(f"{name}: tensor {key!r} has unsupported "
                            f"TensorFlow dtype {entry['dtype']}")
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    shape = tuple(entry["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if entry["size"] != nbytes:
      raise ConversionError(f"{name}: tensor {key!r} of shape {shape} "
                            f"{dtype.name} claims {entry['size']} bytes")
    shard = entry["shard"]
    if not 0 <= shard < num_shards:
      raise ConversionError(f"{name}: tensor {key!r} is in shard {shard} of "
                            f"{num_shards}")
    if shard not in shards:
      data_path = f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"
      if not os.path.isfile(data_path):
        raise ConversionError(f"{name}: data file {os.path.basename(data_path)} "
                              "is missing")
      shards[shard] = (np.memmap(data_path, np.uint8, mode="r")
                       if os.path.getsize(data_path) else np.zeros(0, np.uint8))
    blob = shards[shard]
    start = entry["offset"]
    if start + nbytes > blob.size:
      raise ConversionError(f"{name}: tensor {key!r} lies past the end of its "
                            "data file (truncated)")
    raw = np.array(blob[start:start + nbytes])
    if verify and entry["crc"] is not None and masked_crc32c(raw) != entry["crc"]:
      raise ConversionError(f"{name}: tensor {key!r} fails its checksum "
                            "(corrupt data file)")
    array = raw.view(dtype.newbyteorder("<")).reshape(shape)
    if dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
      array = array.astype(np.float32)
    out[key] = np.array(array, dtype=array.dtype.newbyteorder("="))
  if skipped:
    logging.info("%s: skipped %d string tensors (%s)", name, len(skipped),
                 ", ".join(skipped[:3]))
  return out
