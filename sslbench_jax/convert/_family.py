"""The protocol a family key module implements, plus helpers it may use.

A *family key module* (``resnet_keys.py``, ``vit_keys.py``,
``efficientnet_keys.py``) maps one backbone family's PyTorch tensors onto the
Flax variables of ``registry.create_model(arch, **options)``. It exposes:

``MARKERS: tuple[str, ...]``
  Key suffixes that locate a backbone *root* inside a flattened checkpoint. A
  root ``R`` is detected wherever ``R + marker`` is a key, for any marker. Each
  marker must occur exactly once per backbone (e.g. ``"layer1.0.conv1.weight"``,
  not ``"conv1.weight"`` which also ends ``layer1.0.conv1.weight``). Several
  roots (teacher/student, base/momentum encoder) are disambiguated by the core.

``HEAD_PREFIXES: tuple[str, ...]``
  Prefixes of *canonical* keys (relative to the root) that are known not to be
  part of the backbone (``"fc."``, ``"head."``, ``"projection_head."``...).
  Tensors under them that ``to_flax`` does not read are dropped and reported
  (as are BatchNorm ``num_batches_tracked`` counters); any other unread
  tensor is an error.

``canonicalize(state) -> state``
  Renames the root-relative keys into the family's canonical PyTorch naming
  (torchvision for ResNet, timm for ViT). Keys it does not know must pass
  through unchanged. Pure; no checks needed.

``infer_options(state, arch) -> dict``
  ``state`` is a plain dict of the canonical tensors. Returns architecture
  options (``registry.create_model`` kwargs) implied by the canonical state,
  e.g. ``{"num_classes": 1000}`` when a classifier is present.
  May raise ``ConversionError`` when the state is clearly another architecture
  (say which arch it looks like). User options override the inferred ones.

``to_flax(state, arch, options) -> variables``
  Builds the nested Flax variables dict (``{"params": ..., "batch_stats":
  ...}``) as NumPy arrays. ``state`` is a ``SourceState``: read tensors with
  ``state[key]`` (or ``state.get(key)``): reads are recorded, so the core knows
  which tensors were used. Do not read tensors you do not use. Iteration
  (``keys()``, ``items()``, ``in``) does not count as a read.

Optional: ``example_image_size(arch, options) -> int``: the square input size
used for ``jax.eval_shape(model.init)`` (default 224).

The core (``convert_checkpoint``) then guarantees, so families need not: every
leaf of ``jax.eval_shape(model.init)`` is present with the same shape, no extra
leaves exist, every non-head tensor was read, floats are cast to float32. A
missing tensor read by ``to_flax`` raises ``ConversionError`` naming the key
(unless the user's ``allow_missing`` regex matches it: then ``state[key]``
returns ``MISSING``, whose every operation yields ``MISSING``, and the leaves
built from it are taken from the model's random init).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import re
from typing import Any

import numpy as np

from sslbench_jax.convert.errors import ConversionError


class _Missing:
  """Stands for a tensor the user allowed to be missing; absorbs operations."""

  def __repr__(self) -> str:
    return "MISSING"

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    return self

  def __call__(self, *args, **kwargs) -> "_Missing":
    return self

  def __getitem__(self, item) -> "_Missing":
    return self

  def __array_function__(self, func, types, args, kwargs) -> "_Missing":
    return self

  def __array_ufunc__(self, ufunc, method, *inputs, **kwargs) -> "_Missing":
    return self

  def _self(self, *args) -> "_Missing":
    return self

  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _self
  __truediv__ = __rtruediv__ = __neg__ = __pow__ = _self


MISSING = _Missing()


def is_missing(value: Any) -> bool:
  """True if ``value`` was built from a ``MISSING`` tensor."""
  if value is MISSING:
    return True
  if isinstance(value, np.ndarray) and value.dtype == object:
    return any(v is MISSING for v in value.flat)
  return False


class SourceState(Mapping):
  """Read-only ``{canonical key: np.ndarray}`` that records which keys are read.

  Args:
    tensors: the canonical, root-relative state.
    allow_missing: optional regex; missing keys it matches (``re.search``)
      read as ``MISSING`` instead of raising.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray],
               allow_missing: str | None = None):
    self._tensors = dict(tensors)
    self._allow = re.compile(allow_missing) if allow_missing else None
    self.read: set[str] = set()
    self.missing: set[str] = set()

  def __getitem__(self, key: str) -> np.ndarray:
    if key in self._tensors:
      self.read.add(key)
      return self._tensors[key]
    if self._allow is not None and self._allow.search(key):
      self.missing.add(key)
      return MISSING  # type: ignore[return-value]
    raise ConversionError(
        f"checkpoint lacks tensor {key!r} needed by this architecture "
        f"(pass allow_missing={re.escape(key)!r} to initialise it randomly)")

  def get(self, key: str, default: Any = None) -> Any:
    if key in self._tensors:
      return self[key]
    return default

  def __contains__(self, key: object) -> bool:
    return key in self._tensors

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def items(self):  # without recording reads
    return self._tensors.items()

  def values(self):  # without recording reads
    return self._tensors.values()

  def peek(self, key: str) -> np.ndarray:
    """Returns a tensor without marking it read (for shape inspection)."""
    return self._tensors[key]


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch conv weight (O, I, kH, kW) -> Flax kernel (kH, kW, I, O)."""
  return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch linear weight (out, in) -> Flax kernel (in, out)."""
  return np.transpose(weight, (1, 0))

