"""benchmarks/_timing.py: interleaved medians (on a fake clock) and BENCHMARKS.md sections."""

import os
import statistics
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import _timing  # pylint: disable=g-import-not-at-top,wrong-import-position


class _Clock:
  """``time.perf_counter`` that advances only when a fake implementation runs."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _runs(clock, durations, calls):
  """name -> a call that takes the next of its ``durations`` (recording the order)."""
  def make(name):
    it = iter(durations[name])
    def run():
      calls.append(name)
      clock.now += next(it)
    return run
  return {name: make(name) for name in durations}


@pytest.fixture
def clock(monkeypatch):
  c = _Clock()
  monkeypatch.setattr(_timing.time, "perf_counter", c)
  return c


def test_interleaved_medians_warmup_and_order(clock):
  durations = {"a": [100.0, 3.0, 1.0, 2.0, 9.0], "b": [50.0, 4.0, 4.0, 8.0, 1.0]}
  calls = []
  got = _timing.interleaved_medians(_runs(clock, durations, calls), rounds=4, warmup=True)
  assert got == {"a": statistics.median([3.0, 1.0, 2.0, 9.0]),
                 "b": statistics.median([4.0, 4.0, 8.0, 1.0])}
  assert calls == ["a", "b"] * 5   # one warm-up, then interleaved rounds


def test_interleaved_medians_budget_bounds_rounds(clock):
  # The first round's slowest call (4 s) with a 10 s budget allows 2 rounds of 5.
  durations = {"a": [1.0, 3.0, 7.0], "b": [4.0, 2.0, 7.0]}
  calls = []
  got = _timing.interleaved_medians(_runs(clock, durations, calls), rounds=5, budget=10.0)
  assert calls == ["a", "b", "a", "b"]
  assert got == {"a": 2.0, "b": 3.0}
  calls.clear()
  # a budget below one call still times one round
  got = _timing.interleaved_medians(_runs(clock, {"a": [5.0]}, calls), rounds=5, budget=1.0)
  assert calls == ["a"] and got == {"a": 5.0}


def test_write_section_replaces_only_its_section(tmp_path):
  path = str(tmp_path / "BENCHMARKS.md")
  _timing.write_section(path, "## Forward", "## Forward\n\nv1\n")
  assert open(path).read() == "# Benchmarks\n\n## Forward\n\nv1\n"
  with open(path, "a") as f:
    f.write("\n## Training\n\nkeep me\n")
  _timing.write_section(path, "## Forward", "## Forward\n\nv2\nmore\n")
  assert open(path).read() == "# Benchmarks\n\n## Forward\n\nv2\nmore\n\n## Training\n\nkeep me\n"
  _timing.write_section(path, "## Training", "## Training\n\nnew\n")
  assert open(path).read() == "# Benchmarks\n\n## Forward\n\nv2\nmore\n\n## Training\n\nnew\n"
  assert [n for n in os.listdir(tmp_path)] == ["BENCHMARKS.md"]
  with pytest.raises(ValueError, match="## Other"):
    _timing.write_section(path, "## Other", "## Forward\n")


def test_cpu_name_is_text():
  assert isinstance(_timing.cpu_name(), str) and _timing.cpu_name()
