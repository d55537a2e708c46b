"""BYOL's official release: a pickle of Haiku parameter trees -> torchvision names.

DeepMind's BYOL (``deepmind-research/byol``) saves its checkpoints
(``pretrain_res50x1.pkl``) with ``dill.dump(dict(experiment_state=...,
step=..., rng=...), protocol=2)`` (``byol/utils/checkpointing.py``), where
``experiment_state`` is the NamedTuple ``_ByolExperimentState(online_params,
target_params, online_state, target_state, opt_state)``
(``byol/byol_experiment.py``). Params and state are Haiku trees
``{module path: {name: array}}``; the encoder is ``networks.ResNet50`` built
without a name, so its modules are ``res_net50/~/initial_conv``,
``res_net50/~/block_group_{g}/~/block_{b}/~/conv_{k}`` / ``batchnorm_{k}`` /
``shortcut_conv`` / ``shortcut_batchnorm`` (Haiku's ``BlockV1``), with
BatchNorm statistics in the state under ``.../batchnorm_{k}/~/mean_ema`` and
``var_ema`` (``average`` is the debiased statistic Haiku uses at test time).
The heads are ``projector``, ``predictor`` (MLPs) and ``classifier``.

The pickle is read by a restricted unpickler: NumPy's array reconstruction
and plain containers resolve; every other global (the NamedTuple class,
dill/JAX helpers) becomes an inert record that only *keeps* its arguments,
so the arrays inside a NamedTuple survive and nothing in the file runs.

``read_byol_pickle`` returns ``{"online": {torchvision state}, "target":
{...}}`` (conv kernels HWIO -> OIHW): the ResNet key map then converts it like
any PyTorch port, and the converter takes ``online`` unless told
``select="target"``. Heads are kept under ``projector.`` / ``predictor.`` /
``classifier.`` so they are reported as dropped.

Note (documented in docs/convert.md): Haiku pads strided convolutions and the
stem max-pool ``"SAME"`` (asymmetric for stride 2), torchvision symmetrically;
the Flax ResNet follows torchvision, as the PyTorch ports of BYOL do, so
features match the ports, not the Haiku graph bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any

from absl import logging
import numpy as np

from sslbench_jax.convert import readers
from sslbench_jax.convert.errors import ConversionError

# _ByolExperimentState's field order (byol/byol_experiment.py).
_STATE_FIELDS = ("online_params", "target_params", "online_state",
                 "target_state", "opt_state")
_MAX_DEPTH = 48
_ENCODER = re.compile(r"^(?:.*/~/)?(res_net\d*|encoder)/~/(.+)$")
_BLOCK = re.compile(r"^block_group_(\d+)/~/block_(\d+)/~/(.+)$")
_BN_PARAMS = {"scale": "weight", "offset": "bias"}
_BN_STATS = {"mean_ema": "running_mean", "var_ema": "running_var"}


class _Record:
  """Inert stand-in for a pickled global: keeps what it was built with."""

  _name = ""
  _module = ""

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, {}
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.items[len(self.items)] = value

  def extend(self, values):
    for v in values:
      self.append(v)


def _record_global(module: str, name: str) -> type:
  return type(f"Record[{module}.{name}]", (_Record,),
              {"_name": name, "_module": module})


def _namedtuple_record(name: Any, fields: Any, module: Any = "", *unused) -> type:
  """dill's ``_create_namedtuple(name, fields, module)``: an inert record class."""
  if not (isinstance(fields, tuple) and all(isinstance(f, str) for f in fields)):
    raise ConversionError("malformed dill namedtuple in the pickle")
  return type(f"Record[{str(module)[:100]}.{str(name)[:100]}]", (_Record,),
              {"_name": str(name), "_module": str(module), "_fields": fields})


_DILL_NAMEDTUPLE = {("dill._dill", "_create_namedtuple"),
                    ("dill.dill", "_create_namedtuple")}

# dill pickles every ndarray as ``dill._dill._create_array(f, args, state,
# npdict)`` with ``f, args, state = array.__reduce__()`` (numpy's
# ``_reconstruct``); ``dill.dill`` is its pre-0.3 module name.
_DILL_ARRAY = {("dill._dill", "_create_array"), ("dill.dill", "_create_array")}


def _allowed_reconstructors() -> list[Any]:
  """The readers' allow-listed ``numpy ... _reconstruct`` builders."""
  return [v for (_, name), v in readers._PLAIN_ALLOWED.items()  # pylint: disable=protected-access
          if name == "_reconstruct"]


def _dill_array(record: "_Record") -> np.ndarray:
  """Rebuilds a dill-pickled array through the readers' own NumPy builder."""
  if len(record.args) != 4 or not isinstance(record.args[1], tuple):
    raise ConversionError("malformed dill array in the pickle")
  f, f_args, state, _ = record.args
  if not any(f is g for g in _allowed_reconstructors()):
    raise ConversionError("dill array built by something other than NumPy's "
                          "_reconstruct; refused")
  pending = f(*f_args)
  pending.__setstate__(state)
  array = getattr(pending, "array", pending)  # the readers' deferred array
  if not isinstance(array, np.ndarray):
    raise ConversionError("malformed dill array in the pickle")
  return array


class _Unpickler(readers._Unpickler):  # pylint: disable=protected-access
  """The readers' allow-list, but unknown globals keep their arguments."""

  def __init__(self, file):
    super().__init__(file, None, torch=False)

  def find_class(self, module: str, name: str) -> Any:
    found = super().find_class(module, name)
    if (module, name) in _DILL_NAMEDTUPLE:
      return _namedtuple_record
    if isinstance(found, type) and issubclass(found, readers._Opaque):  # pylint: disable=protected-access
      return _record_global(module, name)
    return found  # allow-listed (storages still fail in persistent_load)

  def persistent_load(self, pid: Any) -> Any:
    raise ConversionError("pickle uses persistent ids (not a Haiku checkpoint)")


def _plain(obj: Any, budget: list[int], depth: int = 0) -> Any:
  """Records -> dicts/tuples, pending arrays -> arrays, within a byte budget."""
  if depth > _MAX_DEPTH:
    raise ConversionError("pickle nesting is too deep")
  if type(obj).__name__ == "_PendingArray":  # the readers' deferred array
    obj = getattr(obj, "array", None)
    if obj is None:
      raise ConversionError("pickled NumPy array without its data")
  if isinstance(obj, np.ndarray):
    budget[0] -= obj.nbytes
    if budget[0] < 0:
      raise ConversionError("pickled arrays exceed what the file size allows "
                            "(corrupt or malicious sizes)")
    return obj
  if isinstance(obj, Mapping):
    return {k: _plain(v, budget, depth + 1) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return tuple(_plain(v, budget, depth + 1) for v in obj)
  if isinstance(obj, _Record) and (obj._module, obj._name) in _DILL_ARRAY:  # pylint: disable=protected-access
    return _plain(_dill_array(obj), budget, depth + 1)
  if isinstance(obj, _Record):
    args = [_plain(a, budget, depth + 1) for a in obj.args]
    fields = getattr(obj, "_fields", None)
    if (fields is None and len(args) == 1 and isinstance(args[0], Mapping)
        and not (obj.kwargs or obj.items or obj.state)):
      return args[0]  # a mapping wrapper, e.g. Haiku's FlatMapping(dict)
    if fields is not None and len(fields) == len(args):
      out = dict(zip(fields, args))  # a dill-pickled NamedTuple
    elif len(args) == len(_STATE_FIELDS) and all(
        isinstance(a, (Mapping, tuple)) for a in args):
      out = dict(zip(_STATE_FIELDS, args))  # _ByolExperimentState
    else:
      out = {i: a for i, a in enumerate(args)}
    for k, v in list(obj.kwargs.items()) + list(obj.items.items()):
      out[k] = _plain(v, budget, depth + 1)
    if obj.state is not None:
      out["state"] = _plain(obj.state, budget, depth + 1)
    return out
  return obj


def load_pickle(path: str) -> Any:
  """Unpickles ``path`` restrictedly: arrays, containers and inert records.

  Records (any global outside the readers' allow-list, e.g. BYOL's
  ``_ByolExperimentState``) come back as dicts of what they were built with;
  NamedTuple fields of ``_ByolExperimentState`` get their names.
  """
  with open(path, "rb") as f:
    obj = _Unpickler(f).load()
  # Arrays may take at most a small multiple of the file's size.
  budget = [4 * os.path.getsize(path) + (256 << 20)]
  return _plain(obj, budget)


def _leaves(obj: Any, path: tuple, out: dict[tuple, np.ndarray], depth: int = 0):
  """Every array in ``obj`` keyed by its path (dict keys, positions)."""
  if depth > _MAX_DEPTH:
    raise ConversionError("pickle nesting is too deep")
  if isinstance(obj, np.ndarray):
    if obj.dtype != object:
      out[path] = obj
  elif isinstance(obj, Mapping):
    for k, v in obj.items():
      _leaves(v, path + (k,), out, depth + 1)
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      _leaves(v, path + (i,), out, depth + 1)


def _role(prefix: tuple) -> tuple[str, str] | None:
  """``("online" | "target" | "", "params" | "state")`` of a Haiku tree's path."""
  for part in reversed(prefix):
    if isinstance(part, str) and part in _STATE_FIELDS[:4]:
      role, kind = part.split("_")
      return role, kind
    if part == "opt_state":
      return None
  return "", ""


def _torchvision_name(module: str, param: str) -> tuple[str, bool] | None:
  """(torchvision key, is a conv kernel) for an encoder tensor; None to skip."""
  parts = module.split("/~/")
  stats = parts[-1] in _BN_STATS
  layer = "/~/".join(parts[:-1] if stats else parts)
  if stats:
    if param != "average":  # EMA bookkeeping (hidden, counter)
      return None
    suffix = _BN_STATS[parts[-1]]
  elif param == "w":
    suffix = "weight"
  elif param in _BN_PARAMS:
    suffix = _BN_PARAMS[param]
  else:
    raise ConversionError(f"unknown Haiku parameter {module}/{param}")
  if layer in ("initial_conv", "initial_batchnorm"):
    return ("conv1" if layer == "initial_conv" else "bn1") + "." + suffix, \
        layer == "initial_conv"
  if layer == "final_batchnorm":
    raise ConversionError("Haiku ResNet v2 (final_batchnorm) is not supported; "
                          "BYOL's released encoders are ResNet v1")
  m = _BLOCK.match(layer)
  if not m:
    raise ConversionError(f"unknown Haiku ResNet module {module!r}")
  group, block, name = int(m.group(1)), int(m.group(2)), m.group(3)
  base = f"layer{group + 1}.{block}."
  if name in ("shortcut_conv", "shortcut_batchnorm"):
    tv = "downsample.0" if name == "shortcut_conv" else "downsample.1"
    return base + tv + "." + suffix, name == "shortcut_conv"
  m = re.fullmatch(r"(conv|batchnorm)_(\d+)", name)
  if not m:
    raise ConversionError(f"unknown Haiku ResNet module {module!r}")
  kind, k = m.group(1), int(m.group(2))
  return base + ("conv" if kind == "conv" else "bn") + f"{k + 1}.{suffix}", \
      kind == "conv"


def _to_torch_layout(key: str, array: np.ndarray, conv: bool) -> np.ndarray:
  array = np.asarray(array)
  if conv:
    if array.ndim != 4:
      raise ConversionError(f"Haiku conv kernel for {key} has shape "
                            f"{array.shape}, expected 4-D (kH, kW, in, out)")
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  if array.ndim > 1 and any(d != 1 for d in array.shape[:-1]):
    raise ConversionError(f"Haiku BatchNorm tensor for {key} has shape "
                          f"{array.shape}, expected (C,) or (1, 1, 1, C)")
  return array.reshape(-1)


def byol_state_dicts(obj: Any) -> dict[str, dict[str, np.ndarray]]:
  """Maps an unpickled BYOL checkpoint onto torchvision-named state dicts.

  Args:
    obj: what ``load_pickle`` returned: the checkpoint dict (with
      ``experiment_state``), or directly a Haiku ``{module: {name: array}}``
      tree (params and BatchNorm state merged).

  Returns:
    ``{"online": state, "target": state}`` (only the roles present; a bare
    tree gives ``{"encoder": state}``), each a torchvision-named ResNet state
    dict in PyTorch layout plus its heads under ``projector.`` /
    ``predictor.`` / ``classifier.``. Optimizer state is left out (logged).

  Raises:
    ConversionError: no Haiku ResNet inside, or an unknown module/parameter.
  """
  flat: dict[tuple, np.ndarray] = {}
  _leaves(obj, (), flat)
  out: dict[str, dict[str, np.ndarray]] = {}
  skipped = 0
  for path, array in flat.items():
    if len(path) < 2 or not all(isinstance(p, str) for p in path[-2:]):
      continue
    module, param = path[-2], path[-1]
    role = _role(path[:-2])
    if role is None:
      skipped += 1
      continue
    name = role[0] or "encoder"
    m = _ENCODER.match(module)
    if m:
      mapped = _torchvision_name(m.group(2), param)
      if mapped is None:
        continue
      key, conv = mapped
      value = _to_torch_layout(f"{module}/{param}", array, conv)
    else:
      key, value = module.replace("/~/", ".") + "." + param, np.asarray(array)
    target = out.setdefault(name, {})
    if key in target:
      raise ConversionError(f"Haiku tensor {module}/{param} appears twice "
                            f"under {name!r}")
    target[key] = value
  if not any("conv1.weight" in s for s in out.values()):
    raise ConversionError(
        "a pickle without the PyTorch magic number and without a Haiku ResNet "
        "(no '.../initial_conv' with 'w'); not a BYOL checkpoint either")
  if skipped:
    logging.info("BYOL pickle: %d optimizer-state arrays left out", skipped)
  logging.warning(
      "BYOL (Haiku) checkpoint: the Flax ResNet pads strided convs and the "
      "max-pool symmetrically like torchvision (and the PyTorch ports), not "
      "Haiku's 'SAME'; see docs/convert.md")
  return out


def is_plain_pickle(path: str) -> bool:
  """True for a pickle (protocol >= 2) that is not a PyTorch legacy file.

  A legacy torch file starts with the pickled magic int
  0x1950A86A20F9469CFC6C: ``PROTO n`` then ``LONG1`` of 10 bytes.
  """
  with open(path, "rb") as f:
    head = f.read(14)
  if head[:1] != b"\x80" or len(head) < 3:
    return False
  magic = readers._LEGACY_MAGIC.to_bytes(10, "little")  # pylint: disable=protected-access
  return not (head[2:4] == b"\x8a\x0a" and head[4:14] == magic)


def read_byol_pickle(path: str) -> dict[str, dict[str, np.ndarray]]:
  """Reads BYOL's official ``.pkl`` into torchvision-named state dicts.

  Raises:
    ConversionError: unreadable, or no Haiku ResNet inside (one line).
  """
  return byol_state_dicts(load_pickle(path))
