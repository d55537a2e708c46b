"""Reproduce "A Closer Look at Benchmarking Self-supervised Pre-training with Image Classification".

26 backbones (17 ResNet-50, 9 ViT-B/16) x the study's 11 datasets x its kNN
(Euclidean, 1/distance votes, k = 20, raw and z-scored) and linear protocols
(on cached features: SGD momentum 0.9, lr 0.1 x 1024/256, batch 1024, 100
epochs, 5 warm-up epochs + cosine, clip 0.5, with and without BatchNorm before
the head). Checkpoints are the files the papers released (names below, URLs in
shared/reference/models_26.csv); put them in one folder. Datasets are prepared
as docs/datasets.md says.

  sslbench-jax evaluate --workdir runs/closer_look \\
      --config configs/closer_look.py:checkpoints=/ckpt,data_dir=/data/tfds

Arguments: checkpoints=DIR (required), data_dir=DIR (TFDS data dir / dataset
roots), models=a+b+c (subset of the model names), datasets=a+b (subset),
finetune=true (adds the study's trained protocols: ``finetune_protocols``).

Known departures from the study's code, on purpose: features are extracted
once in eval mode (the study's Lightning loop left BatchNorm in train mode
while probing ResNets); MoCo v3 uses the momentum encoder, which is what the
study's loader ended up loading (its second prefix strip overwrote the base
encoder).
"""

import ml_collections

from sslbench_jax import studies
from sslbench_jax.config_utils import parse_arg

# The study's tables live in sslbench_jax/studies.py (configs/imagenet_variants.py
# and configs/benchmark_lottery.py read them too).
MODELS = studies.CLOSER_LOOK_MODELS  # name -> (arch, checkpoint file, select)
# name -> (registry dataset, train split, test split, the study's eval preset)
DATASETS = studies.CLOSER_LOOK_DATASETS
# The study's kNN and linear protocols on a list of dataset entry names.
protocols = studies.closer_look_protocols


# --- BEGIN fine-tuning (issue 12, owner H6) -----------------------------------------
def finetune_protocols(datasets):
  """The study's trained protocols (``finetune=true``; sslbench_jax/finetune/protocol.py).

  Options left out are its recipe for the backbone family (finetune/recipes.py):
  the augmented linear probe (its reported linear numbers), full fine-tuning and
  few-shot fine-tuning on 1 % / 10 % of the labels, which the study runs on
  ImageNet only (run_fewshot_finetuning.py --dataset imagenet). Opt-in: they train
  through the backbone for 100 (few-shot: 30) epochs per model and dataset.
  """
  out = {"linear_aug": dict(type="finetune_linear_aug", datasets=datasets),
         "linear_aug_bn": dict(type="finetune_linear_aug", datasets=datasets, head_bn=True),
         "finetune": dict(type="finetune_full", datasets=datasets)}
  if "imagenet" in datasets:
    for pct, fraction in (("1pct", 0.01), ("10pct", 0.1)):
      out[f"fewshot_finetune_{pct}"] = dict(type="finetune_fewshot", datasets=["imagenet"],
                                            label_fraction=fraction)
  return out
# --- END fine-tuning -------------------------------------------------------------------


def get_config(arg=None):
  arg = parse_arg(arg, checkpoints="", data_dir="", models="", datasets="",
                  finetune=False)  # finetune=true: + finetune_protocols (H6)
  if not arg.checkpoints:
    raise ValueError("configs/closer_look.py needs checkpoints=DIR (the released checkpoint files)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = {
      name: dict(arch=MODELS[name][0], checkpoint=f"{arg.checkpoints}/{MODELS[name][1]}",
                 select=MODELS[name][2], allow_missing=None, options={})
      for name in studies.subset(arg.models, MODELS, "models")}
  datasets = studies.subset(arg.datasets, DATASETS, "datasets")
  c.datasets = {
      name: dict(dataset=DATASETS[name][0], train_split=DATASETS[name][1],
                 test_split=DATASETS[name][2], data_dir=arg.data_dir or None,
                 preprocessing=DATASETS[name][3])
      for name in datasets}
  c.protocols = protocols(datasets)
  if arg.finetune:  # H6: the trained protocols
    c.protocols.update(finetune_protocols(datasets))
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=128, steps_per_shard=16)
  c.analysis = dict(n_boot=2000, n_perm=2000)
  return c
