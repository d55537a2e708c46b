"""TensorBoard event files: TFRecord framing + CRC-32C + Event protos, read back
with protobuf's own parser (message types declared here) and a bitwise CRC-32C."""

import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from sslbench_jax.finetune import _tensorboard


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_class():
  f = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="t")
  v = f.message_type.add(name="Value")
  v.field.add(name="tag", number=1, type=9, label=1)
  v.field.add(name="simple_value", number=2, type=2, label=1)
  s = f.message_type.add(name="Summary")
  s.field.add(name="value", number=1, type=11, label=3, type_name=".t.Value")
  e = f.message_type.add(name="Event")
  e.field.add(name="wall_time", number=1, type=1, label=1)
  e.field.add(name="step", number=2, type=3, label=1)
  e.field.add(name="file_version", number=3, type=9, label=1)
  e.field.add(name="summary", number=5, type=11, label=1, type_name=".t.Summary")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def _records(path):
  data = open(path, "rb").read()
  out, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked(header)
    body = data[pos + 12:pos + 12 + n]
    assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == _masked(body)
    out.append(body)
    pos += 16 + n
  return out


def test_event_file_reads_back(tmp_path):
  w = _tensorboard.EventWriter(str(tmp_path))
  w.scalars(22, {"train_loss": 2.5, "top1": 93.75})
  w.scalars(44, {"train_loss": 1.25, "lr": 0.025})
  event = _event_class()
  parsed = [event.FromString(r) for r in _records(w.path)]
  assert parsed[0].file_version == "brain.Event:2"
  assert [p.step for p in parsed] == [0, 22, 44]
  assert {v.tag: v.simple_value for v in parsed[1].summary.value} == {
      "train_loss": 2.5, "top1": 93.75}
  assert abs(parsed[2].summary.value[1].simple_value - 0.025) < 1e-9
  assert parsed[2].wall_time > 1e9
