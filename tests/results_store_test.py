"""Results store: validation, concurrent appends, truncated lines, dedup, export."""

import csv
import json
import multiprocessing
import os

import numpy as np
import pytest

from sslbench_jax.results import store


def _row(i=0, **kw):
  row = dict(model=f"m{i % 5}", dataset="imagenet", split="validation",
             protocol="linear", metric="top1", value=50.0 + (i % 37) / 3,
             n_examples=50000, seed=i, hparams={"lr": 0.1, "bn": False},
             checkpoint_sha256="ab" * 32, device_count=8)
  row.update(kw)
  return row


def _writer(args):
  path, proc, n = args
  for j in range(n):
    # Rows of varying length, some batches of several rows.
    store.append_results(path, [_row(proc * 1000 + j, model=f"p{proc}" + "x" * (j % 50))
                                for _ in range(1 + j % 3)])
  return proc


def test_concurrent_writers_keep_all_rows_intact(tmp_path):
  path = str(tmp_path / "r.jsonl")
  procs, n = 4, 60
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(procs) as pool:
    assert sorted(pool.map(_writer, [(path, p, n) for p in range(procs)])) == list(range(procs))
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  assert lines[-1] == b""
  parsed = [json.loads(l) for l in lines[:-1]]  # every line is complete JSON
  expected = procs * sum(1 + j % 3 for j in range(n))
  assert len(parsed) == expected
  rec = store.read_results(path, deduplicate=False)
  assert len(rec) == expected
  for p in range(procs):
    seeds = sorted(set(int(s) for s, m in zip(rec.seed, rec.model) if m.startswith(f"p{p}")))
    assert seeds == [p * 1000 + j for j in range(n)]


def test_truncated_last_line_ignored_with_warning_and_next_append_ok(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(1), _row(2)])
  with open(path, "ab") as f:  # a writer killed mid-line
    f.write(json.dumps(store.normalize_row(_row(3))).encode()[:40])
  with pytest.warns(store.ResultsStoreWarning, match="truncated trailing line"):
    rec = store.read_results(path)
  assert len(rec) == 2 and list(rec.seed) == [1, 2]
  store.append_results(path, [_row(4)])
  with pytest.warns(store.ResultsStoreWarning, match="corrupt line skipped"):
    rec = store.read_results(path)
  assert list(rec.seed) == [1, 2, 4]


def test_dedup_keeps_latest(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(0, value=10.0, timestamp="2026-01-01T00:00:00+00:00"),
                              _row(1, value=20.0)])
  # Re-run of row 0 (same key) with a later timestamp; a different-hparams row.
  store.append_results(path, [_row(0, value=11.0, timestamp="2026-02-01T00:00:00+00:00"),
                              _row(0, value=12.0, hparams={"lr": 0.2})])
  # An older re-run appended last must not win.
  store.append_results(path, [_row(0, value=9.0, timestamp="2025-01-01T00:00:00+00:00")])
  raw = store.read_results(path, deduplicate=False)
  assert len(raw) == 5
  dups = store.find_duplicates(raw)
  assert len(dups) == 1 and dups[0][0] == "m0"
  rec = store.read_results(path)
  assert sorted(rec.value.tolist()) == [11.0, 12.0, 20.0]
  assert store.find_duplicates(rec) == []


def test_validation_errors(tmp_path):
  path = str(tmp_path / "r.jsonl")
  bad = _row()
  del bad["n_examples"]
  with pytest.raises(ValueError, match="missing required keys \\['n_examples'\\]"):
    store.append_results(path, [bad])
  with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
    store.append_results(path, [_row(colour="red")])
  with pytest.raises(ValueError, match="NaN"):
    store.append_results(path, [_row(0), _row(1, value=float("nan"))])
  with pytest.raises(ValueError, match="percentage"):
    store.append_results(path, [_row(value=0.5 * 200)] + [_row(value=101.0)])
  assert not os.path.exists(path)  # nothing written on error
  with pytest.raises(FileNotFoundError, match="not found"):
    store.read_results(str(tmp_path / "nope.jsonl"))


def test_fills_versions_timestamp_and_sorts_hparams(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(0, hparams='{"z": 1, "a": 2}')])
  rec = store.read_results(path)
  assert rec.hparams[0] == '{"a": 2, "z": 1}'
  versions = json.loads(rec.versions[0])
  assert set(versions) == {"jax", "flax", "numpy", "sslbench_jax"}
  assert versions["numpy"] == np.__version__
  assert rec.timestamp[0].endswith("+00:00")


def test_export_csv_and_parquet(tmp_path):
  path = str(tmp_path / "r.jsonl")
  rows = [_row(i) for i in range(7)]
  store.append_results(path, rows)
  out = str(tmp_path / "out" / "r.csv")
  assert store.export_csv(path, out) == 7
  with open(out) as f:
    got = list(csv.DictReader(f))
  for need in ("model", "dataset", "split", "protocol", "metric", "value", "n_examples"):
    assert need in got[0]
  np.testing.assert_allclose([float(r["value"]) for r in got],
                             [r["value"] for r in rows], rtol=0, atol=0)
  pq = pytest.importorskip("pyarrow.parquet")
  outp = str(tmp_path / "r.parquet")
  assert store.export_parquet(path, outp) == 7
  table = pq.read_table(outp)
  assert table.column("value").to_pylist() == [r["value"] for r in rows]


@pytest.mark.parametrize("metric", ["top1", "top5", "real_top1", "subset_top1",
                                    "mean_per_class"])
def test_every_accuracy_metric_is_range_checked(tmp_path, metric):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(0, metric=metric, value=100.0),
                              _row(1, metric=metric, value=0.0)])
  for value in (100.5, -0.1):
    with pytest.raises(ValueError, match=f"accuracy '{metric}'={value} is not a percentage"):
      store.append_results(path, [_row(2, metric=metric, value=value)])
  assert len(store.read_results(path)) == 2
  # Not an accuracy: any finite value.
  store.append_results(path, [_row(3, metric="loss", value=250.0)])


def test_primary_export_keeps_each_test_sets_own_metric(tmp_path):
  path = str(tmp_path / "r.jsonl")
  cell = dict(model="m", seed=0, hparams={"k": 20}, protocol="knn")
  rows = [
      _row(**cell, dataset="imagenet1k", metric="top1", value=70.0),
      _row(**cell, dataset="imagenet1k", metric="top5", value=90.0),
      _row(**cell, dataset="imagenet_real", metric="real_top1", value=76.0),
      _row(**cell, dataset="imagenet_r", metric="top1", value=20.0),
      _row(**cell, dataset="imagenet_r", metric="subset_top1", value=30.0),
      _row(**cell, dataset="imagenet_r", split="test", metric="top1", value=21.0),
      # few-shot: no primary metric among its rows
      _row(**dict(cell, protocol="fewshot"), dataset="digits", metric="top1_mean", value=5.0),
  ]
  store.append_results(path, rows)
  rec = store.read_results(path)
  kept = sorted((str(r.dataset), str(r.split), str(r.metric), float(r.value))
                for r in rec[store.primary_mask(rec)])
  assert kept == [("imagenet1k", "validation", "top1", 70.0),
                  ("imagenet_r", "test", "top1", 21.0),  # another measurement (split)
                  ("imagenet_r", "validation", "subset_top1", 30.0),
                  ("imagenet_real", "validation", "real_top1", 76.0)]
  out = str(tmp_path / "primary.csv")
  assert store.export_primary_csv(path, out) == 4
  with open(out) as f:
    got = list(csv.DictReader(f))
  assert {r["metric"] for r in got} == {store.PRIMARY}
  assert sorted((r["dataset"], r["split"], float(r["value"])) for r in got) == [
      (d, s, v) for d, s, _, v in kept]


def _remover(args):
  path, rounds = args
  removed = 0
  for _ in range(rounds):
    removed += len(store.remove_rows(path, lambda r: r["model"] == "victim"))
    store.append_results(path, [_row(0, model="victim")])
  return removed


def test_remove_rows_never_loses_a_concurrent_append(tmp_path):
  """Rows are removed by rewriting the file; appenders waiting meanwhile re-lock the new one."""
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(0, model="victim")] * 3)
  procs, n = 3, 40
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(procs + 1) as pool:
    removing = pool.map_async(_remover, [(path, 30)])
    assert sorted(pool.map(_writer, [(path, p, n) for p in range(procs)])) == list(range(procs))
    assert removing.get(timeout=600) == [3 + 29]  # every victim but the last one added
  rec = store.read_results(path, deduplicate=False)
  assert list(rec.model).count("victim") == 1
  expected = procs * sum(1 + j % 3 for j in range(n))
  assert len(rec) - 1 == expected
  for p in range(procs):
    seeds = sorted(set(int(s) for s, m in zip(rec.seed, rec.model) if m.startswith(f"p{p}")))
    assert seeds == [p * 1000 + j for j in range(n)]
  assert os.listdir(tmp_path) == ["r.jsonl"]  # no temporary file left


def test_remove_rows_keeps_unparsable_lines_and_other_writers_rows(tmp_path):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(1, step="m/p/d", run_id="run1"), _row(2)])
  with open(path, "ab") as f:
    f.write(b"not json\n")
  store.append_results(path, [_row(3, step="m/p/d", run_id="run2")])
  dropped = store.remove_rows(path, lambda r: r["step"] == "m/p/d" and r["run_id"] == "run1")
  assert [(r["seed"], r["run_id"]) for r in dropped] == [(1, "run1")]
  with open(path, "rb") as f:
    assert b"not json\n" in f.read()
  with pytest.warns(store.ResultsStoreWarning, match="corrupt line skipped"):
    rec = store.read_results(path)
  assert [(int(s), str(st), str(r)) for s, st, r in zip(rec.seed, rec.step, rec.run_id)] == [
      (2, "", ""), (3, "m/p/d", "run2")]
  mtime = os.stat(path).st_mtime_ns
  assert store.remove_rows(path, lambda r: False) == []
  assert os.stat(path).st_mtime_ns == mtime  # nothing to drop: not rewritten


def test_full_disk_on_append_names_the_store(tmp_path, monkeypatch):
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, [_row(1)])

  def full(fd, data):
    raise OSError(28, os.strerror(28))  # what os.write raises: no file name

  monkeypatch.setattr(os, "write", full)
  with pytest.raises(OSError) as e:
    store.append_results(path, [_row(2)])
  assert e.value.errno == 28 and e.value.filename == path
