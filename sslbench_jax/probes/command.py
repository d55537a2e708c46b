"""``sslbench-jax probe``: kNN / linear / logreg / least-squares / few-shot on
cached feature files.

Example::

  sslbench-jax probe --features-train train.npz --features-test val.npz \\
      --protocol knn --knn-metric cosine --results results.jsonl

Reads two ``features.io`` files, runs one protocol, prints a table and, with
``--results``, appends one row per metric to the results store (accuracies in
percent). Flags may be spelled with underscores or dashes.

The test file is scored in its own label space (``probes/_test_metrics.py``,
read from the file's provenance): top-1 / top-5 plus the space's standard
metrics, e.g. ``real_top1`` for ImageNet-ReaL (multi-hot test labels),
``subset_top1`` for ImageNet-R / -A (1000-way scores restricted to the 200
classes). The probe trains on the training file's single-label classes; both
files must share the number of classes (ImageNet-1k train -> R / A / ReaL).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import flags
from absl import logging
import numpy as np

PROTOCOLS = ("knn", "linear", "logreg", "leastsquares", "fewshot")
FLAGS = flags.FLAGS

# (name, kind, default, help); also the option keys of ``run``.
_FLAG_SPECS = (
    ("features_train", "string", None,
     "training feature file (.npz from `features`); linear: several comma-"
     "separated files = several feature sources (e.g. cls,avgpool)"),
    ("features_test", "string", None,
     "test feature file(s), in the order of --features-train"),
    ("protocol", "string", "knn", f"one of {', '.join(PROTOCOLS)}"),
    ("model", "string", None, "model name for the results; default: the files' arch"),
    ("dataset", "string", None, "dataset name for the results; default: from the files"),
    ("num_classes", "integer", None,
     "classes; default: meta num_classes or max label + 1"),
    ("seed", "integer", 0, "seed of splits, subsets and initialisation"),
    ("select_on_test", "bool", False,
     "'max over test' model selection (unfair; only to compare with papers that "
     "did it; ranks by plain top-1, so needs single-label test labels); results "
     "are labelled so"),
    ("holdout", "float", 0.1, "fraction of every training class held out for selection"),
    ("progress", "bool", True,
     "progress bars with throughput on stderr (process 0; knn, linear, logreg, "
     "fewshot); results do not depend on it"),
    # kNN
    ("knn_k", "list", ["10", "20", "100", "200"], "kNN: numbers of neighbours"),
    ("knn_metric", "string", "cosine", "kNN: cosine (DINO) or euclidean (Closer Look)"),
    ("knn_temperature", "float", 0.07, "kNN: DINO's temperature (cosine only)"),
    ("zscore", "bool", False, "kNN: z-score features with training statistics first"),
    ("bank_dtype", "string", "float32", "kNN: bank storage, float32 or bfloat16"),
    ("query_chunk", "integer", 1024, "kNN: test examples per step"),
    # linear
    ("lr", "list", None, "linear: absolute peak learning rates; default 0.1*batch/256"),
    ("weight_decay", "list", ["0"], "linear: weight decays"),
    ("batchnorm", "list", ["false", "true"], "linear: BN-without-affine settings"),
    ("optimizer", "list", ["sgd"], "linear: sgd and/or adamw"),
    ("epochs", "integer", 100, "linear: epochs"),
    ("batch_size", "integer", 1024, "linear: batch size"),
    ("warmup_epochs", "integer", 5, "linear: warmup epochs"),
    ("clip_norm", "float", 0.5, "linear: gradient global-norm clip (0: off)"),
    # logreg / least squares
    ("c", "list", None, "logreg: C grid; default 45 values logspace(-6, 5)"),
    ("max_iter", "integer", 1000, "logreg: L-BFGS iterations at most"),
    ("l2", "list", None, "leastsquares: l2 grid; default 2^-10..2^19"),
    # few-shot
    ("setups", "list", ["1shot", "5shot", "10shot", "25shot", "1%", "10%"],
     "few-shot: 'Kshot' / 'P%' setups"),
    ("fewshot_probes", "list", ["knn", "linear", "leastsquares"], "few-shot: probes"),
    ("tries", "integer", 5, "few-shot: subsets per setup"),
    ("fewshot_l2", "float", 2.0 ** 10, "few-shot: l2 of the closed-form probe"),
    ("fewshot_k", "integer", 20, "few-shot: kNN neighbours"),
)
# Options every protocol reads, and those only some protocols read: setting
# one the chosen protocol ignores is almost always a mistake, so it is logged.
_COMMON_OPTIONS = frozenset({"features_train", "features_test", "protocol", "model",
                             "dataset", "num_classes", "seed", "progress"})
_PROTOCOL_OPTIONS = {
    "knn": frozenset({"knn_k", "knn_metric", "knn_temperature", "zscore",
                      "bank_dtype", "query_chunk"}),
    "linear": frozenset({"select_on_test", "holdout", "lr", "weight_decay",
                         "batchnorm", "optimizer", "epochs", "batch_size",
                         "warmup_epochs", "clip_norm"}),
    "logreg": frozenset({"select_on_test", "holdout", "c", "max_iter"}),
    "leastsquares": frozenset({"select_on_test", "holdout", "l2"}),
    "fewshot": frozenset({"setups", "fewshot_probes", "tries", "fewshot_l2",
                          "fewshot_k", "knn_metric"}),
}
_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
           "list": flags.DEFINE_list}


def default_options() -> dict[str, Any]:
  """The options ``run`` accepts, with their defaults (the flags' defaults)."""
  return {name: (list(default) if isinstance(default, list) else default)
          for name, _, default, _ in _FLAG_SPECS}


def define_flags() -> None:
  """Defines this subcommand's absl flags (idempotent), with dashed aliases."""
  if "features_train" in FLAGS:
    return
  specs = _FLAG_SPECS + (
      ("results", "string", None,
       "results store (.jsonl) to append to; default: print only"),)
  for name, kind, default, help_ in specs:
    _DEFINE[kind](name, default, help_)
    if "_" in name:
      flags.DEFINE_alias(name.replace("_", "-"), name)


def main(argv: Sequence[str]) -> None:
  """Runs the probe described by the flags; prints and stores the results."""
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.results:
    # Fail before minutes of probing, not after. OSError propagates (the CLI
    # turns it into one line, exit 1): an unwritable store is not bad input.
    check_writable(FLAGS.results)
  try:
    rows = run(_options())
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  _print(rows)
  if FLAGS.results:
    from sslbench_jax.results import store  # pylint: disable=g-import-not-at-top
    store.append_results(FLAGS.results, rows)
    print(f"appended {len(rows)} rows to {FLAGS.results}")


def check_writable(path: str) -> None:
  """Raises OSError (naming ``path``) when ``path`` cannot be appended to.

  Leaves nothing behind: an existing file is opened for appending without
  writing; for a new file, a temporary file is created and removed in the
  nearest existing parent directory (the store creates the missing ones).
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  try:
    if os.path.exists(path):
      os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
      return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    fd, tmp = tempfile.mkstemp(prefix=".probe-write-check-", dir=parent)
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise type(e)(e.errno, e.strerror, path) from None


def _options() -> dict[str, Any]:
  return {name: FLAGS[name].value for name in default_options()}


def run(opts: dict[str, Any]) -> list[dict[str, Any]]:
  """Runs one protocol from an options dict (the flag values).

  Args:
    opts: option name -> value; missing options take ``default_options()``,
      unknown ones are rejected.

  Returns:
    Results-store rows (accuracies in percent).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
  from sslbench_jax.probes import _test_metrics  # pylint: disable=g-import-not-at-top

  unknown = sorted(set(opts) - set(default_options()))
  if unknown:
    raise ValueError(f"unknown probe options {unknown}; valid: "
                     f"{sorted(default_options())}")
  opts = {**default_options(), **opts}
  protocol = opts["protocol"]
  if protocol not in PROTOCOLS:
    raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}")
  defaults = default_options()
  ignored = sorted(k for k, v in opts.items()
                   if k not in _COMMON_OPTIONS | _PROTOCOL_OPTIONS[protocol]
                   and v != defaults[k])
  if ignored:
    logging.warning("--protocol %s does not use %s; ignored", protocol,
                    ", ".join(f"--{k}={opts[k]!r}" for k in ignored))
  train_sources = _load_sources(opts, "features_train", io)
  test_sources = _load_sources(opts, "features_test", io)
  if len(train_sources) != len(test_sources):
    raise ValueError(f"--features-train has {len(train_sources)} files but "
                     f"--features-test has {len(test_sources)}")
  if len(train_sources) > 1 and protocol != "linear":
    raise ValueError(f"several feature files (sources) are only supported by "
                     f"--protocol linear, not {protocol}")
  names = _source_names([fs for _, fs in train_sources])
  (path_tr0, train), (path_te0, test) = train_sources[0], test_sources[0]
  ytr = _train_labels(train, path_tr0)
  space = _test_metrics.resolve(test, path_te0)
  yte = space.single_labels  # None for a multi-label (ReaL) test set
  for (path_tr, fs_tr), (path_te, fs_te) in zip(train_sources, test_sources):
    if fs_tr.features.shape[1] != fs_te.features.shape[1]:
      raise ValueError(f"feature dims differ: {path_tr} has "
                       f"{fs_tr.features.shape[1]}, {path_te} has "
                       f"{fs_te.features.shape[1]}")
    for path, same in ((path_tr, np.array_equal(_train_labels(fs_tr, path_tr), ytr)),
                       (path_te, np.array_equal(fs_te.labels, test.labels))):
      if not same:
        raise ValueError(f"{path}: labels differ from those of the first file; "
                         "sources must hold the same examples in the same order")
  num_classes = _num_classes(opts, train, path_tr0, ytr, space)
  xtr, xte = train.features, test.features
  # Problems that do not invalidate the numbers but qualify them: logged and
  # recorded in every row's hparams["warnings"].
  warnings = _unseen_test_classes(ytr, space, path_tr0)

  base = dict(
      model=opts.get("model") or train.meta.get("arch") or
      os.path.splitext(os.path.basename(path_tr0))[0],
      # The released checkpoint's hash (recorded by convert, carried by
      # features); the converted weights' own hash for other weights files.
      checkpoint_sha256=str(train.meta.get("checkpoint_sha256")
                            or train.meta.get("weights_sha256", "")),
      dataset=opts.get("dataset") or test.meta.get("dataset") or "unknown",
      split=str(test.meta.get("split") or "test"),
      seed=int(opts["seed"]), device_count=jax.device_count())
  # ReaL scores only the images with a non-empty label set.
  n_scored = {"real_top1": int(space.labels.any(1).sum())} if space.multi_label else {}
  rows = []

  # How the features were made is part of every number's provenance.
  feature_provenance = {name: train.meta[key] for name, key in
                        (("preprocessing", "preprocessing"), ("features_dtype", "dtype"))
                        if train.meta.get(key) is not None}
  test_pre = test.meta.get("preprocessing")
  if test_pre is not None and test_pre != train.meta.get("preprocessing"):
    feature_provenance["test_preprocessing"] = test_pre

  def add(protocol_name, hparams, metric, value, n=None):
    hparams = dict(feature_provenance, **hparams)
    row_warnings = list(warnings) + list(hparams.pop("warnings", []))
    if row_warnings:
      hparams["warnings"] = row_warnings
    rows.append(dict(base, protocol=protocol_name, hparams=hparams, metric=metric,
                     value=float(value),
                     n_examples=int(n if n is not None else
                                    n_scored.get(metric, len(xte)))))

  def add_metrics(protocol_name, hparams, scores, **kwargs):
    for metric, value in _test_metrics.evaluate(scores, space, **kwargs).items():
      add(protocol_name, hparams, metric, value)

  if protocol == "knn":
    from sslbench_jax.probes import knn  # pylint: disable=g-import-not-at-top
    ks = [_int(k, "knn-k") for k in opts["knn_k"]]
    scores = knn.classify(xtr, ytr, xte, num_classes, ks=ks,
                          metric=opts["knn_metric"],
                          temperature=opts["knn_temperature"],
                          zscore=opts["zscore"], bank_dtype=opts["bank_dtype"],
                          query_chunk=opts["query_chunk"],
                          progress=bool(opts["progress"]))
    # k > N_train uses every training example: the row stores the k used,
    # once per distinct k (several requested k can clip to the same one).
    used: dict[int, list[int]] = {}
    for k in ks:
      used.setdefault(min(k, len(xtr)), []).append(k)
    for k_used, requested in used.items():
      k = requested[0]
      hp = dict(k=k_used, metric=opts["knn_metric"], zscore=bool(opts["zscore"]),
                bank_dtype=opts["bank_dtype"])
      if requested != [k_used]:
        msg = (f"--knn_k {', '.join(map(str, requested))} > the {len(xtr)} training "
               f"examples: used k={k_used}")
        logging.warning("%s (%s)", msg, path_tr0)
        hp.update(k_requested=requested, warnings=[msg])
      if opts["knn_metric"] == "cosine":
        hp["temperature"] = opts["knn_temperature"]
      # kNN's top-5 never counts a class that got no vote.
      add_metrics("knn", hp, scores[k], topk_correct=knn.topk_correct)

  elif protocol == "linear":
    from sslbench_jax.probes import linear  # pylint: disable=g-import-not-at-top
    bs = opts["batch_size"]
    lrs = ([_float(v, "lr") for v in opts["lr"]] if opts["lr"]
           else [0.1 * bs / 256])
    configs = linear.grid(
        names, lrs, [_float(v, "weight-decay") for v in opts["weight_decay"]],
        [_bool(v, "batchnorm") for v in opts["batchnorm"]], opts["optimizer"])
    tc = linear.TrainConfig(epochs=opts["epochs"], batch_size=bs,
                            warmup_epochs=opts["warmup_epochs"],
                            clip_norm=opts["clip_norm"] or None, seed=opts["seed"])
    r = linear.run({n: fs.features for n, (_, fs) in zip(names, train_sources)},
                   ytr,
                   {n: fs.features for n, (_, fs) in zip(names, test_sources)},
                   yte, num_classes, configs, tc, holdout=opts["holdout"],
                   select_on_test=opts["select_on_test"],
                   progress=bool(opts["progress"]))
    hp = dict(r.selected.hparams(), epochs=tc.epochs, batch_size=bs,
              # The analysis tells a searched BN (a hyper-parameter) from a fixed one.
              batchnorm_grid=[_bool(v, "batchnorm") for v in opts["batchnorm"]],
              warmup_epochs=tc.warmup_epochs, clip_norm=tc.clip_norm,
              grid_size=len(configs), selection=r.selection,
              holdout=opts["holdout"])
    add_metrics("linear", hp, r.test_scores)

  elif protocol == "logreg":
    from sslbench_jax.probes import logreg  # pylint: disable=g-import-not-at-top
    cs = ([_float(v, "c") for v in opts["c"]] if opts["c"] else list(logreg.DEFAULT_CS))
    r = logreg.run(xtr, ytr, xte, yte, num_classes, cs, holdout=opts["holdout"],
                   seed=opts["seed"], select_on_test=opts["select_on_test"],
                   max_iter=opts["max_iter"], progress=bool(opts["progress"]))
    hp = dict(C=r.selected_c, grid_size=len(cs), selection=r.selection,
              holdout=opts["holdout"], max_iter=opts["max_iter"])
    add_metrics("logreg", hp, r.test_scores)

  elif protocol == "leastsquares":
    from sslbench_jax.probes import leastsquares  # pylint: disable=g-import-not-at-top
    l2s = ([_float(v, "l2") for v in opts["l2"]] if opts["l2"]
           else list(leastsquares.DEFAULT_L2))
    r = leastsquares.run(xtr, ytr, xte, yte, num_classes, l2s,
                         holdout=opts["holdout"], seed=opts["seed"],
                         select_on_test=opts["select_on_test"])
    hp = dict(l2=r.selected_l2, grid_size=len(l2s), selection=r.selection,
              holdout=opts["holdout"])
    add_metrics("leastsquares", hp, r.test_scores)

  else:
    from sslbench_jax.probes import fewshot  # pylint: disable=g-import-not-at-top
    # Few-shot reports top-1 and the test set's own metrics (no top-5), as
    # mean and std over tries.
    results = fewshot.run(
        xtr, ytr, xte, yte, num_classes, setups=opts["setups"],
        probes=opts["fewshot_probes"], tries=opts["tries"], seed=opts["seed"],
        knn_k=opts["fewshot_k"], knn_metric=opts["knn_metric"],
        l2=opts["fewshot_l2"],
        evaluate=lambda scores: _test_metrics.evaluate(scores, space, top5=False),
        progress=bool(opts["progress"]))
    for r in results:
      hp = dict(setup=r.setup, per_class=r.per_class, tries=r.tries)
      if r.probe == "knn":
        # kNN on a subset of per_class * C examples uses at most that many.
        k_used = min(int(opts["fewshot_k"]), r.per_class * num_classes)
        hp.update(k=k_used, metric=opts["knn_metric"])
        if k_used != opts["fewshot_k"]:
          hp["k_requested"] = int(opts["fewshot_k"])
      elif r.probe == "leastsquares":
        hp.update(l2=opts["fewshot_l2"])
      for metric, values in r.metrics.items():
        n = n_scored.get(metric, len(xte))
        add(f"fewshot_{r.probe}", hp, f"{metric}_mean", np.mean(values), n)
        add(f"fewshot_{r.probe}", hp, f"{metric}_std", np.std(values), n)
  logging.info("probe %s: %d rows", protocol, len(rows))
  return rows


def _load_sources(opts, name, io) -> list[tuple[str, Any]]:
  """Loads one feature file, or several (comma-separated: feature sources)."""
  flag = "--" + name.replace("_", "-")
  spec = opts.get(name)
  if not spec:
    raise ValueError(f"{flag} is required")
  paths = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
  out = []
  for path in paths:
    path = path.strip()
    if not os.path.exists(path):
      raise FileNotFoundError(f"{flag}: no such file {path}")
    out.append((path, io.load(path)))
  return out


def _unseen_test_classes(ytr, space, path_tr) -> list[str]:
  """Warnings (logged) when test examples belong to no training class.

  A probe cannot predict a class it never saw, so those examples count as
  errors: the number is still what the protocol gives, but lower than the
  representation deserves, and the row says so.
  """
  seen = np.unique(ytr)
  if space.multi_label:
    labelled = space.labels.any(1)
    # Examples all of whose correct classes are unseen can never be right.
    hopeless = labelled & ~space.labels[:, seen].any(1)
    classes = np.flatnonzero(space.labels.any(0) & ~np.isin(
        np.arange(space.labels.shape[1]), seen))
  else:
    hopeless = ~np.isin(space.labels, seen)
    classes = np.unique(space.labels[hopeless])
  if not len(classes):
    return []
  # The row's text names no file: rows of the same measurement made from
  # files elsewhere must stay equal (hparams are part of the store's key).
  msg = (f"{int(hopeless.sum())} of {len(space.labels)} test examples belong to "
         f"{len(classes)} classes absent from the training classes (e.g. "
         f"{classes[:5].tolist()}); the probe can never predict them")
  logging.warning("%s (test %s, train %s)", msg, space.path, path_tr)
  return [msg]


def _source_names(feature_sets) -> list[str]:
  """Source names: the files' ``representation`` when distinct, else s0, s1..."""
  if len(feature_sets) == 1:
    return [str(feature_sets[0].meta.get("representation") or "features")]
  reps = [str(fs.meta.get("representation") or "") for fs in feature_sets]
  if all(reps) and len(set(reps)) == len(reps):
    return reps
  return [f"s{i}" for i in range(len(feature_sets))]


def _train_labels(fs, path) -> np.ndarray:
  y = np.asarray(fs.labels)
  if y.ndim != 1:
    raise ValueError(f"{path}: multi-hot {y.shape} training labels are not "
                     "supported; probes train on single-label (N,) class indices "
                     "(multi-hot labels are for a ReaL test set)")
  if len(y) == 0:
    raise ValueError(f"{path}: no examples")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: labels must be integers, got {y.dtype}")
  if y.min() < 0:
    raise ValueError(f"{path}: {int(np.sum(y < 0))} examples have unknown label -1")
  return y.astype(np.int64)


def _num_classes(opts, train, path_tr, ytr, space) -> int:
  """The probe's class count; the train and test label spaces must agree on it.

  --num-classes, else the training file's label space (or meta num_classes),
  else the test file's label space, else the largest label + 1.
  """
  from sslbench_jax.probes import _test_metrics  # pylint: disable=g-import-not-at-top
  path_te = space.path
  train_space, _ = _test_metrics.recorded_space(train.meta, path_tr)
  train_c = (train_space or {}).get("num_classes") or train.meta.get("num_classes")
  if train_c and space.num_classes and int(train_c) != space.num_classes:
    raise ValueError(
        f"label spaces differ: {path_tr} has {int(train_c)} classes "
        f"({(train_space or {}).get('name', 'meta num_classes')}), {path_te} has "
        f"{space.num_classes} ({space.name}); a probe trained on one cannot be "
        "scored on the other")
  label_max = int(ytr.max()) if space.multi_label else int(max(ytr.max(),
                                                                space.labels.max()))
  num_classes = int(opts.get("num_classes") or train_c or space.num_classes
                    or label_max + 1)
  if space.num_classes and num_classes != space.num_classes:
    raise ValueError(f"--num-classes {num_classes} but {path_te}'s label space "
                     f"{space.name} has {space.num_classes} classes")
  if label_max >= num_classes:
    raise ValueError(f"labels exceed --num-classes {num_classes} (largest label "
                     f"{label_max} in {path_tr} / {path_te})")
  return num_classes


def _int(v, name):
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"--{name}: {v!r} is not an integer") from None


def _float(v, name):
  try:
    return float(v)
  except ValueError:
    raise ValueError(f"--{name}: {v!r} is not a number") from None


def _bool(v, name):
  s = str(v).strip().lower()
  if s in ("true", "1", "yes", "on"):
    return True
  if s in ("false", "0", "no", "off"):
    return False
  raise ValueError(f"--{name}: {v!r} is not true/false")


def _print(rows) -> None:
  for r in rows:
    print(f"{r['protocol']:<20} {r['metric']:<10} {r['value']:7.2f}  "
          f"n={r['n_examples']:<7} {json.dumps(r['hparams'], sort_keys=True)}")
