"""plan.py: what an evaluate run does, decided from the config and state alone.

No file, no model: the references are the rules of docs/evaluate.md written
out by hand for small configs (which steps exist, which run, which feature
sets they read, how extraction passes are cut, when ReaL is cut out of val).
"""

import json

import ml_collections
import pytest

from sslbench_jax import plan


def _config(models_per_pass=None):
  c = ml_collections.ConfigDict()
  c.seed = 3
  model = dict(select=None, allow_missing=None, options={})
  c.models = {
      "a": dict(model, arch="resnet18", checkpoint="random:0"),
      "b": dict(model, arch="resnet18", checkpoint="random:1", representation="layer3_avg",
                protocols=["knn"]),
      "e": dict(model, arch="efficientnet_lite0", checkpoint="random:2",
                protocols=["knn", "classify"]),
  }
  c.datasets = {
      "digits": dict(dataset="digits", train_split="train", test_split="test",
                     data_dir=None, preprocessing=None),
      "in1k": dict(dataset="imagenet1k", train_split="train", test_split="validation",
                   data_dir="/in", preprocessing="imagenet_bilinear"),
      "real": dict(dataset="imagenet1k", train_split="train", test_split="validation",
                   test_dataset="imagenet_real", data_dir="/in",
                   preprocessing="imagenet_bilinear"),
  }
  c.protocols = {
      "knn": dict(type="knn", datasets=["digits", "in1k", "real"], knn_k=[5]),
      "classify": dict(type="classify", datasets=["real"]),
      "ft": dict(type="finetune_full", datasets=["digits"], epochs=1),
  }
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=8, steps_per_shard=2)
  if models_per_pass is not None:
    c.extraction.models_per_pass = models_per_pass
  c.analysis = dict(n_boot=1, n_perm=1)
  return c


_METAS = {m: dict(arch=arch, checkpoint_sha256=f"sha-{m}", arch_options={})
          for m, arch in (("a", "resnet18"), ("b", "resnet18"), ("e", "efficientnet_lite0"))}


def _split(dataset, split, data_dir=None, pre=None):
  return plan.Split(dataset, data_dir, split, pre)


DIGITS_TR, DIGITS_TE = _split("digits", "train"), _split("digits", "test")
IN_TR = _split("imagenet1k", "train", "/in", "imagenet_bilinear")
IN_VAL = _split("imagenet1k", "validation", "/in", "imagenet_bilinear")
REAL = _split("imagenet_real", "validation", "/in", "imagenet_bilinear")


def test_steps_follow_config_order_and_model_protocol_lists():
  steps, _ = plan.make_plan(_config(), _METAS, lambda *_: "not done yet")
  # ConfigDict order (by name) of models and protocols, then the entry's list.
  assert [s.key for s in steps] == [
      "a/classify/real", "a/ft/digits", "a/knn/digits", "a/knn/in1k", "a/knn/real",
      "b/knn/digits", "b/knn/in1k", "b/knn/real",
      "e/classify/real", "e/knn/digits", "e/knn/in1k", "e/knn/real"]
  by_key = {s.key: s for s in steps}
  # What each protocol consumes decides the feature sets: train + test at the
  # model's representation, the test logits, or nothing (images).
  assert by_key["b/knn/real"].features == (("b", IN_TR, "layer3_avg"),
                                           ("b", REAL, "layer3_avg"))
  assert by_key["a/classify/real"].features == (("a", REAL, "logits"),)
  assert by_key["a/ft/digits"].features == ()
  assert all(s.fingerprint == plan.fingerprint(s.inputs) for s in steps)


def test_done_steps_read_no_features():
  done = {"a/knn/digits", "a/knn/in1k", "a/knn/real", "b/knn/digits"}
  steps, wanted = plan.make_plan(_config(), _METAS,
                                 lambda key, *_: None if key in done else "not done yet")
  assert [s.key for s in steps if s.why is None] == sorted(done, key=[
      s.key for s in steps].index)
  assert ("a", DIGITS_TR, "pre_logits") not in wanted
  assert ("b", DIGITS_TR, "layer3_avg") not in wanted
  # First-use order, each set once (IN_TR is read by three entries of b).
  assert wanted == [("a", REAL, "logits"), ("b", IN_TR, "layer3_avg"),
                    ("b", IN_VAL, "layer3_avg"), ("b", REAL, "layer3_avg"),
                    ("e", REAL, "logits"), ("e", DIGITS_TR, "pre_logits"),
                    ("e", DIGITS_TE, "pre_logits"), ("e", IN_TR, "pre_logits"),
                    ("e", IN_VAL, "pre_logits"), ("e", REAL, "pre_logits")]


def test_step_inputs_hold_what_the_result_depends_on():
  c = _config()
  knn = plan.step_inputs(c, c.models.b, _METAS["b"], c.protocols.knn, c.datasets.real)
  assert knn["model"] == dict(arch="resnet18", checkpoint_sha256="sha-b", arch_options={},
                              select=None, allow_missing=None, options={})
  assert knn["train"] == dict(dataset="imagenet1k", split="train", data_dir="/in",
                              preprocessing="imagenet_bilinear")
  assert knn["test"]["dataset"] == "imagenet_real"
  assert (knn["representation"], knn["dtype"], knn["seed"]) == ("layer3_avg", "float32", 3)
  # Every option the protocol reads, defaults filled in (the kNN protocol's:
  # DINO's temperature 0.07), typed.
  options = knn["protocol"]["options"]
  assert knn["protocol"]["type"] == "knn"
  assert options["knn_k"] == [5] and options["knn_temperature"] == 0.07
  assert options["knn_metric"] == "cosine" and options["zscore"] is False
  assert json.loads(json.dumps(knn)) == knn  # as done.json reads it back
  head = plan.step_inputs(c, c.models.a, _METAS["a"], c.protocols.classify, c.datasets.real)
  assert "train" not in head and head["representation"] == "logits"
  ft = plan.step_inputs(c, c.models.a, _METAS["a"], c.protocols.ft, c.datasets.digits)
  # Images: the protocol decodes them itself; no representation or dtype.
  assert "representation" not in ft and "dtype" not in ft
  assert ft["train"]["split"] == "train" and ft["protocol"]["options"]["epochs"] == 1
  # Another option value or seed: another key.
  c2 = _config()
  c2.protocols.knn.knn_k = [7]
  assert plan.fingerprint(plan.step_inputs(c2, c2.models.b, _METAS["b"], c2.protocols.knn,
                                           c2.datasets.real)) != plan.fingerprint(knn)


def test_released_head_reads_the_heads_representation():
  c = _config()
  with c.unlocked():
    c.protocols = {"head": dict(type="released_head", datasets=["in1k"])}
    for m in c.models.values():
      m.protocols = None
  meta = dict(_METAS["a"], released_head=dict(representation="layer3_avg",
                                              source_sha256="h"))
  steps, wanted = plan.make_plan(c, dict(_METAS, a=meta), lambda *_: "not done yet")
  assert steps[0].features == (("a", IN_VAL, "layer3_avg"),)
  assert steps[0].inputs["released_head"] == "h"
  assert steps[1].features == (("b", IN_VAL, "pre_logits"),)  # the default: pre_logits
  assert wanted == [("a", IN_VAL, "layer3_avg"), ("b", IN_VAL, "pre_logits"),
                    ("e", IN_VAL, "pre_logits")]


def test_passes_group_by_source_and_effective_preset():
  c = _config(models_per_pass=2)
  steps, wanted = plan.make_plan(c, _METAS, lambda *_: "not done yet")
  del steps
  todo = plan.extraction_plan(c, wanted, lambda m: _METAS[m]["arch"])
  passes = [(k, [(m, r) for m, _, r in g]) for k, g in todo.passes]
  # Groups in first-use order (a's ReaL logits come first: classify sorts
  # before knn); digits has no preset: each architecture's default decides
  # the group; at most 2 models per pass; every group's first 2 models before
  # any group's next ones (e's ImageNet train pass after a/b's val pass).
  assert passes[:4] == [
      (("imagenet_real", "/in", "validation", "imagenet_bilinear"), [("a", "logits"),
                                                                     ("e", "logits")]),
      (("digits", None, "train", "imagenet_bilinear"), [("a", "pre_logits"),
                                                        ("b", "layer3_avg")]),
      (("digits", None, "test", "imagenet_bilinear"), [("a", "pre_logits"),
                                                       ("b", "layer3_avg")]),
      (("imagenet1k", "/in", "train", "imagenet_bilinear"), [("a", "pre_logits"),
                                                             ("b", "layer3_avg")]),
  ]
  assert passes.index((("imagenet1k", "/in", "validation", "imagenet_bilinear"),
                        [("a", "pre_logits"), ("b", "layer3_avg")])) < passes.index(
                            (("imagenet1k", "/in", "train", "imagenet_bilinear"),
                             [("e", "pre_logits")]))
  lite = [k for k, g in passes if g == [("e", "pre_logits")] and k[0] == "digits"]
  assert [k[3] for k in lite] == ["efficientnet_lite", "efficientnet_lite"]
  # ReaL at a representation whose val set the run reads: cut out of val,
  # never extracted; its logits (no val logits in this run): extracted.
  assert sorted(todo.derived, key=str) == sorted(
      [(("a", REAL, "pre_logits"), ("a", IN_VAL, "pre_logits")),
       (("b", REAL, "layer3_avg"), ("b", IN_VAL, "layer3_avg")),
       (("e", REAL, "pre_logits"), ("e", IN_VAL, "pre_logits"))], key=str)
  extracted = {(m, k[0], r) for k, g in passes for m, r in g}
  assert ("a", "imagenet_real", "logits") in extracted
  assert not {("a", "imagenet_real", "pre_logits"), ("b", "imagenet_real", "layer3_avg")
              } & extracted
  assert all(len(g) <= 2 for _, g in passes)


def test_model_preprocessing_gets_its_own_files():
  c = _config()
  c.models.b.preprocessing = "no_norm"
  stems = plan.run_stems(c)
  own = dict(plan.model_splits(c.models.b, c.datasets.digits)[0].__dict__)
  assert own["preprocessing"] == "no_norm"
  assert stems[plan.Split(**own)] == "digits__train__no_norm"
  assert stems[DIGITS_TR] == "digits__train"
  assert plan.feature_tag(("b", plan.Split(**own), "layer3_avg"), stems) == (
      "b__digits__train__no_norm__layer3_avg")


def test_unknown_protocol_type_is_a_value_error():
  c = _config()
  c.protocols.knn.type = "svm"
  with pytest.raises(ValueError, match="unknown protocol 'svm'"):
    plan.make_plan(c, _METAS, lambda *_: "not done yet")
