"""ImageNet-1k probes tested on ImageNet val and its variants: how ranks change.

The "Closer Look" study's backbones and probes (configs/closer_look.py:
Euclidean kNN k = 20, raw and z-scored; the linear recipe with and without
BatchNorm before the head), all trained once per model on ImageNet-1k train
features (extracted once, shared by every variant) and tested on ImageNet val,
ImageNet ReaL, ImageNet-v2 (MatchedFrequency), ImageNet-R, ImageNet-Sketch and
ImageNet-A. Each test set is scored in its own label space: ReaL by
``real_top1`` (multi-hot labels), R and A by ``subset_top1`` (the 1000 scores
restricted to their 200 classes; the unrestricted ``top1`` is stored too).
The report's "rank changes" table (``report/rank_changes.csv``) gives every
model's rank on each variant minus its rank on val; it is computed on
``results_primary.csv``, one row per measurement with its test set's primary
metric.

  sslbench-jax evaluate --workdir runs/imagenet_variants \\
      --config configs/imagenet_variants.py:checkpoints=/ckpt,data_dir=/data/tfds

Arguments: checkpoints=DIR (required; the files named in closer_look.MODELS),
data_dir=DIR (the TFDS data dir holding imagenet2012 and the variants, or the
ImageNet folder root with train/ and val/), models=a+b (subset of the model
names), variants=a+b (subset of imagenet_real, imagenet_v2, imagenet_r,
imagenet_sketch, imagenet_a; ImageNet val is always tested), and for variants
kept as extracted folders (docs/datasets.md) their roots: v2_dir, r_dir,
sketch_dir, a_dir (default: data_dir). Datasets are prepared as
docs/datasets.md says.

Notes: the study's use of ImageNet-A is not confirmed (see
shared/reference/imagenet_variants.csv), nor which ImageNet-v2 version it used
or whether it restricted R's logits (both numbers are stored). ReaL (46,837
val images with multi-hot labels) is declared by the data layer as derived
from ImageNet val: when the run also extracts the val features of the same
images (same data_dir, preprocessing and representation), ReaL's features are
cut out of them instead of being extracted again (``data/derived.py``).
"""

import ml_collections

from sslbench_jax import studies
from sslbench_jax.config_utils import parse_arg

# entry name -> (registry test dataset, test split, folder-root argument)
VARIANTS = studies.IMAGENET_VARIANTS


def get_config(arg=None):
  arg = parse_arg(arg, checkpoints="", data_dir="", models="", variants="",
                  v2_dir="", r_dir="", sketch_dir="", a_dir="")
  if not arg.checkpoints:
    raise ValueError("configs/imagenet_variants.py needs checkpoints=DIR (the released "
                     "checkpoint files)")
  models = studies.CLOSER_LOOK_MODELS
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {
      name: dict(arch=models[name][0], checkpoint=f"{arg.checkpoints}/{models[name][1]}",
                 select=models[name][2], allow_missing=None, options={})
      for name in studies.subset(arg.models, models, "models")}
  variants = studies.subset(arg.variants, VARIANTS, "variants")
  train = dict(dataset="imagenet1k", train_split="train", data_dir=arg.data_dir or None,
               preprocessing="imagenet_bilinear")
  c.datasets = {"imagenet": dict(train, test_split="validation", test_dataset=None,
                                 test_data_dir=None)}
  for name in variants:
    dataset, split, dir_arg = VARIANTS[name]
    c.datasets[name] = dict(train, test_dataset=dataset, test_split=split,
                            test_data_dir=(arg[dir_arg] if dir_arg else None) or None)
  c.protocols = studies.closer_look_protocols(list(c.datasets))
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=128, steps_per_shard=16)
  c.analysis = dict(n_boot=2000, n_perm=2000)
  return c
