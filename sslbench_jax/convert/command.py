"""``sslbench-jax convert``: checkpoint file -> Flax weights (.npz + .json sidecar).

Example:
  sslbench-jax convert --checkpoint swav_800ep_pretrain.pth.tar \\
      --arch resnet50 --out weights/swav.npz

``--arch_options=key=value,key=value`` sets options of the architecture's
Flax module (the fields of ``registry.create_model(arch)``), overriding what
the converter infers from the checkpoint; each override of an inferred value
is logged, and the options used are stored in the sidecar's ``arch_options``.
Values are read as int, float, ``true``/``false``, ``none`` or else a
string, and must then match the type of the module field (an int is accepted
for a float field; ``none`` only for an optional one; ``dtype`` takes
``float32``, ``bfloat16`` or ``float16``); string fields the module checks
against a fixed set (ResNet ``block``, ViT ``pool``) take only those values.
E.g. a DINO-layout ViT checkpoint whose features should be computed
at other resolutions with timm's position-embedding resize:

  sslbench-jax convert --checkpoint dino_vitbase16.pth --arch vit_base_patch16 \\
      --out dino_vitb16.npz \\
      --arch_options=pos_interp_offset=0,pos_interp_antialias=true

Tensors holding NaN/Inf are refused (named, exit 2) unless
``--allow_nonfinite``; the names are then recorded in the sidecar's
``nonfinite_tensors``.

Prints one summary line. Bad input (including an unknown option key, listed
against the valid ones, an item that is not ``key=value``, or a value of the
wrong type for its key, and an unsafe or oversized checkpoint) prints one
``error: ...`` line to stderr and exits with code 2, writing nothing. An
output that cannot be written (read-only folder, disk full) prints one line
and exits with code 1, leaving nothing that reads as finished weights.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any

from absl import flags

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import resnet
from sslbench_jax.backbones import vit
from sslbench_jax.convert.converter import convert_checkpoint
from sslbench_jax.convert.errors import ConversionError
from sslbench_jax.convert.errors import OutputError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  flags.DEFINE_string("checkpoint", None, "PyTorch (.pth/.pth.tar/.torch/.pt), "
                      ".safetensors or .npz checkpoint.")
  flags.DEFINE_string("arch", None, "Architecture name (backbones.registry.ARCHS).")
  flags.DEFINE_string("out", None, "Output .npz (a .json sidecar is written next to it).")
  flags.DEFINE_string("select", None, "Which backbone when the file holds several, "
                      "e.g. student, momentum_encoder, target.")
  flags.DEFINE_string("allow_missing", None, "Regex of tensor names allowed to be "
                      "absent (their weights stay randomly initialised).")
  flags.DEFINE_string("arch_options", None, "Comma-separated key=value options of "
                      "the arch's Flax module overriding the inferred ones, e.g. "
                      "pos_interp_offset=0,pos_interp_antialias=true (values: "
                      "int, float, true/false, none, else string; each must "
                      "match the type of its field).")
  flags.DEFINE_boolean("allow_nonfinite", False, "Convert even if tensors hold "
                       "NaN/Inf (listed in the sidecar); by default that is an "
                       "error naming them.")
  flags.DEFINE_string("head", None, "A released linear-head file (DINO "
                      "*_linearweights.pth, SwAV *_eval_linear.pth.tar, MoCo "
                      "lincls, ...) stored with the weights for the released_head "
                      "protocol (docs/convert.md).")
  flags.DEFINE_string("head_representation", "pre_logits", "The model output the "
                      "head applies to (its size must be the head's input size).")
  flags.DEFINE_boolean("detect_head", True, "Without --head, store a 1000-class "
                       "linear head the checkpoint itself carries.")
  flags.mark_flags_as_required(["checkpoint", "arch", "out"])


# Flax adds these to every module's dataclass; they are not architecture options.
_NOT_OPTIONS = ("parent", "name")
_WORDS = {"true": True, "false": False, "none": None}

# ``dtype`` is annotated ``Any`` (Flax takes any dtype-like), but from the
# command line only a name can be given, and it is stored as that string in
# the sidecar and passed back to ``create_model``, where jnp reads it. Only
# floating compute dtypes are allowed: an integer dtype would fail deep inside
# the first conv, and float64 would silently compute in float32 unless jax's
# x64 mode is on, so the recorded dtype would not be the one used.
_DTYPES = ("float32", "bfloat16", "float16")

# String fields the module itself checks against a fixed set, but only when it
# is called: in the converter, after the whole checkpoint was read, and as a
# ValueError that ``main`` does not turn into a one-line error. Checked here up
# front instead, with the module's own constants so the sets cannot drift.
_CHOICES = {
    (resnet.ResNet, "block"): resnet._BLOCKS,  # pylint: disable=protected-access
    (vit.VisionTransformer, "pool"): vit._POOLS,  # pylint: disable=protected-access
}
_MISMATCH = object()


def _parse_value(text: str) -> Any:
  """``text`` as int, float, bool/None (``true``/``false``/``none``) or str."""
  if text.lower() in _WORDS:
    return _WORDS[text.lower()]
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _coerce(value: Any, hint: Any) -> Any:
  """``value`` as a value of type ``hint`` or ``_MISMATCH``; int -> float ok."""
  if hint is Any:
    return value
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    for arm in typing.get_args(hint):
      got = _coerce(value, arm)
      if got is not _MISMATCH:
        return got
    return _MISMATCH
  if origin is typing.Literal:
    # type() too: 1 == True, and a Literal["1"] is not matched by int 1.
    ok = any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    return value if ok else _MISMATCH
  if hint is type(None):
    return value if value is None else _MISMATCH
  # bool is an int subclass: exact types, so ``depth=true``/``qkv_bias=1`` fail.
  if hint in (bool, int, str):
    return value if type(value) is hint else _MISMATCH
  if hint is float:
    # Stored as float so the sidecar records the field's own type.
    return float(value) if type(value) in (int, float) else _MISMATCH
  # Sequences, tuples, callables: one comma-free item cannot spell them.
  return _MISMATCH


def _settable(hint: Any) -> bool:
  """Whether ``_coerce`` can ever accept a value for ``hint``."""
  if hint is Any or hint in (bool, int, float, str, type(None)):
    return True
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_settable(arm) for arm in typing.get_args(hint))
  return origin is typing.Literal


def _describe(hint: Any) -> str:
  """``hint`` in the words of the error message, e.g. ``float or none``."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(arm) for arm in typing.get_args(hint))
  if origin is typing.Literal:
    return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
  if hint is type(None):
    return "none"
  if isinstance(hint, type) and not typing.get_args(hint):
    return hint.__name__
  return str(hint).replace("collections.abc.", "").replace("typing.", "")


def _check_value(cls: type, arch: str, key: str, raw: str, value: Any,
                 hint: Any) -> Any:
  """``value`` converted to the type of field ``key``; ValueError if it is not."""
  got = "none" if value is None else f"{type(value).__name__} {raw!r}"
  where = f"invalid --arch_options value {key}={raw} for {arch}: expected"
  if key == "dtype":
    if not isinstance(value, str) or value not in _DTYPES:
      raise ValueError(f"{where} a dtype name, one of {', '.join(_DTYPES)} "
                       f"(got {got})")
    return value
  if not _settable(hint):
    raise ValueError(f"{where} {_describe(hint)}, which cannot be given in "
                     "--arch_options (items are split at commas)")
  choices = _CHOICES.get((cls, key))
  checked = _coerce(value, hint)
  if checked is _MISMATCH or (choices is not None and checked is not None
                              and checked not in choices):
    one_of = (f", one of {', '.join(repr(c) for c in choices)}"
              if choices is not None else "")
    raise ValueError(f"{where} {_describe(hint)}{one_of} (got {got})")
  return checked


def parse_arch_options(text: str | None, arch: str) -> dict[str, Any]:
  """Parses ``"key=value,key=value"`` into options for ``create_model(arch)``.

  Args:
    text: the ``--arch_options`` value; ``None`` or empty means no options.
    arch: a ``registry.ARCHS`` name; keys must be fields of its Flax module.

  Returns:
    ``{key: value}`` with values parsed by ``_parse_value`` and checked
    against the module's field annotations (ints given for float fields are
    returned as floats).

  Raises:
    ValueError: unknown arch, an item that is not ``key=value`` (or repeats a
      key), a key that is not a field of the module (valid ones listed), or a
      value of the wrong type for its field (key, value and expected type
      named; for ``dtype`` and fixed-choice strings, the allowed values).
  """
  if not text:
    return {}
  cls = type(registry.create_model(arch))
  # Resolves the string annotations left by ``from __future__ import annotations``.
  hints = typing.get_type_hints(cls)
  valid = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_OPTIONS]
  options: dict[str, Any] = {}
  for item in text.split(","):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not key or not value:
      raise ValueError(f"malformed --arch_options item {item!r}: expected "
                       "key=value (e.g. pos_interp_offset=0)")
    if key not in valid:
      raise ValueError(f"unknown --arch_options key {key!r} for {arch}; valid: "
                       f"{', '.join(sorted(valid))}")
    if key in options:
      raise ValueError(f"--arch_options key {key!r} is given twice")
    options[key] = _check_value(cls, arch, key, value, _parse_value(value),
                                hints[key])
  return options


def _dropped_groups(dropped: list[str], prefix: str, limit: int = 4) -> str:
  """Dropped keys grouped where they leave the backbone's path: ``a.b.*``."""
  root = [c for c in prefix.split(".") if c]
  groups = set()
  for key in dropped:
    parts = key.split(".")
    shared = 0
    while shared < min(len(root), len(parts)) and parts[shared] == root[shared]:
      shared += 1
    groups.add(".".join(parts[:shared + 1]) + (".*" if len(parts) > shared + 1 else ""))
  groups = sorted(groups)
  more = f" +{len(groups) - limit} more" if len(groups) > limit else ""
  return ", ".join(groups[:limit]) + more


def main(argv: list[str]) -> None:
  """Runs the conversion; exit code 2 with a one-line message on bad input."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    # Checked before the checkpoint is read: a typo fails fast, writes nothing.
    options = parse_arch_options(FLAGS.arch_options, FLAGS.arch)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    _, meta = convert_checkpoint(FLAGS.checkpoint, FLAGS.arch, FLAGS.out,
                                 select=FLAGS.select,
                                 allow_missing=FLAGS.allow_missing,
                                 options=options,
                                 allow_nonfinite=FLAGS.allow_nonfinite,
                                 head=FLAGS.head,
                                 head_representation=FLAGS.head_representation,
                                 detect_head=FLAGS.detect_head)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OutputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  counts = meta["counts"]
  print(f"{FLAGS.out}: {meta['arch']} from {meta['source']} checkpoint "
        f"({meta['source_format']}, prefix {meta['prefix']!r}); "
        f"{counts['mapped']} tensors mapped, {counts['dropped']} dropped, "
        f"{counts['missing_allowed']} missing allowed"
        + (f" (dropped {_dropped_groups(meta['dropped_keys'], meta['prefix'])})"
           if meta["dropped_keys"] else "")
        + (f"; released head {meta['released_head']['weight_key']} "
           f"({meta['released_head']['num_classes']} classes on "
           f"{meta['released_head']['representation']})"
           if meta.get("released_head") else ""))
