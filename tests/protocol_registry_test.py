"""The protocol table (protocols/registry.py): options typed and defaulted once,
config mappings validated with one error naming the key, CLI flags <-> options."""

import dataclasses
import json

from absl import flags
import numpy as np
import pytest

from sslbench_jax.features import io
from sslbench_jax.probes import command
from sslbench_jax.probes import fewshot
from sslbench_jax.probes import heads
from sslbench_jax.probes import knn
from sslbench_jax.probes import linear
from sslbench_jax.protocols import base
from sslbench_jax.protocols import registry

# Non-default values of every option of the cached-feature protocols.
NON_DEFAULT = {
    "knn": dict(knn_k=(5, 7), knn_metric="euclidean", knn_temperature=0.1,
                zscore=True, bank_dtype="bfloat16", query_chunk=64),
    "linear": dict(lr=(0.4, 0.04), weight_decay=(0.0, 1e-4), batchnorm=(True,),
                   optimizer=("adamw", "sgd"), epochs=3, batch_size=32,
                   warmup_epochs=0, clip_norm=0.0, holdout=0.2, select_on_test=True,
                   device_budget_bytes=1 << 20),
    "logreg": dict(c=(0.5, 2.0), max_iter=7, holdout=0.3, select_on_test=True),
    "leastsquares": dict(l2=(0.0, 8.0), holdout=0.25, select_on_test=True),
    "fewshot": dict(setups=("2shot", "5%"), fewshot_probes=("leastsquares",),
                    tries=2, fewshot_l2=3.5, fewshot_k=4, knn_metric="euclidean"),
}


def test_every_protocol_has_typed_defaulted_options():
  assert set(NON_DEFAULT) <= set(registry.names("features"))
  for name in registry.names():
    p = registry.get(name)
    assert p.name == name and p.reference and p.consumes in (
        "features", "images", "logits", "head")
    assert dataclasses.is_dataclass(p.options)
    options = p.options()  # every field has a default: the recipe
    for f in dataclasses.fields(p.options):
      assert f.default is not dataclasses.MISSING, (name, f.name)
    assert p.options.__dataclass_params__.frozen, name
    assert json.loads(json.dumps(registry.options_to_hparams(options))) == \
        registry.options_to_hparams(options)
  for name in registry.names("features"):
    for spec in registry.fields(name):
      assert spec.help, (name, spec.name)


def test_recipe_defaults():
  """The papers' numbers, written here independently of the modules."""
  o = linear.Options()
  assert (o.lrs(), o.weight_decay, o.batchnorm, o.optimizer, o.epochs, o.batch_size,
          o.warmup_epochs, o.clip_norm, o.holdout) == (
              (0.4,), (0.0,), (False, True), ("sgd",), 100, 1024, 5, 0.5, 0.1)
  # The training settings take the options' defaults (defined once).
  assert linear.TrainConfig.from_options(o, 0) == linear.TrainConfig()
  k = knn.Options()
  assert (k.knn_k, k.knn_metric, k.knn_temperature) == ((10, 20, 100, 200), "cosine", 0.07)
  c = registry.get("logreg").options().c
  np.testing.assert_allclose(c, np.logspace(-6, 5, 45))
  l2 = registry.get("leastsquares").options().l2
  assert l2 == tuple(2.0 ** i for i in range(-10, 20))
  f = fewshot.Options()
  assert (f.setups, f.tries, f.fewshot_l2, f.fewshot_k) == (
      ("1shot", "5shot", "10shot", "25shot", "1%", "10%"), 5, 1024.0, 20)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_mapping_round_trip(name):
  options = registry.options_from_mapping(name, NON_DEFAULT[name], "config.p")
  for key, value in NON_DEFAULT[name].items():
    assert getattr(options, key) == value
  hp = registry.options_to_hparams(options)
  assert registry.options_from_mapping(name, hp, "x") == options
  # Lists are accepted for tuples; ints for floats.
  listed = {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}
  assert registry.options_from_mapping(name, listed, "x") == options
  assert registry.options_from_mapping(name, {}, "x") == registry.get(name).options()


@pytest.mark.parametrize("mapping, message", [
    (dict(knn_kk=(5,)), "config.protocols.p.knn_kk: unknown option of protocol knn "
     "(valid: knn_k, knn_metric, knn_temperature, zscore, bank_dtype, query_chunk)"),
    (dict(knn_k=["20"]), "config.protocols.p.knn_k[0]='20' must be an integer"),
    (dict(knn_k=[True]), "config.protocols.p.knn_k[0]=True must be an integer"),
    (dict(knn_k=20), "config.protocols.p.knn_k=20 must be a non-empty list of integers"),
    (dict(knn_k=[]), "config.protocols.p.knn_k=[] must be a non-empty list of integers"),
    (dict(knn_k=[0]), "config.protocols.p.knn_k[0]=0 must be > 0"),
    (dict(knn_k=[5, 5]), "config.protocols.p.knn_k lists a value twice: [5, 5]"),
    (dict(zscore=1), "config.protocols.p.zscore=1 must be True or False"),
    (dict(zscore="true"), "config.protocols.p.zscore='true' must be True or False"),
    (dict(knn_metric="l1"),
     "config.protocols.p.knn_metric='l1' must be one of cosine, euclidean"),
    (dict(knn_temperature="0.1"),
     "config.protocols.p.knn_temperature='0.1' must be a number"),
    (dict(knn_temperature=float("nan")),
     "config.protocols.p.knn_temperature=nan must be finite"),
    (dict(query_chunk=2.0), "config.protocols.p.query_chunk=2.0 must be an integer"),
    (dict(query_chunk=None), "config.protocols.p.query_chunk=None must be an integer"),
])
def test_bad_mapping_is_one_error_naming_the_key(mapping, message):
  with pytest.raises(ValueError) as e:
    registry.options_from_mapping("knn", mapping, "config.protocols.p")
  assert str(e.value) == message


def test_other_bad_values():
  for name, mapping, words in (
      ("linear", dict(holdout=1.0), "config.linear.holdout=1.0 must be in (0, 1)"),
      ("linear", dict(optimizer=["lamb"]),
       "config.linear.optimizer[0]='lamb' must be one of sgd, adamw"),
      ("linear", dict(lr=None), None),  # None: the recipe's 0.1 x batch / 256
      ("fewshot", dict(setups=["0shot"]),
       "config.fewshot.setups[0]='0shot' must be 'Kshot' (K >= 1) or 'P%'"),
      ("fewshot", dict(fewshot_probes=["logreg"]),
       "config.fewshot.fewshot_probes[0]='logreg' must be one of knn, linear, "
       "leastsquares"),
      ("classify", dict(k=1), "config.classify.k: unknown option of protocol classify "
       "(valid: none)")):
    if words is None:
      registry.options_from_mapping(name, mapping, f"config.{name}")
      continue
    with pytest.raises(ValueError) as e:
      registry.options_from_mapping(name, mapping, f"config.{name}")
    assert str(e.value).startswith(words), str(e.value)
  with pytest.raises(ValueError, match="unknown protocol 'svm'; valid: classify"):
    registry.get("svm")
  # Constructing options directly checks the same rules.
  with pytest.raises(ValueError, match=r"knn_k=\[5\] must be a non-empty list of "
                     r"integers \(a tuple\)"):
    knn.Options(knn_k=[5])


def _parse(argv):
  command.define_flags()
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["probe"] + argv)
  return command._given_flags()  # pylint: disable=protected-access


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_cli_flags_round_trip(name):
  options = registry.get(name).options(**NON_DEFAULT[name])
  argv = command.option_flags(options)
  assert len(argv) == len(NON_DEFAULT[name])
  values = _parse(argv + ["--protocol", name])
  assert command.options_from_values(name, {k: v for k, v in values.items()
                                            if k in command.option_fields()}) == options
  # Dashed aliases, as users write them.
  dashed = [a.replace("_", "-", a.index("=")) if "=" in a else a for a in argv]
  values = _parse(dashed)
  assert command.options_from_values(name, values) == options
  # No flag: the defaults.
  assert command.options_from_values(name, _parse([])) == registry.get(name).options()


def test_cli_flags_parse_once_and_strictly(caplog):
  values = _parse(["--knn-k", "5,20", "--batchnorm", "TRUE,0", "--zscore"])
  o = command.options_from_values("knn", {k: values[k] for k in ("knn_k", "zscore")})
  assert o.knn_k == (5, 20) and o.zscore is True
  lin = command.options_from_values("linear", {"batchnorm": values["batchnorm"]})
  assert lin.batchnorm == (True, False)
  for bad, message in ((dict(batchnorm=["yes"]), "--batchnorm='yes' is not a boolean"),
                       (dict(knn_k=["2x"]), "--knn-k='2x' is not an integer"),
                       (dict(lr=["fast"]), "--lr='fast' is not a number")):
    protocol = "knn" if "knn_k" in bad else "linear"
    with pytest.raises(ValueError, match=message):
      command.options_from_values(protocol, bad)
  # A flag the protocol does not read is logged (when it is not the default).
  with caplog.at_level("WARNING", logger="absl"):
    command.options_from_values("knn", dict(epochs="5", knn_k="3", holdout=0.1))
  assert "--protocol knn does not use --epochs='5'; ignored" in caplog.text
  assert "holdout" not in caplog.text


def test_docs_flag_table_is_the_generated_one():
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "probes.md")
  with open(path) as f:
    text = f.read()
  start = text.index("<!-- flag table: generated -->\n") + len(
      "<!-- flag table: generated -->\n")
  assert text[start:text.index("<!-- end of flag table -->")] == command.flag_table()


def test_shared_flags_agree():
  fields = command.option_fields()  # raises when protocols disagree on a flag
  assert set(fields) == {f.name for n in command.protocols() for f in registry.fields(n)}
  assert command.protocols() == ("knn", "linear", "logreg", "leastsquares", "fewshot")


def test_fewshot_probes_are_table_protocols():
  for probe in fewshot.PROBES:
    p = registry.get(probe)
    assert p.fit_scores is not None
    # Its few-shot settings are valid options of that protocol.
    dataclasses.replace(p.options(), **fewshot.PROBE_RECIPES[probe].settings(
        fewshot.Options(), 40))


def _blobs(tmp_path, classes=3, meta=None):
  rng = np.random.default_rng(0)
  centres = rng.normal(scale=2.0, size=(classes, 5))
  y = np.repeat(np.arange(classes), 12)
  x = (centres[y] + rng.normal(size=(len(y), 5))).astype(np.float32)
  paths = []
  for name, rows in (("train", slice(0, None, 2)), ("test", slice(1, None, 2))):
    path = str(tmp_path / f"{name}.npz")
    io.save(path, io.FeatureSet(x[rows], y[rows], np.arange(len(y[rows])).astype(str),
                                dict(meta or {}, arch="a", split=name, dataset="blobs")))
    paths.append(path)
  return paths


def test_grid_protocols_report_scores_and_selection(tmp_path):
  tr, te = (base.load_features(p) for p in _blobs(tmp_path))
  ctx = base.RunContext(progress=False)
  r = registry.get("logreg").run(tr, te, registry.get("logreg").options(
      c=(0.01, 1.0, 100.0), max_iter=50), context=ctx)
  assert list(r.scores) == ["C=0.01", "C=1.0", "C=100.0"]
  assert r.selected == f"C={r.rows[0]['hparams']['C']}"
  held = {k: v["holdout_top1"] for k, v in r.scores.items()}
  assert held[r.selected] == max(held.values())  # first best on ties
  # Three classes: linear's top-5 covers every class (was an error for C < 5).
  r = registry.get("linear").run(tr, te, linear.Options(epochs=2, batch_size=8,
                                                        lr=(0.1,)), context=ctx)
  assert len(r.scores) == 2 and r.selected in r.scores
  assert [row["metric"] for row in r.rows] == ["top1", "top5"]
  assert r.rows[1]["value"] == 100.0


def test_classify_scores_the_logits_file(tmp_path):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(40, 7)).astype(np.float32)
  y = rng.integers(0, 7, 40)
  path = str(tmp_path / "logits.npz")
  io.save(path, io.FeatureSet(logits, y, np.arange(40).astype(str),
                              dict(dataset="d", split="val", arch="a")))
  test = base.load_features(path)
  r = registry.get("classify").run(None, test, heads.Options(), context=base.RunContext(
      model="m", seed=2, weights_meta={"checkpoint_sha256": "c" * 64}))
  order = np.argsort(-logits, 1, kind="stable")
  want = {"top1": 100 * np.mean(order[:, 0] == y),
          "top5": 100 * np.mean((order[:, :5] == y[:, None]).any(1))}
  assert [(row["metric"], row["value"]) for row in r.rows] == [
      (k, pytest.approx(v)) for k, v in want.items()]
  assert list(r.rows[0]) == ["model", "dataset", "split", "protocol", "hparams", "seed",
                             "device_count", "checkpoint_sha256", "metric", "value",
                             "n_examples"]
  assert (r.rows[0]["model"], r.rows[0]["dataset"], r.rows[0]["split"],
          r.rows[0]["checkpoint_sha256"], r.rows[0]["n_examples"]) == (
              "m", "d", "val", "c" * 64, 40)
  with pytest.raises(ValueError, match="carries no released head"):
    registry.get("released_head").run(None, test, context=base.RunContext(model="m"))
