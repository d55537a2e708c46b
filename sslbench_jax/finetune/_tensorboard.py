"""TensorBoard scalar event files without TensorFlow.

An event file is a TFRecord stream (``uint64 length``, ``uint32
masked_crc32c(length)``, ``data``, ``uint32 masked_crc32c(data)``, little
endian) of ``tensorflow.Event`` protos; the few fields needed are encoded by
hand: ``Event{wall_time=1 double, step=2 int64, file_version=3 string,
summary=5 Summary}``, ``Summary{value=1 repeated Value}``,
``Value{tag=1 string, simple_value=2 float}``.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from sslbench_jax.convert.tf_bundle import masked_crc32c


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint(num << 3 | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
          file_version: str | None = None) -> bytes:
  """One serialised ``Event`` proto."""
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) +
                     _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in scalars.items())
    msg += _bytes_field(5, summary)
  return msg


def record(data: bytes) -> bytes:
  """TFRecord framing of ``data``."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


class EventWriter:
  """Appends scalar summaries to ``DIR/events.out.tfevents.<time>.<host>``."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = os.path.join(directory, name)
    with open(self.path, "ab") as f:
      f.write(record(event(0, time.time(), file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    with open(self.path, "ab") as f:
      f.write(record(event(step, time.time(), values)))
      f.flush()
