"""Helpers for ``get_config(arg)`` files (big_vision style).

``parse_arg("tiny=True,n=3", tiny=False, n=1)`` returns a ConfigDict with the
defaults overridden by the comma-separated ``key=value`` pairs, rejecting keys
that have no default (a typo must not be silently ignored).
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # bare words are strings


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"k1=v1,k2=v2"`` over ``defaults``; unknown keys raise ValueError."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    values[key] = _literal(text) if sep else True
  return ml_collections.ConfigDict(values)


def check_keys(config: ml_collections.ConfigDict, allowed: set[str], where: str) -> None:
  """Raises if ``config`` has keys outside ``allowed`` (lists the valid ones)."""
  unknown = set(config.keys()) - allowed
  if unknown:
    raise ValueError(f"unknown key(s) {sorted(unknown)} in {where}; valid: {sorted(allowed)}")
