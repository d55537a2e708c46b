"""Bad input to `sslbench-jax probe` / `features`: one line naming the file, exit 2,
nothing stored (issue 10, "Bad input to probes and features").

Every case here gave a silent wrong number or a traceback on the code before
the fix: NaN/inf feature rows (linear / least squares stored chance accuracy,
linear / logreg / least squares scored a NaN test row as class 0), truncated
or non-npz feature files, test classes the probe never saw, ``--knn_k`` above
the training set size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

from absl import flags
import numpy as np
import pytest
from sklearn.datasets import load_digits

from sslbench_jax.features import io
from sslbench_jax.probes import command
from sslbench_jax.probes import leastsquares
from sslbench_jax.probes import linear
from sslbench_jax.probes import logreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOL_FLAGS = {
    "knn": ["--knn_k", "5"],
    "linear": ["--epochs", "1", "--batch_size", "128", "--warmup_epochs", "0",
               "--lr", "0.1", "--batchnorm", "false"],
    "logreg": ["--c", "1", "--max_iter", "20"],
    "leastsquares": ["--l2", "8"],
    "fewshot": ["--setups", "5shot", "--tries", "1", "--fewshot_probes",
                "knn,leastsquares"],
}


@pytest.fixture(scope="module")
def digits():
  x, y = load_digits(return_X_y=True)
  return (x / 16.0).astype(np.float32)[:600], y[:600]


def _save(path, x, y, split, **meta):
  io.save(str(path), io.FeatureSet(x, y, np.arange(len(x)).astype(str),
                                   dict(arch="pixels", dataset="digits", split=split,
                                        **meta)))
  return str(path)


@pytest.fixture(scope="module")
def clean(digits, tmp_path_factory):
  x, y = digits
  d = tmp_path_factory.mktemp("clean")
  return _save(d / "train.npz", x[:400], y[:400], "train"), _save(
      d / "test.npz", x[400:], y[400:], "test")


def _probe(argv, capsys):
  """Runs `probe` in-process; returns (exit code, stdout, stderr)."""
  command.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["probe", "--noprogress"] + argv)
  code = 0
  try:
    command.main(["probe"])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _cli(*argv):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run([sys.executable, "-m", "sslbench_jax.cli", *argv], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=180)


# ---------------------------------------------------------------- non-finite

@pytest.mark.parametrize("protocol", sorted(PROTOCOL_FLAGS))
@pytest.mark.parametrize("side", ["train", "test"])
def test_nonfinite_rows_are_refused_by_every_protocol(protocol, side, digits, clean,
                                                      tmp_path, capsys):
  x, y = digits
  bad_rows = [3, 17, 250] if side == "train" else [0, 101]
  xs = (x[:400] if side == "train" else x[400:]).copy()
  for j, r in enumerate(bad_rows):
    xs[r, j] = (np.nan, np.inf, -np.inf)[j % 3]
  ys = y[:400] if side == "train" else y[400:]
  bad = _save(tmp_path / f"{side}_bad.npz", xs, ys, side)
  tr, te = (bad, clean[1]) if side == "train" else (clean[0], bad)
  results = tmp_path / "results.jsonl"
  code, out, err = _probe(["--features_train", tr, "--features_test", te,
                           "--protocol", protocol, "--results", str(results)] +
                          PROTOCOL_FLAGS[protocol], capsys)
  assert code == 2
  # Counted independently: rows with any non-finite entry.
  n_bad = int((~np.isfinite(xs)).any(1).sum())
  assert n_bad == len(bad_rows)
  line, = err.strip().splitlines()
  assert bad in line and f"{n_bad} of {len(xs)} feature rows contain NaN or inf" in line
  assert not results.exists() and "appended" not in out


def test_nonfinite_rows_exit_2_from_the_cli(digits, clean, tmp_path):
  x, y = digits
  xs = x[400:].copy()
  xs[5] = np.nan
  bad = _save(tmp_path / "nan_test.npz", xs, y[400:], "test")
  results = tmp_path / "r.jsonl"
  r = _cli("probe", "--features_train", clean[0], "--features_test", bad,
           "--protocol", "leastsquares", "--l2", "8", "--results", str(results))
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: {bad}: 1 of {len(xs)} feature rows contain NaN or inf "
                    "(first at row 5); refusing to use them"]
  assert not results.exists()


@pytest.mark.parametrize("fit", ["linear", "logreg", "leastsquares"])
def test_probe_functions_refuse_a_nan_test_row(fit, digits):
  """The library functions too (they scored a NaN row as class 0)."""
  x, y = digits
  xte = x[400:].copy()
  xte[7, 0] = np.nan
  with pytest.raises(ValueError, match=r"test_features.*1 of 200 rows contain NaN "
                     r"or inf \(first at row 7\)"):
    if fit == "linear":
      linear.fit_select({"x": x[:400]}, y[:400], {"x": xte}, y[400:], 10,
                 [linear.HeadConfig("x", lr=0.1)],
                 linear.TrainConfig(epochs=1, batch_size=128), progress=False)
    elif fit == "logreg":
      logreg.fit_select(x[:400], y[:400], xte, y[400:], 10, [1.0], progress=False)
    else:
      leastsquares.fit_select(x[:400], y[:400], xte, y[400:], 10, [8.0])


def test_classify_refuses_nonfinite_logits(tmp_path):
  """The `classify` protocol reads logits files through features.io too."""
  from sslbench_jax.protocols import base  # pylint: disable=g-import-not-at-top
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  logits[2, 1] = np.inf
  path = _save(tmp_path / "logits.npz", logits, np.arange(6) % 4, "test")
  classify = registry.get("classify")
  with pytest.raises(ValueError, match=f"{path}: 1 of 6 feature rows contain NaN"):
    classify.run(None, base.load_features(path), classify.options(),
                 context=base.RunContext(model="m", dataset="digits"))


def test_nonfinite_features_can_be_read_when_asked(digits, tmp_path):
  x, y = digits
  xs = x[:10].copy()
  xs[1] = np.nan
  path = _save(tmp_path / "f.npz", xs, y[:10], "train")
  np.testing.assert_array_equal(io.load(path, allow_nonfinite=True).features, xs)


# ---------------------------------------------------------------- broken files

def _write_npz(path, **arrays):
  np.savez(str(path), **arrays)
  return str(path)


def _good_arrays(n=5, d=3):
  return dict(features=np.ones((n, d), np.float32), labels=np.arange(n) % 2,
              ids=np.arange(n).astype(str), meta=np.asarray(json.dumps({"a": 1})))


def _bad_files(tmp_path, good):
  """(name, path, expected message fragment) of broken feature files."""
  data = open(good, "rb").read()
  files = []

  def raw(name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    files.append((name, str(p), msg))

  raw("truncated.npz", data[:len(data) // 2], "cannot read feature file")
  raw("truncated_tail.npz", data[:-30], "cannot read feature file")
  raw("empty.npz", b"", "not an .npz (zip) archive")
  # A JPEG renamed .npz (a JPEG's SOI/APP0 header and some bytes).
  raw("photo.npz", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4,
      "not an .npz (zip) archive")
  npy = tmp_path / "array.npy"
  np.save(npy, np.ones((4, 3), np.float32))
  raw("npy_renamed.npz", npy.read_bytes(), "not an .npz (zip) archive")
  # A pickle: never unpickled.
  raw("pickle.npz", b"\x80\x04\x95" + b"cos\nsystem\n" * 3, "not an .npz (zip) archive")
  zp = tmp_path / "other.zip.npz"
  with zipfile.ZipFile(zp, "w") as z:
    z.writestr("readme.txt", "hello")
  files.append(("other zip", str(zp), "missing ['features', 'labels', 'ids', 'meta']"))
  # A bit flip inside an array: the zip CRC catches it.
  flipped = bytearray(data)
  at = data.index(b"\x93NUMPY") + 140
  flipped[at] ^= 0xFF
  raw("bitflip.npz", bytes(flipped), "cannot read feature file")

  def arrays(name, msg, **override):
    a = dict(_good_arrays(), **override)
    a = {k: v for k, v in a.items() if v is not None}
    files.append((name, _write_npz(tmp_path / f"{name}.npz", **a), msg))

  arrays("no_labels", "missing ['labels']", labels=None)
  arrays("int_features", "features must be a floating-point (N, D) array, got int64",
         features=np.ones((5, 3), np.int64))
  arrays("1d_features", "features must be a floating-point (N, D) array",
         features=np.ones((5,), np.float32))
  arrays("str_labels", "labels must be (N,) integer classes",
         labels=np.array(list("abcde")))
  arrays("float_labels", "labels must be (N,) integer classes",
         labels=np.zeros(5, np.float32))
  arrays("short_labels", "5 feature rows but 4 labels and 5 ids",
         labels=np.arange(4))
  arrays("long_ids", "5 feature rows but 5 labels and 6 ids",
         ids=np.arange(6).astype(str))
  arrays("meta_not_json", "meta is not JSON", meta=np.asarray("{not json"))
  arrays("meta_list", "meta must be a JSON object, got list",
         meta=np.asarray("[1, 2]"))
  arrays("meta_array", "meta must be a 0-d JSON string",
         meta=np.zeros((2,), np.float32))
  # Object arrays need pickle: refused, never unpickled.
  arrays("object_ids", "cannot read feature file",
         ids=np.array([{"x": 1}] * 5, dtype=object))
  return files


def test_broken_feature_files_give_one_line_naming_the_file(tmp_path):
  good = _write_npz(tmp_path / "good.npz", **_good_arrays())
  io.load(good)  # the reference file itself is fine
  for name, path, msg in _bad_files(tmp_path, good):
    with pytest.raises(ValueError) as e:
      io.load(path)
    text = str(e.value)
    assert path in text and msg in text, (name, text)
    assert "\n" not in text, (name, text)


@pytest.mark.parametrize("which", ["train", "test"])
def test_broken_feature_files_exit_2_without_rows(which, clean, tmp_path, capsys):
  good = _write_npz(tmp_path / "good.npz", **_good_arrays())
  for name, path, msg in _bad_files(tmp_path, good):
    results = tmp_path / "r.jsonl"
    tr, te = (path, clean[1]) if which == "train" else (clean[0], path)
    code, out, err = _probe(["--features_train", tr, "--features_test", te,
                             "--protocol", "knn", "--knn_k", "5",
                             "--results", str(results)], capsys)
    assert code == 2, (name, err)
    line, = err.strip().splitlines()
    assert path in line and msg in line, (name, line)
    assert not results.exists()


def test_jpeg_renamed_npz_from_the_cli(clean, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  fake = tmp_path / "features.npz"
  Image.new("RGB", (8, 8), (200, 10, 10)).save(fake, format="JPEG")
  r = _cli("probe", "--features_train", str(fake), "--features_test", clean[1])
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and str(fake) in errors[0]
  assert "not an .npz (zip) archive" in errors[0]


# ------------------------------------------------- qualified (warned) results

@pytest.mark.parametrize("protocol", ["knn", "linear", "logreg", "leastsquares"])
def test_test_classes_absent_from_training_are_warned_and_recorded(
    protocol, digits, tmp_path, caplog):
  x, y = digits
  keep = y[:400] < 8                     # train on classes 0..7 only
  tr = _save(tmp_path / "train.npz", x[:400][keep], y[:400][keep], "train")
  te = _save(tmp_path / "test.npz", x[400:], y[400:], "test")
  opts = dict(features_train=tr, features_test=te, protocol=protocol,
              num_classes=10, progress=False, knn_k=["5"], epochs=1, batch_size=128,
              warmup_epochs=0, lr=["0.1"], batchnorm=["false"], c=["1"], max_iter=20,
              l2=["8"])
  from sslbench_jax.protocols import registry  # pylint: disable=g-import-not-at-top
  uses = {f.name for f in registry.fields(protocol)}
  opts = {k: v for k, v in opts.items()
          if k in uses or k not in command.option_fields()}
  with caplog.at_level("WARNING", logger="absl"):
    rows = command.run(opts)
  n_unseen = int(np.sum(y[400:] >= 8))  # independent count
  assert n_unseen > 0
  msg = (f"{n_unseen} of 200 test examples belong to 2 classes absent from the "
         "training classes (e.g. [8, 9]); the probe can never predict them")
  assert f"{msg} (test {te}, train {tr})" in caplog.text
  assert rows and all(r["hparams"]["warnings"] == [msg] for r in rows)
  # The rows survive the results store (hparams is stored as JSON).
  from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "r.jsonl")
  store.append_results(path, rows)
  assert all(json.loads(h)["warnings"] == [msg]
             for h in store.read_results(path)["hparams"])
  # The unseen examples are errors: top-1 is at most the seen fraction.
  top1 = next(r["value"] for r in rows if r["metric"] == "top1")
  assert top1 <= 100.0 * (200 - n_unseen) / 200 + 1e-9


def test_no_warning_when_every_test_class_was_seen(clean, caplog):
  with caplog.at_level("WARNING", logger="absl"):
    rows = command.run(dict(features_train=clean[0], features_test=clean[1],
                            protocol="leastsquares", l2=["8"]))
  assert "absent from the training classes" not in caplog.text
  assert all("warnings" not in r["hparams"] for r in rows)


def test_knn_k_above_the_training_set_stores_the_k_used(digits, tmp_path, caplog):
  from sklearn.neighbors import KNeighborsClassifier  # pylint: disable=g-import-not-at-top
  x, y = digits
  tr = _save(tmp_path / "small_train.npz", x[:30], y[:30], "train")
  te = _save(tmp_path / "test.npz", x[400:], y[400:], "test")
  with caplog.at_level("WARNING", logger="absl"):
    rows = command.run(dict(features_train=tr, features_test=te, protocol="knn",
                            knn_metric="euclidean", knn_k=["10", "50", "100"],
                            progress=False))
  msg = "--knn_k 50, 100 > the 30 training examples: used k=30"
  assert f"{msg} ({tr})" in caplog.text
  by_k = {}
  for r in rows:
    by_k.setdefault(r["hparams"]["k"], {})[r["metric"]] = r
  assert sorted(by_k) == [10, 30]      # one set of rows per k actually used
  clipped = by_k[30]["top1"]["hparams"]
  assert clipped["k_requested"] == [50, 100] and clipped["warnings"] == [msg]
  assert "k_requested" not in by_k[10]["top1"]["hparams"]
  for k, metrics in by_k.items():
    clf = KNeighborsClassifier(k, weights="distance").fit(x[:30], y[:30])
    assert metrics["top1"]["value"] == pytest.approx(100 * clf.score(x[400:], y[400:]))


def test_fewshot_knn_rows_store_the_k_used(clean):
  rows = command.run(dict(features_train=clean[0], features_test=clean[1],
                          protocol="fewshot", setups=["1shot", "5shot"], tries=1,
                          fewshot_probes=["knn"], fewshot_k=20, progress=False))
  ks = {r["hparams"]["setup"]: (r["hparams"]["k"], r["hparams"].get("k_requested"))
        for r in rows}
  # 1 shot x 10 classes = 10 examples: k = 10; 5 shots: 50 >= 20.
  assert ks == {"1shot": (10, 20), "5shot": (20, None)}


# ------------------------------------------------ unwritable results stores

@pytest.fixture
def read_only_dir(tmp_path):
  """A directory nobody can write to: a read-only tmpfs (root), else mode 0555."""
  d = tmp_path / "ro"
  d.mkdir()
  if os.geteuid() != 0:
    d.chmod(0o555)
    yield d
    d.chmod(0o755)
    return
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                     capture_output=True, text=True, check=False)
  if r.returncode:
    pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.strip()}")
  try:
    yield d
  finally:
    subprocess.run(["umount", str(d)], check=False)


def test_results_in_a_read_only_location_fail_before_probing(clean, read_only_dir,
                                                             capsys):
  results = read_only_dir / "sub" / "results.jsonl"
  command.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["probe", "--features_train", clean[0], "--features_test", clean[1],
               "--protocol", "leastsquares", "--l2", "8", "--results", str(results)])
  # The OSError reaches the CLI unchanged (not turned into "bad input")...
  with pytest.raises(OSError) as e:
    command.main(["probe"])
  assert e.value.filename == str(results)
  assert "leastsquares" not in capsys.readouterr().out  # ...before any probing
  # ...and the CLI prints one line, exit 1, nothing written.
  r = _cli("probe", "--features_train", clean[0], "--features_test", clean[1],
           "--protocol", "leastsquares", "--l2", "8", "--results", str(results))
  assert r.returncode == 1, r.stderr
  errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and str(results) in errors[0], r.stderr
  assert "Traceback" not in r.stderr
  assert os.listdir(read_only_dir) == []


def test_results_on_a_full_disk_exit_1_without_rows(clean):
  # /dev/full: every write fails with ENOSPC, as on a full disk.
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  r = _cli("probe", "--features_train", clean[0], "--features_test", clean[1],
           "--protocol", "leastsquares", "--l2", "8", "--results", "/dev/full")
  assert r.returncode == 1, r.stderr
  errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and "/dev/full" in errors[0], r.stderr
  assert "No space left on device" in errors[0] and "Traceback" not in r.stderr
  assert "appended" not in r.stdout


def test_write_check_leaves_nothing(tmp_path):
  command.check_writable(str(tmp_path / "a" / "b" / "r.jsonl"))
  assert os.listdir(tmp_path) == []
  existing = tmp_path / "r.jsonl"
  existing.write_text("x\n")
  command.check_writable(str(existing))
  assert existing.read_text() == "x\n" and os.listdir(tmp_path) == ["r.jsonl"]
  with pytest.raises(NotADirectoryError):
    command.check_writable(str(existing / "r.jsonl"))


def test_missing_or_unreadable_paths_keep_their_os_error(tmp_path, clean, capsys):
  # About the path, not the bytes: the CLI maps these by type (missing -> 2).
  with pytest.raises(FileNotFoundError):
    io.load(str(tmp_path / "nope.npz"))
  with pytest.raises(IsADirectoryError):
    io.load(str(tmp_path))
  code, _, err = _probe(["--features_train", str(tmp_path / "nope.npz"),
                         "--features_test", clean[1]], capsys)
  assert code == 2 and "no such file" in err and str(tmp_path / "nope.npz") in err
