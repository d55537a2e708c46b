"""``convert_checkpoint``: any supported checkpoint file -> checked Flax variables.

Pipeline: read the file torch-free (``readers``), flatten it, locate the
backbone root with the family's markers and choose among several
(``detect``), canonicalise the names, infer architecture options (from
shapes, and from the source layout where a family has ``source_options``;
the caller's ``options`` override both), map the
tensors (family ``to_flax``), then verify the result against
``jax.eval_shape(model.init)``: every leaf filled with the right shape, no
extra leaf, every non-head tensor used, every float tensor used finite
(NaN/Inf refused unless ``allow_nonfinite``). Only then is anything written,
as one unit (``weights.save_variables``); an unwritable output is an
``OutputError``.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights
from sslbench_jax.convert import _family
from sslbench_jax.convert import detect
from sslbench_jax.convert import heads as head_lib
from sslbench_jax.convert import hf_keys
from sslbench_jax.convert import readers
from sslbench_jax.convert.errors import ConversionError
from sslbench_jax.convert.errors import OutputError

_FAMILIES = ("resnet", "vit", "efficientnet")
_COUNTER_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 8


def _family_module(family: str):
  try:
    return importlib.import_module(f"sslbench_jax.convert.{family}_keys")
  except ModuleNotFoundError as e:
    if e.name != f"sslbench_jax.convert.{family}_keys":
      raise
    raise ConversionError(f"no key map for the {family} family is installed") from None


def _short_list(keys, limit: int = _MAX_LISTED) -> str:
  keys = sorted(keys)
  more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def _other_family_hint(keys: list[str], family: str) -> str:
  for other in _FAMILIES:
    if other == family:
      continue
    try:
      module = _family_module(other)
    except Exception:  # pylint: disable=broad-except  # a hint is best-effort
      continue
    roots = detect.find_roots(keys, module.MARKERS)
    if roots:
      archs = [a for a in registry.ARCHS if registry.family(a) == other]
      return f"; it looks like a {other} checkpoint: use arch={'|'.join(archs)}"
  return ""


def _example_size(module, arch: str, options: dict[str, Any]) -> int:
  fn = getattr(module, "example_image_size", None)
  return int(fn(arch, options)) if fn else 224


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _check_against_model(variables: Any, expected: dict[str, Any]) -> None:
  got = _flat(variables)
  missing = set(expected) - set(got)
  if missing:
    raise ConversionError(f"conversion left Flax leaves unfilled: {_short_list(missing)}")
  extra = set(got) - set(expected)
  if extra:
    raise ConversionError(f"conversion produced leaves the model does not have: "
                          f"{_short_list(extra)}")
  for name, value in got.items():
    if _family.is_missing(value):
      continue
    shape = tuple(np.shape(value))
    if shape != tuple(expected[name].shape):
      raise ConversionError(f"shape mismatch for {name}: checkpoint gives {shape}, "
                            f"the model expects {tuple(expected[name].shape)}")


def _locate_backbone(flat: dict[str, np.ndarray], module, family: str, path: str,
                     select: str | None) -> tuple[str, str]:
  """Returns ``(root prefix, source name)`` of the backbone in ``flat``."""
  if not flat:
    raise ConversionError(f"{path} holds no tensors (a pickled nn.Module? save "
                          "its state_dict() instead)")
  keys = list(flat)
  roots = detect.find_roots(keys, module.MARKERS)
  if not roots:
    raise ConversionError(
        f"no {family} backbone in {path}: no key ends with "
        f"{' or '.join(module.MARKERS)} (keys look like {_short_list(keys, 3)})"
        f"{_other_family_hint(keys, family)}")
  root = detect.choose_root(roots, select)
  source = detect.describe_source(keys, root)
  logging.info("%s: %s checkpoint, backbone under prefix %r", path, source, root)
  return root, source


def _finalize(variables: Any, expected: dict[str, Any], model, example) -> Any:
  """Casts leaves to the model's dtypes; ``MISSING`` leaves take its init."""
  flat = _flat(variables)
  missing = [k for k, v in flat.items() if _family.is_missing(v)]
  if missing:
    init = _flat(model.init(jax.random.PRNGKey(0), example, train=False))
    flat.update({k: init[k] for k in missing})
    logging.warning("leaves initialised randomly (allow_missing): %s",
                    _short_list(missing))
  return traverse_util.unflatten_dict({
      tuple(name.split("/")): np.asarray(value, expected[name].dtype)
      for name, value in flat.items()})


def _nonfinite_tensors(tracked: _family.SourceState, state: dict[str, Any],
                       raw: dict[str, Any], root: str) -> list[str]:
  """Checkpoint names of the float tensors the conversion read that hold NaN/Inf."""
  # Canonical names may differ from the file's; most families keep the arrays.
  by_id = {id(v): root + k for k, v in raw.items()}
  bad = []
  for key in tracked.read:
    value = state[key]
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating) \
        and not np.isfinite(value).all():
      bad.append(by_id.get(id(value), root + key))
  return sorted(bad)


def _write_output(out: str, variables: Any, meta: dict[str, Any]) -> None:
  try:
    weights.save_variables(out, variables, meta)
  except OSError as e:
    reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
    raise OutputError(f"cannot write {out}: {reason}") from None


def convert_checkpoint(
    path: str,
    arch: str,
    out: str | None = None,
    *,
    select: str | None = None,
    allow_missing: str | None = None,
    options: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    head: str | None = None,
    head_representation: str = head_lib.DEFAULT_REPRESENTATION,
    detect_head: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Converts a PyTorch/safetensors/npz checkpoint into Flax variables.

  Args:
    path: the checkpoint file (format sniffed from its bytes).
    arch: a ``registry.ARCHS`` name; its family picks the key map.
    out: if given, the ``.npz`` to write with ``weights.save_variables``
      (written only when the conversion fully succeeds).
    select: which backbone to take when the file holds several, e.g.
      ``"student"`` (DINO), ``"momentum_encoder"`` (MoCo v3).
    allow_missing: regex over canonical tensor names allowed to be absent;
      their leaves keep the model's random init (seed 0). An escape hatch.
    options: architecture options overriding the inferred ones (e.g.
      ``{"num_classes": None}`` to drop a classifier, or
      ``{"pos_interp_offset": 0.0, "pos_interp_antialias": True}`` for timm's
      position-embedding resize).
    allow_nonfinite: convert even if tensors the model uses hold NaN or Inf
      (they are listed in ``meta["nonfinite_tensors"]`` and logged); by
      default that is a ``ConversionError`` naming them.
    head: a released linear-head file (DINO ``*_linearweights.pth``, SwAV
      ``*_eval_linear.pth.tar``, ...; ``heads.py``) to store with the weights
      (``released_head/*`` in the ``.npz``, ``meta["released_head"]``).
    head_representation: the model output the head applies to; its size must
      be the head's input size.
    detect_head: without ``head``, store a 1000-class linear head the
      checkpoint itself carries (MoCo ``lincls``, BYOL's ``classifier``,
      SimCLR's ``supervised_head``, torchvision ``fc``); skipped (logged) if
      it is ambiguous or does not fit.

  Returns:
    ``(variables, meta)``: NumPy float32 variables for
    ``registry.create_model(arch, **meta["arch_options"])`` and the provenance
    (arch, arch_options, source_format, source, prefix, checkpoint_sha256,
    counts, dropped_keys, missing_keys, nonfinite_tensors).

  Raises:
    FileNotFoundError: no such checkpoint.
    ConversionError: anything else wrong with the input (one line).
    OutputError: ``out`` cannot be written (read-only folder, disk full);
      nothing is left behind.
  """
  try:
    family = registry.family(arch)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  module = _family_module(family)
  if allow_missing:
    try:
      re.compile(allow_missing)
    except re.error as e:
      raise ConversionError(f"allow_missing is not a valid regex: {e}") from None

  if out:
    try:  # before minutes of work: a read-only folder fails at once
      weights.check_writable(out)
    except OSError as e:
      raise OutputError(f"cannot write {out}: "
                        f"{os.strerror(e.errno) if e.errno else e}") from None
  obj, source_format = readers.read_checkpoint(path)
  # Hugging Face transformers encoders -> timm/torchvision names (hf_keys).
  flat = hf_keys.translate(detect.flatten(obj))
  root, source = _locate_backbone(flat, module, family, path, select)
  outside = [k for k in flat if not k.startswith(root)]
  raw = {k[len(root):]: v for k, v in flat.items() if k.startswith(root)}
  state = module.canonicalize(raw)
  arch_options = dict(module.infer_options(dict(state), arch))
  # Options that depend on the source's code, not on tensor shapes (e.g. the
  # ViT position-embedding resize); optional per family.
  source_options = getattr(module, "source_options", None)
  if source_options:
    arch_options.update(source_options(raw, root, source, source_format))
  for key, value in (options or {}).items():
    if key in arch_options and arch_options[key] != value:
      logging.info("option %s=%r overrides the inferred %r", key, value,
                   arch_options[key])
  arch_options.update(options or {})
  try:
    model = registry.create_model(arch, **arch_options)
  except TypeError as e:
    raise ConversionError(f"bad options {arch_options} for {arch}: {e}") from None
  size = _example_size(module, arch, arch_options)
  example = jnp.zeros((1, size, size, 3), jnp.float32)
  expected = _flat(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), example, train=False)))

  tracked = _family.SourceState(state, allow_missing)
  try:
    variables = module.to_flax(tracked, arch, arch_options)
  except ConversionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if tracked.missing:  # family code choked on a MISSING placeholder
      raise ConversionError(f"cannot convert without tensors "
                            f"{_short_list(tracked.missing)}: {e}") from None
    raise
  _check_against_model(variables, expected)

  unread = set(state) - tracked.read
  heads = {k for k in unread if k.startswith(module.HEAD_PREFIXES)
           or k.endswith(_COUNTER_SUFFIXES)}
  unexpected = unread - heads
  if unexpected:
    raise ConversionError(
        f"checkpoint has tensors under {root!r} that {arch} does not use: "
        f"{_short_list(unexpected)} (wrong arch, or pass options=...)")

  nonfinite = _nonfinite_tensors(tracked, state, raw, root)
  if nonfinite:
    listed = _short_list(nonfinite, 5)
    if not allow_nonfinite:
      raise ConversionError(
          f"{path}: {len(nonfinite)} tensor(s) hold NaN/Inf values: {listed}; "
          "pass --allow_nonfinite (allow_nonfinite=True) to convert anyway")
    logging.warning("%s: %d tensor(s) hold NaN/Inf values (allow_nonfinite): %s",
                    path, len(nonfinite), listed)

  variables = _finalize(variables, expected, model, example)
  released = _released_head(path, head, head_representation, detect_head, flat, root,
                            model, example, variables)
  # BatchNorm step counters are dropped silently (counted, not listed).
  counters = {k for k in heads if k.endswith(_COUNTER_SUFFIXES)}
  dropped = sorted(root + k for k in heads - counters) + sorted(outside)
  meta = {
      "arch": arch,
      "arch_options": arch_options,
      "source_format": source_format,
      "source": source,
      "prefix": root,
      "checkpoint": os.path.basename(path),
      "checkpoint_sha256": weights.sha256_file(path),
      "counts": {"mapped": len(tracked.read), "dropped": len(dropped),
                 "counters": len(counters),
                 "missing_allowed": len(tracked.missing)},
      "dropped_keys": dropped,
      "missing_keys": sorted(tracked.missing),
      "nonfinite_tensors": nonfinite,
  }
  stored = variables
  if released is not None:
    meta[weights.RELEASED_HEAD] = released[1]
    stored = dict(variables, **{weights.RELEASED_HEAD: head_lib.stored_arrays(released[0])})
  if out:
    _write_output(out, stored, meta)
  return variables, meta


def _released_head(path: str, head: str | None, representation: str, detect_head: bool,
                   flat: dict[str, Any], root: str, model, example, variables
                   ) -> tuple[head_lib.Head, dict[str, Any]] | None:
  """(head, sidecar entry) to store with the weights, or None (``heads.py``)."""
  if head:
    found, source, detected = head_lib.read_head_file(head), head, False
  elif detect_head:
    try:
      found = head_lib.find_head(flat, path, root, num_classes=head_lib.DETECTED_CLASSES)
    except ConversionError as e:
      logging.warning("no released head stored: %s", e)
      return None
    source, detected = path, True
  else:
    return None
  if found is None:
    return None
  outputs = jax.eval_shape(lambda v: model.apply(v, example, train=False), variables)
  if representation not in outputs:
    raise ConversionError(f"head representation {representation!r} is not an output "
                          f"of the model (outputs: {', '.join(sorted(outputs))})")
  try:
    head_lib.check_dim(found, int(outputs[representation].shape[-1]), representation, source)
  except ConversionError as e:
    if not detected:
      raise
    logging.warning("no released head stored: %s", e)
    return None
  logging.info("released head %s (%s, %d classes) stored for %s", found.keys[0],
               os.path.basename(source), found.num_classes, representation)
  return found, head_lib.provenance(found, source, weights.sha256_file(source),
                                 representation, detected)
