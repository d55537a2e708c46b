"""Helpers for ``get_config(arg)`` files (big_vision style).

``parse_arg("tiny=True,n=3", tiny=False, n=1)`` returns a ConfigDict with the
defaults overridden by the comma-separated ``key=value`` pairs, rejecting keys
that have no default (a typo must not be silently ignored). A value is parsed
by the type of its default, strictly (``sslbench_jax._parse``, the package's one
rule): a bool takes only ``true/false/1/0`` in any case (a bare ``key`` means
true), an int an integer, a float a finite number, a string any text; a
``None`` default takes a Python literal or, failing that, the text.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from sslbench_jax._parse import parse_bool  # config files import it from here
from sslbench_jax._parse import parse_float
from sslbench_jax._parse import parse_int


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # bare words are strings


def _parse_value(key: str, text: str, default: Any) -> Any:
  what = f"config argument {key}"
  if isinstance(default, bool):
    return parse_bool(text, what)
  if isinstance(default, int):
    return parse_int(text, what)
  if isinstance(default, float):
    return parse_float(text, what)
  if isinstance(default, str):
    return text
  return _literal(text)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2=v2"`` over ``defaults``.

  Raises:
    ValueError: an unknown key, a key given twice, or a value that does not
      parse as the type of its default (e.g. ``tiny=maybe``).
  """
  values = dict(defaults)
  seen = set()
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    if key in seen:
      raise ValueError(f"config argument {key!r} is given twice")
    seen.add(key)
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      values[key] = True
    else:
      values[key] = _parse_value(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(values)


def check_keys(config: ml_collections.ConfigDict, allowed: set[str], where: str) -> None:
  """Raises if ``config`` has keys outside ``allowed`` (lists the valid ones)."""
  unknown = set(config.keys()) - allowed
  if unknown:
    raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(allowed)}")
