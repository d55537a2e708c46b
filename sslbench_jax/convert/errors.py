"""The one error type the converter raises for bad input."""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message is one actionable line.

  Raised for unreadable files (truncated, not a checkpoint), checkpoints of
  another architecture, missing/unexpected tensors and shape mismatches. The
  CLI prints the message and exits with code 2; nothing is written.
  """
