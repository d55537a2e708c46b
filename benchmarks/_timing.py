"""What the throughput benchmarks share: interleaved timing, the machine line, BENCHMARKS.md sections.

A benchmark script imports it as ``import _timing`` (``python
benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``)::

  seconds = _timing.interleaved_medians({"jax": jax_step, "torch": torch_step},
                                        rounds=5, warmup=True)
  print(_timing.cpu_name(), seconds)
  _timing.write_section("BENCHMARKS.md", "## Training-step throughput", text)

Implementations are timed interleaved (one call of each per round, in turn),
so a load change on a shared machine hits all of them alike, and the median
of the rounds is kept.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sslbench_jax import atomic  # pylint: disable=wrong-import-position


def time_once(fn: Callable[[], Any]) -> float:
  """Wall seconds of one call of ``fn`` (which must block until its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_medians(runs: dict[str, Callable[[], Any]], rounds: int, *,
                        budget: float | None = None,
                        warmup: bool = False) -> dict[str, float]:
  """Median seconds per call of each implementation, timed interleaved.

  Args:
    runs: name -> a blocking call (e.g. a jitted step with
      ``block_until_ready``).
    rounds: rounds to time (each calls every implementation once).
    budget: optional seconds per implementation: the first round's slowest
      call bounds the rounds to ``budget // slowest`` (at least 1).
    warmup: call each implementation once, untimed, first (compilation,
      caches); without it the first round counts.

  Returns:
    name -> median seconds over the rounds.
  """
  if warmup:
    for run in runs.values():
      run()
  times = {name: [time_once(run)] for name, run in runs.items()}
  if budget is not None:
    slowest = max(t[0] for t in times.values())
    rounds = min(rounds, int(budget // max(slowest, 1e-9)))
  for _ in range(max(1, rounds) - 1):
    for name, run in runs.items():
      times[name].append(time_once(run))
  return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_name() -> str:
  """The CPU model as ``lscpu`` names it (else ``platform.processor()``)."""
  name = platform.processor() or "unknown"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except OSError:
    return name
  found = re.search(r"^Model name:\s*(.+)$", out, re.M)
  return found.group(1).strip() if found else name


def write_section(path: str, heading: str, section: str) -> None:
  """Replaces the ``heading`` section of a Markdown file (or appends it); atomic.

  A section runs from its ``## ...`` heading line to the next ``## `` heading
  or the end; the other sections are kept byte for byte.

  Args:
    path: the Markdown file (created as ``# Benchmarks`` if absent).
    heading: the section's heading line, e.g. ``"## Forward pass throughput"``.
    section: the new section, starting with ``heading``.
  """
  if not section.startswith(heading + "\n"):
    raise ValueError(f"section does not start with its heading {heading!r}")
  text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + section
  atomic.write_text(path, text.rstrip("\n") + "\n")
