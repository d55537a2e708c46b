"""The converter's error types: bad input (exit 2) and output failures (exit 1)."""

from __future__ import annotations


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message is one actionable line.

  Raised for unreadable files (truncated, not a checkpoint), checkpoints of
  another architecture, missing/unexpected tensors and shape mismatches. The
  CLI prints the message and exits with code 2; nothing is written.
  """


class OutputError(RuntimeError):
  """The converted weights cannot be written (read-only folder, disk full...).

  A runtime failure, not bad input: the CLI prints the one-line message and
  exits with code 1. No sidecar and no temporary file is left, so nothing
  can be mistaken for finished weights.
  """
