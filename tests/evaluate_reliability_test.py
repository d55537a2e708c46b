"""``sslbench-jax evaluate`` under bad configs, re-runs, concurrency and faults.

A tiny but real evaluation: a ResNet-18 checkpoint with random weights
(written by torch, converted by the project), a 3-class image folder at 32 px,
kNN and least-squares probes. The references are independent: rows are
compared with scikit-learn's kNN on the features the run saved, and with the
numbers of a fresh run in another workdir.
"""

import errno
import fcntl
import json
import logging as std_logging
import os
import subprocess
import sys

from absl import logging
import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn.neighbors import KNeighborsClassifier
import torch

from sslbench_jax import evaluate
from sslbench_jax import workdir as workdir_lib
from sslbench_jax.features import io
from sslbench_jax.results import store
import torch_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
_CLASSES, _PER_CLASS = 3, {"train": 6, "test": 3}


def _checkpoint(path, seed):
  model = torch_resnet.randomize(torch_resnet.resnet("resnet18"), seed)
  torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")},
             str(path))
  return str(path)


def _images(root):
  """<root>/{train,test}/c<k>/*.png: a class colour plus noise."""
  rs = np.random.RandomState(0)
  colours = rs.randint(0, 256, (_CLASSES, 1, 1, 3))
  for split, n in _PER_CLASS.items():
    for c in range(_CLASSES):
      os.makedirs(os.path.join(root, split, f"c{c}"))
      for i in range(n):
        pixels = np.clip(colours[c] + rs.randint(-50, 50, (36, 36, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(root, split, f"c{c}", f"{i}.png"))
  return str(root)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  return dict(ckpt0=_checkpoint(root / "a.pth", 0), ckpt1=_checkpoint(root / "b.pth", 1),
              data=_images(root / "data"), root=root)


def _config(ckpt, data, knn_k=(3,)):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {"rn18": dict(arch="resnet18", checkpoint=ckpt, select=None,
                           allow_missing=None, options={})}
  c.datasets = {"toy": dict(dataset="folder", train_split="train", test_split="test",
                            data_dir=data, preprocessing="smoke_32")}
  c.protocols = {
      "knn": dict(type="knn", datasets=["toy"], knn_k=list(knn_k), knn_metric="euclidean"),
      "ls": dict(type="leastsquares", datasets=["toy"], l2=[1.0, 100.0]),
  }
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=8, steps_per_shard=2)
  c.analysis = dict(n_boot=10, n_perm=10)
  return c


def _rows(workdir):
  with open(os.path.join(workdir, "results.jsonl")) as f:
    return [json.loads(line) for line in f]


def _done(workdir):
  with open(os.path.join(workdir, "done.json")) as f:
    return json.load(f)


def _knn_reference(workdir, k):
  tr = io.load(os.path.join(workdir, "features", "rn18__toy__train__pre_logits.npz"))
  te = io.load(os.path.join(workdir, "features", "rn18__toy__test__pre_logits.npz"))
  ref = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(tr.features, tr.labels)
  return 100.0 * np.mean(ref.predict(te.features) == te.labels)


class _Logs(std_logging.Handler):

  def __init__(self):
    super().__init__(std_logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def _run_logged(config, workdir):
  handler = _Logs()
  logger = logging.get_absl_logger()
  level = logger.level
  logger.setLevel(std_logging.INFO)  # pinned: other tests change absl's level
  logger.addHandler(handler)
  try:
    summary = evaluate.run(config, workdir)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  return summary, handler.lines


def _tree(workdir):
  out = {}
  for d, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(d, f)
      out[os.path.relpath(p, workdir)] = os.stat(p).st_mtime_ns
  return out


# --------------------------------------------------------------------------
# Item: the whole config is validated before anything is written.

_BAD = [
    ("config.datasets.toy.preprocessing 'smoke_31' unknown",
     lambda c: c.datasets.toy.__setitem__("preprocessing", "smoke_31")),
    ("knn_metric='cosin' must be one of cosine, euclidean",
     lambda c: c.protocols.knn.__setitem__("knn_metric", "cosin")),
    ("config.extraction.dtype='float64' unknown",
     lambda c: c.extraction.__setitem__("dtype", "float64")),
    ("representation='cls' is not an output of resnet18",
     lambda c: c.extraction.__setitem__("representation", "cls")),
    ("batch_size_per_device=0 must be an integer >= 1",
     lambda c: c.extraction.__setitem__("batch_size_per_device", 0)),
    ("batch_size_per_device=True must be an integer",
     lambda c: c.extraction.__setitem__("batch_size_per_device", True)),
    ("steps_per_shard=2.5 must be an integer",
     lambda c: c.__setitem__("extraction", dict(c.extraction.to_dict(), steps_per_shard=2.5))),
    ("knn_k\\[0\\]='ten' must be an integer",
     lambda c: c.protocols.knn.__setitem__("knn_k", ["ten"])),
    ("knn_k\\[0\\]=0 must be > 0",
     lambda c: c.protocols.knn.__setitem__("knn_k", [0])),
    ("l2\\[0\\]=-1.0 must be >= 0",
     lambda c: c.protocols.ls.__setitem__("l2", [-1.0])),
    ("zscore='yes' must be True or False",
     lambda c: c.protocols.knn.__setitem__("zscore", "yes")),
    ("holdout=1.5 must be in \\(0, 1\\)",
     lambda c: c.protocols.ls.__setitem__("holdout", 1.5)),
    ("option\\(s\\) \\['lr'\\] are not used by type knn",
     lambda c: c.protocols.knn.__setitem__("lr", [0.1])),
    ("batchnorm\\[0\\]='maybe' must be True or False",
     lambda c: c.protocols.__setitem__("lin", dict(type="linear", datasets=["toy"],
                                                    batchnorm=["maybe"]))),
    ("optimizer\\[0\\]='sgdd' must be one of sgd, adamw",
     lambda c: c.protocols.__setitem__("lin", dict(type="linear", datasets=["toy"],
                                                    optimizer=["sgdd"]))),
    ("epochs='10' must be an integer",
     lambda c: c.protocols.__setitem__("lin", dict(type="linear", datasets=["toy"],
                                                    epochs="10"))),
    ("setups\\[0\\]='5shots' must be 'Kshot'",
     lambda c: c.protocols.__setitem__("fs", dict(type="fewshot", datasets=["toy"],
                                                   setups=["5shots"]))),
    ("fewshot_probes\\[0\\]='svm' must be one of",
     lambda c: c.protocols.__setitem__("fs", dict(type="fewshot", datasets=["toy"],
                                                   fewshot_probes=["svm"]))),
    ("config.models.rn18.options: unknown key 'nosuch' for resnet18",
     lambda c: c.models.rn18.__setitem__("options", {"nosuch": 1})),
    ("allow_missing='\\(' is not a valid regex",
     lambda c: c.models.rn18.__setitem__("allow_missing", "(")),
    ("config.seed=-1 must be an integer >= 0", lambda c: c.__setitem__("seed", -1)),
    ("entry name 'a/b' must be letters",
     lambda c: c.protocols.__setitem__("a/b", dict(type="knn", datasets=["toy"]))),
    ("config.datasets.toy.data_dir: /nonexistent/toy does not exist",
     lambda c: c.datasets.toy.__setitem__("data_dir", "/nonexistent/toy")),
    ("config.models.rn18.checkpoint: checkpoint /nonexistent.pth does not exist",
     lambda c: c.models.rn18.__setitem__("checkpoint", "/nonexistent.pth")),
]


@pytest.mark.parametrize("message, mutate", _BAD, ids=[m[:40] for m, _ in _BAD])
def test_invalid_config_fails_before_writing_anything(inputs, tmp_path, message, mutate):
  config = _config(inputs["ckpt0"], inputs["data"])
  mutate(config)
  workdir = tmp_path / "work"
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    evaluate.run(config, str(workdir))
  assert not workdir.exists()


def _cli(*args, env=None, timeout=600):
  return subprocess.run([sys.executable, "-m", "sslbench_jax.cli", *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


def _one_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return lines[-1]


@pytest.mark.parametrize("args, message", [
    # The original bug: an unknown preset failed after weights, features, two
    # result rows and done.json were written.
    (["--config.datasets.digits.preprocessing=nope"], "preprocessing 'nope' unknown"),
    (["--config", DEMO + ":tiny=maybe"], "tiny='maybe' is not a boolean"),
    (["--config.protocols.linear.epochs=-3"], "epochs=-3 must be > 0"),
    (["--config.extraction.dtype=float16"], "dtype='float16' unknown"),
])
def test_cli_invalid_config_one_line_exit_2_nothing_written(tmp_path, args, message):
  workdir = tmp_path / "work"
  config = [] if "--config" in args else ["--config", DEMO + ":tiny=True"]
  proc = _cli("evaluate", *config, "--workdir", str(workdir), *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = _one_line(proc)
  assert line.startswith("evaluate: error: ") and message in line, line
  assert not workdir.exists()


# --------------------------------------------------------------------------
# Item: a changed input recomputes its steps; each run keeps its config.

@pytest.fixture(scope="module")
def reruns(inputs, tmp_path_factory):
  """Run 1 on checkpoint a; the file replaced by checkpoint b under the same
  name, run 2; then knn_k changed, run 3; and a fresh run on b elsewhere."""
  ckpt = str(inputs["root"] / "model.pth")
  workdir = str(tmp_path_factory.mktemp("reruns") / "work")
  out = {}
  os.link(inputs["ckpt0"], ckpt)
  out["first"] = _run_logged(_config(ckpt, inputs["data"]), workdir)
  out["rows1"], out["done1"] = _rows(workdir), _done(workdir)
  os.remove(ckpt)
  os.link(inputs["ckpt1"], ckpt)
  out["second"] = _run_logged(_config(ckpt, inputs["data"]), workdir)
  out["rows2"], out["done2"] = _rows(workdir), _done(workdir)
  out["third"] = _run_logged(_config(ckpt, inputs["data"], knn_k=(5,)), workdir)
  out["rows3"], out["done3"] = _rows(workdir), _done(workdir)
  fresh = str(tmp_path_factory.mktemp("fresh") / "work")
  evaluate.run(_config(ckpt, inputs["data"]), fresh)  # the same path, now file b
  out["fresh_rows"] = _rows(fresh)
  return workdir, out


def _numbers(rows):
  return sorted((r["protocol"], r["metric"], r["hparams"], r["value"]) for r in rows)


def test_changed_checkpoint_recomputes_every_step_and_drops_old_rows(inputs, reruns):
  workdir, out = reruns
  sha = {r["checkpoint_sha256"] for r in out["rows1"]}
  assert len(sha) == 1
  assert out["second"][0]["new_rows"] == len(out["rows1"]) == len(out["rows2"])
  # Only the new checkpoint's numbers, once each: those of a fresh run on it.
  assert {r["checkpoint_sha256"] for r in out["rows2"]} == {
      r["checkpoint_sha256"] for r in out["fresh_rows"]} != sha
  assert _numbers(out["rows2"]) == _numbers(out["fresh_rows"])
  # The log says why, step by step.
  why = [l for l in out["second"][1] if "inputs changed" in l]
  assert len(why) == 2 and all("model.checkpoint_sha256" in l for l in why), why
  assert {r["run_id"] for r in out["rows2"]} == {out["second"][0]["run_id"]}


def test_changed_protocol_option_recomputes_only_its_step(reruns):
  workdir, out = reruns
  third, logs = out["third"]
  knn2 = [r for r in out["rows2"] if r["protocol"] == "knn"]
  knn3 = [r for r in out["rows3"] if r["protocol"] == "knn"]
  assert third["new_rows"] == len(knn3) == len(knn2)
  assert {json.loads(r["hparams"])["k"] for r in knn3} == {5}
  # The least-squares rows are those of run 2, untouched.
  assert ([r for r in out["rows3"] if r["protocol"] == "ls"] ==
          [r for r in out["rows2"] if r["protocol"] == "ls"])
  assert out["done3"]["rn18/ls/toy"] == out["done2"]["rn18/ls/toy"]
  assert any("rn18/knn/toy" in l and "protocol.options.knn_k" in l for l in logs), logs
  top1 = [r["value"] for r in knn3 if r["metric"] == "top1"]
  assert top1 == [pytest.approx(_knn_reference(workdir, 5), abs=1e-9)]
  # One row per (step, metric): the store never holds two numbers for one step.
  keys = [(r["step"], r["protocol"], r["metric"], r["hparams"]) for r in out["rows3"]]
  assert len(keys) == len(set(keys))


def test_each_run_keeps_its_config_snapshot(reruns):
  workdir, out = reruns
  names = sorted(os.listdir(os.path.join(workdir, "configs")))
  assert names == sorted(f"{out[k][0]['run_id']}.json" for k in ("first", "second", "third"))
  with open(os.path.join(workdir, "configs", f"{out['third'][0]['run_id']}.json")) as f:
    assert json.load(f)["protocols"]["knn"]["knn_k"] == [5]
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_done_records_the_inputs_of_each_step(reruns):
  _, out = reruns
  entry = out["done2"]["rn18/knn/toy"]
  assert entry["inputs"]["model"]["checkpoint_sha256"] == out["rows2"][0]["checkpoint_sha256"]
  assert entry["inputs"]["train"]["preprocessing"] == "smoke_32"
  assert entry["inputs"]["protocol"]["options"]["knn_metric"] == "euclidean"
  assert entry["run_id"] == out["second"][0]["run_id"]
  assert entry["rows"] == sum(r["step"] == "rn18/knn/toy" for r in out["rows2"])


# --------------------------------------------------------------------------
# Item: a kill between storing rows and marking the step leaves no duplicate.

class _Killed(BaseException):
  """Stands for a kill: nothing after it runs (no except clause catches it)."""


def test_kill_between_rows_and_done_leaves_no_duplicates(inputs, tmp_path, monkeypatch):
  workdir = str(tmp_path / "work")
  config = _config(inputs["ckpt0"], inputs["data"])
  real_mark = workdir_lib.Progress.mark
  calls = []

  def mark_then_die(self, step, *args):
    calls.append(step)
    if len(calls) == 2:  # the second step's rows are stored, its mark never happens
      raise _Killed()
    return real_mark(self, step, *args)

  monkeypatch.setattr(workdir_lib.Progress, "mark", mark_then_die)
  with pytest.raises(_Killed):
    evaluate.run(config, workdir)
  monkeypatch.undo()
  crashed = _rows(workdir)
  assert {r["step"] for r in crashed} == {"rn18/knn/toy", "rn18/ls/toy"}
  assert list(_done(workdir)) == ["rn18/knn/toy"]
  summary, logs = _run_logged(config, workdir)
  rows = _rows(workdir)
  # The unfinished step's rows were dropped and computed again, once.
  assert summary["new_rows"] == sum(r["step"] == "rn18/ls/toy" for r in rows) > 0
  assert [r for r in rows if r["step"] == "rn18/knn/toy"] == [
      r for r in crashed if r["step"] == "rn18/knn/toy"]
  keys = [(r["step"], r["metric"], r["hparams"]) for r in rows]
  assert len(keys) == len(set(keys))
  assert {r["run_id"] for r in rows if r["step"] == "rn18/ls/toy"} == {summary["run_id"]}
  assert any("removed" in l and "rn18/ls/toy" in l for l in logs), logs
  assert _numbers([r for r in rows if r["step"] == "rn18/ls/toy"]) == _numbers(
      [r for r in crashed if r["step"] == "rn18/ls/toy"])
  assert not [f for f in os.listdir(workdir) if f.startswith(".tmp")]


# --------------------------------------------------------------------------
# Item: one run per workdir; state files written with unique temp names.

def test_second_evaluate_on_a_locked_workdir_stops_at_once(tmp_path):
  workdir = tmp_path / "work"
  workdir.mkdir()
  lock = os.open(str(workdir / ".lock"), os.O_RDWR | os.O_CREAT)
  os.write(lock, b"pid 4242 on somehost\n")
  fcntl.flock(lock, fcntl.LOCK_EX)  # as a running evaluate holds it
  try:
    before = _tree(workdir)
    proc = _cli("evaluate", "--config", DEMO + ":tiny=True", "--workdir", str(workdir))
  finally:
    os.close(lock)
  assert proc.returncode == 1, proc.stderr[-2000:]
  line = _one_line(proc)
  assert "is in use by another `sslbench-jax evaluate` (pid 4242 on somehost" in line, line
  assert _tree(workdir) == before


def test_lock_is_held_for_the_whole_run(inputs, tmp_path, monkeypatch):
  """A second run started while the first is inside a step is refused."""
  workdir = str(tmp_path / "work")
  config = _config(inputs["ckpt0"], inputs["data"])
  config.protocols = {"knn": config.protocols.knn}
  seen = []
  real_mark = workdir_lib.Progress.mark

  def mark(self, step, *args):
    with pytest.raises(evaluate.WorkdirBusyError, match="in use"):
      evaluate.run(config, workdir)
    seen.append(step)
    return real_mark(self, step, *args)

  monkeypatch.setattr(workdir_lib.Progress, "mark", mark)
  evaluate.run(config, workdir)
  assert seen == ["rn18/knn/toy"]
  monkeypatch.undo()
  assert evaluate.run(config, workdir)["new_rows"] == 0  # released afterwards


_MARKER = r"""
import sys
from sslbench_jax import workdir
p = workdir.Progress(sys.argv[1], run_id=sys.argv[2])
for i in range(150):
  p.mark(f"m/p/d{i}", "f", {}, 1)
"""


def test_concurrent_done_writers_never_collide_on_a_temp_file(tmp_path):
  """The old fixed ``done.json.tmp`` made two writers fail (FileNotFoundError)."""
  procs = [subprocess.Popen([sys.executable, "-c", _MARKER, str(tmp_path), f"r{i}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(3)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  done = _done(tmp_path)
  assert len(done) == 150 and {e["run_id"] for e in done.values()} <= {"r0", "r1", "r2"}
  assert os.listdir(tmp_path) == ["done.json"]


# --------------------------------------------------------------------------
# Item: read-only workdir / full disk -> one line, exit 1, from every subcommand.

# Runs the CLI with every write under ROOT_DIR whose path contains PATTERN
# failing with errno CODE (open for writing, os.open with O_CREAT/O_WRONLY/
# O_RDWR, mkdir): a full disk or a read-only file system, as root sees it too.
_FAULTY_CLI = r"""
import builtins, io, os, sys
root, code, pattern = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def hit(path):
  try:
    p = os.path.abspath(os.fsdecode(path))
  except TypeError:
    return False
  return p.startswith(root) and pattern in p

def fail(path):
  raise OSError(code, os.strerror(code), os.fsdecode(path))

real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

def fake_open(file, mode="r", *args, **kwargs):
  if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and hit(file):
    fail(file)
  return real_open(file, mode, *args, **kwargs)

def fake_os_open(path, flags, *args, **kwargs):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
    fail(path)
  return real_os_open(path, flags, *args, **kwargs)

def fake_mkdir(path, *args, **kwargs):
  if hit(path):
    fail(path)
  return real_mkdir(path, *args, **kwargs)

builtins.open = io.open = fake_open
os.open, os.mkdir = fake_os_open, fake_mkdir
from sslbench_jax import cli
cli.run(["sslbench-jax"] + sys.argv[4:])
"""


def _faulty_cli(fault_root, code, pattern, *args):
  return subprocess.run([sys.executable, "-c", _FAULTY_CLI, str(fault_root), str(code),
                         pattern, *args], capture_output=True, text=True, cwd=ROOT,
                        timeout=600)


@pytest.fixture(scope="module")
def cli_inputs(inputs, tmp_path_factory):
  """Converted weights, feature files and a results store/CSV for the subcommands."""
  from sslbench_jax.convert import convert_checkpoint  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("cli_inputs")
  weights = str(d / "rn18.npz")
  convert_checkpoint(inputs["ckpt0"], "resnet18", weights)
  rs = np.random.RandomState(0)
  feats = {}
  for split, n in (("train", 30), ("test", 12)):
    feats[split] = str(d / f"{split}.npz")
    io.save(feats[split], io.FeatureSet(rs.randn(n, 8).astype(np.float32),
                                        np.arange(n) % 3, np.arange(n).astype(str),
                                        {"dataset": "toy", "split": split}))
  jsonl = str(d / "r.jsonl")
  store.append_results(jsonl, [
      dict(model=m, dataset=ds, split="test", protocol=p, metric="top1",
           value=float(v), n_examples=100)
      for v, (m, ds, p) in enumerate((m, ds, p) for m in ("a", "b", "c")
                                     for ds in ("x", "y") for p in ("knn", "lin"))])
  csv = str(d / "r.csv")
  store.export_csv(jsonl, csv)
  return dict(weights=weights, images=os.path.join(inputs["data"], "test", "c0"),
              train=feats["train"], test=feats["test"], csv=csv, ckpt=inputs["ckpt0"])


def _commands(ci, out):
  """Each subcommand with all its outputs under ``out``."""
  return {
      "convert": ["convert", f"--checkpoint={ci['ckpt']}", "--arch=resnet18",
                  f"--out={out}/w.npz"],
      "features": ["features", "--noprogress", f"--weights={ci['weights']}",
                   f"--images={ci['images']}", f"--out={out}/f.npz"],
      "probe": ["probe", f"--features-train={ci['train']}", f"--features-test={ci['test']}",
                "--protocol=knn", "--knn-k=3", "--noprogress", f"--results={out}/r.jsonl"],
      "analyze": ["analyze", f"--results={ci['csv']}", f"--out={out}/analysis",
                  "--n_boot=5", "--n_perm=5"],
      "report": ["report", f"--results={ci['csv']}", f"--out={out}/report",
                 "--n_boot=5", "--n_perm=5"],
      "evaluate": ["evaluate", "--config", DEMO + ":tiny=True", f"--workdir={out}/work"],
  }


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
@pytest.mark.parametrize("command", ["convert", "features", "probe", "analyze", "report",
                                     "evaluate"])
def test_full_or_read_only_disk_is_one_line_exit_1(cli_inputs, tmp_path, command, code):
  out = tmp_path / "out"
  proc = _faulty_cli(out, code, "", *_commands(cli_inputs, out)[command])
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = _one_line(proc)
  # convert words its own line ("error: cannot write PATH: ..."); the others
  # get cli's "<command>: error: PATH: ...".
  assert line.startswith((f"{command}: error: {out}", f"error: cannot write {out}")), line
  assert os.strerror(code) in line, line
  assert not out.exists() or not any(files for _, _, files in os.walk(out))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
@pytest.mark.parametrize("command", ["convert", "probe", "analyze", "evaluate"])
def test_read_only_directory_is_one_line_exit_1(cli_inputs, tmp_path, command):
  out = tmp_path / "out"
  out.mkdir()
  out.chmod(0o555)
  try:
    proc = _cli(*_commands(cli_inputs, out)[command])
  finally:
    out.chmod(0o755)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _one_line(proc).startswith((f"{command}: error: {out}", f"error: cannot write {out}"))


def test_full_disk_while_storing_rows_keeps_the_step_unfinished(inputs, tmp_path):
  """ENOSPC on results.jsonl after the work: one line naming it; resumable."""
  workdir = tmp_path / "work"
  config_file = tmp_path / "toy_config.py"
  config_file.write_text(
      "import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict(%r)\n"
      % _config(inputs["ckpt0"], inputs["data"]).to_dict())
  proc = _faulty_cli(workdir, errno.ENOSPC, "results.jsonl", "evaluate",
                     "--config", str(config_file), "--workdir", str(workdir))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _one_line(proc) == (f"evaluate: error: {workdir}/results.jsonl: "
                             "No space left on device (disk full)")
  assert not (workdir / "done.json").exists() and not (workdir / "results.jsonl").exists()
  summary = evaluate.run(_config(inputs["ckpt0"], inputs["data"]), str(workdir))
  assert summary["new_rows"] == len(_rows(str(workdir))) > 0


# --------------------------------------------------------------------------
# Item: one exit-code convention: bad input -> 2, one line, from every subcommand.

@pytest.mark.parametrize("command, args, message", [
    ("convert", ["--checkpoint=/nonexistent.pth", "--arch=resnet18", "--out=OUT/w.npz"],
     "/nonexistent.pth"),
    ("convert", ["--checkpoint=CKPT", "--arch=resnet7", "--out=OUT/w.npz"], "resnet7"),
    ("features", ["--weights=/nonexistent.npz", "--images=IMAGES", "--out=OUT/f.npz"],
     "/nonexistent.npz"),
    ("features", ["--weights=WEIGHTS", "--images=IMAGES", "--out=OUT/f.npz",
                  "--preprocessing=nope"], "nope"),
    ("probe", ["--features-train=/nonexistent.npz", "--features-test=TEST",
               "--results=OUT/r.jsonl"], "/nonexistent.npz"),
    ("probe", ["--features-train=TRAIN", "--features-test=TEST", "--protocol=svm"], "svm"),
    ("analyze", ["--results=/nonexistent.csv", "--out=OUT/a"], "/nonexistent.csv"),
    ("report", ["--results=/nonexistent.csv", "--out=OUT/r"], "/nonexistent.csv"),
    ("analyze", ["--results=CSV", "--out=OUT/a", "extra"], "unexpected arguments"),
    ("evaluate", ["--config", DEMO + ":tiny=True", "--workdir=OUT/w", "--config.nosuch=1"],
     "--config.nosuch: unknown config key 'nosuch'"),
    ("evaluate", ["--config", "/nonexistent_config.py", "--workdir=OUT/w"],
     "/nonexistent_config.py"),
    ("probe", ["--no-such-flag"], "no-such-flag"),
])
def test_bad_input_is_one_line_exit_2_everywhere(cli_inputs, tmp_path, command, args,
                                                 message):
  out = tmp_path / "out"
  subst = dict(OUT=str(out), CKPT=cli_inputs["ckpt"], WEIGHTS=cli_inputs["weights"],
               IMAGES=cli_inputs["images"], TRAIN=cli_inputs["train"],
               TEST=cli_inputs["test"], CSV=cli_inputs["csv"])
  for k, v in subst.items():
    args = [a.replace(k, v) if not a.startswith(DEMO) else a for a in args]
  proc = _cli(command, *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = _one_line(proc)
  # convert and probe print "error: ..." themselves; the others get the prefix.
  assert line.startswith((f"{command}: error: ", "error: ")) and message in line, line
  assert not out.exists()
