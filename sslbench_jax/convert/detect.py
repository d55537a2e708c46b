"""Finding the backbone inside a nested checkpoint, whatever wrapped it.

Checkpoints nest the backbone under wrappers (``state_dict``, ``model``,
``teacher``, ``classy_state_dict.base_model.model.trunk``...) and DDP/method
prefixes (``module.``, ``module.encoder_q.``, ``backbone.``...). Rather than a
list of known layouts, the whole object is flattened to dotted keys and a
family's ``MARKERS`` locate every backbone *root* in it; several roots (a
teacher and a student, two MoCo encoders) are resolved by ``choose_root``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from sslbench_jax.convert.errors import ConversionError

# (preferred, other): when exactly these two kinds of roots exist, take the
# first, as the methods' own evaluation code does.
_PREFERRED = (("teacher", "student"), ("encoder_q", "encoder_k"),
              ("online", "target"))
# Pairs where the methods' papers and code disagree: the user must choose.
_AMBIGUOUS = {
    ("base_encoder", "momentum_encoder"):
        "MoCo v3 keeps both encoders; the study's loader effectively used "
        "momentum_encoder (its keys overwrite base_encoder's)",
}


_MAX_ENTRIES = 1_000_000


def flatten(obj: Any, prefix: str = "", depth: int = 0) -> dict[str, np.ndarray]:
  """All arrays in nested dicts, keyed by dotted paths (lists are skipped).

  Raises:
    ConversionError: more than ``_MAX_ENTRIES`` dict entries would be visited
      (a pickle can reference one dict from many places; expanded, a few
      kilobytes of shared references would name 2^30 arrays).
  """
  out: dict[str, np.ndarray] = {}
  visited = 0
  stack = [(obj, prefix, depth)]
  while stack:
    node, path, level = stack.pop()
    if level > 32:
      continue
    if isinstance(node, np.ndarray):
      out[path.rstrip(".")] = node
    elif isinstance(node, Mapping):
      visited += len(node)
      if visited > _MAX_ENTRIES:
        raise ConversionError(f"checkpoint has more than {_MAX_ENTRIES} nested "
                              "entries (shared references expanded); refused")
      # Reversed so that keys come out in the mapping's order.
      stack.extend((v, f"{path}{k}.", level + 1)
                   for k, v in reversed(list(node.items())))
  return out


def find_roots(keys: Sequence[str], markers: Sequence[str]) -> list[str]:
  """Prefixes ``R`` (``""`` or ending in ``.``) such that ``R + marker`` is a key."""
  roots = set()
  for key in keys:
    for marker in markers:
      if key.endswith(marker):
        root = key[:-len(marker)]
        if not root or root.endswith("."):
          roots.add(root)
  return sorted(roots)


def _components(root: str) -> list[str]:
  return [c for c in root.split(".") if c]


def _has(root: str, word: str) -> bool:
  return any(c.startswith(word) for c in _components(root))


def choose_root(roots: Sequence[str], select: str | None) -> str:
  """Picks one backbone root.

  Args:
    roots: candidates from ``find_roots`` (non-empty).
    select: optional user choice: a root component such as ``"student"``,
      ``"momentum_encoder"``, ``"target"``, or a full root prefix.

  Returns:
    The chosen root prefix.

  Raises:
    ConversionError: ``select`` matches nothing or several roots, or the
      roots are ambiguous without ``select``.
  """
  listing = ", ".join(repr(r) for r in roots)
  if select:
    chosen = [r for r in roots if r == select or r == select + "." or
              _has(r, select)]
    if len(chosen) != 1:
      raise ConversionError(
          f"select={select!r} matches {len(chosen)} of the backbones found "
          f"({listing}); pass one of their distinct prefix components")
    return chosen[0]
  if len(roots) == 1:
    return roots[0]
  for (a, b), why in _AMBIGUOUS.items():
    if all(_has(r, a) or _has(r, b) for r in roots):
      raise ConversionError(f"checkpoint holds several backbones ({listing}); "
                            f"choose with select='{a}' or select='{b}' ({why})")
  for a, b in _PREFERRED:
    first = [r for r in roots if _has(r, a)]
    if len(first) == 1 and all(_has(r, b) for r in roots if r != first[0]):
      logging.info("checkpoint holds %s; using %r (pass select=%r for the other)",
                   listing, first[0], b)
      return first[0]
  raise ConversionError(f"checkpoint holds several backbones ({listing}); "
                        "choose one with select=<prefix component>")


def describe_source(keys: Sequence[str], root: str) -> str:
  """A human name for the checkpoint's layout, for the report and metadata."""
  siblings = {k[len(root):].split(".")[0] for k in keys if k.startswith(root)}
  if _has(root, "teacher") or _has(root, "student"):
    return "dino"
  if _has(root, "base_encoder") or _has(root, "momentum_encoder"):
    return "moco_v3"
  if _has(root, "encoder_q") or _has(root, "encoder_k"):
    return "moco_v1_v2"
  if _has(root, "online") or _has(root, "target"):
    return "byol"
  if "classy_state_dict" in root or "_feature_blocks" in root:
    return "vissl"
  if "model_state_dict" in root:
    return "vissl_npid"
  if root.startswith("state_dict.") and root.endswith("backbone."):
    return "mmselfsup"
  if siblings & {"projection_head", "prototypes"}:
    return "swav_deepcluster_sela"
  if root.endswith("backbone."):
    return "backbone_prefix"
  if root.split(".")[-2:-1] == ["module"]:
    return "ddp_module"
  return "plain" if not root else "nested"
