"""Text -> bool / int / float, one rule and one wording for the whole package.

Config arguments (``config_utils.parse_arg``), command-line option values
(``protocols/_fields``, the probe CLI) and environment variables
(``parallel``) all parse through these, so a value accepted in one place is
accepted everywhere and a bad one is named the same way::

  parse_bool("True", "config argument tiny")   -> True
  parse_int("3x", "--knn_k")                   -> ValueError:
      --knn_k='3x' is not an integer
"""

from __future__ import annotations

import math
from typing import Any

# Any case: "true", "True", "TRUE" ...
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")
BOOL_WORDS = TRUE_WORDS + FALSE_WORDS


def parse_bool(text: Any, what: str) -> bool:
  """A bool, or one of ``BOOL_WORDS`` in any case (surrounding blanks ignored).

  Args:
    text: the value (a ``bool`` passes through).
    what: names the value in the error (e.g. ``"config argument tiny"``).

  Raises:
    ValueError: ``{what}={text!r} is not a boolean (one of ...)``.
  """
  if isinstance(text, bool):
    return text
  if isinstance(text, str) and text.strip().lower() in BOOL_WORDS:
    return text.strip().lower() in TRUE_WORDS
  raise ValueError(f"{what}={text!r} is not a boolean (one of {', '.join(BOOL_WORDS)})")


def parse_int(text: Any, what: str) -> int:
  """An integer written in decimal (an ``int`` passes through; bools do not).

  Raises:
    ValueError: ``{what}={text!r} is not an integer``.
  """
  if isinstance(text, int) and not isinstance(text, bool):
    return text
  if isinstance(text, str):
    try:
      return int(text.strip())
    except ValueError:
      pass
  raise ValueError(f"{what}={text!r} is not an integer")


def parse_float(text: Any, what: str, *, finite: bool = True) -> float:
  """A number (an ``int`` / ``float`` passes through as float; bools do not).

  Args:
    text: the value.
    what: names the value in the error.
    finite: also refuse ``nan`` / ``inf``.

  Raises:
    ValueError: ``{what}={text!r} is not a number`` (or ``... not a finite
      number``).
  """
  value = None
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  elif isinstance(text, str):
    try:
      value = float(text.strip())
    except ValueError:
      pass
  if value is None:
    raise ValueError(f"{what}={text!r} is not a number")
  if finite and not math.isfinite(value):
    raise ValueError(f"{what}={text!r} is not a finite number")
  return value
