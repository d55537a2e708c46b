"""Architecture options (``--arch_options``, a config's ``models.*.options``) checked
against the Flax module's fields: ``parse_arch_options(text, arch)``.

Values are read as int, float, ``true``/``false``, ``none`` or else a string,
and must then match the type of the module field (an int is accepted for a
float field; ``none`` only for an optional one; ``dtype`` takes ``float32``,
``bfloat16`` or ``float16``); string fields the module checks against a fixed
set (ResNet ``block``, ViT ``pool``) take only those values. Used by
``sslbench-jax convert`` and by ``evaluate``'s config check.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import resnet
from sslbench_jax.backbones import vit

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
