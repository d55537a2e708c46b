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

from sslbench_jax.config_utils import parse_arg

# name -> (arch, checkpoint file, select)
MODELS = {
    "jigsaw": ("resnet50", "jigsaw_rn50_in1k_ep105_perm2k_model_final_checkpoint_phase104.torch", None),
    "rotnet": ("resnet50", "rotnet_rn50_in1k_ep105_model_final_checkpoint_phase125.torch", None),
    "npid": ("resnet50", "converted_vissl_rn50_npid_lemniscate_neg4k_stepLR_8gpu.torch", None),
    "sela_v2": ("resnet50", "selav2_400ep_pretrain.pth.tar", None),
    "npid_plusplus": ("resnet50", "npid_plusplus_model_final_checkpoint_phase799.torch", None),
    "pirl": ("resnet50", "pirl_model_final_checkpoint_phase799.torch", None),
    "clusterfit": ("resnet50", "converted_vissl_rn50_rotnet_16kclusters_in1k_ep105.torch", None),
    "deepcluster_v2": ("resnet50", "deepclusterv2_800ep_pretrain.pth.tar", None),
    "swav": ("resnet50", "swav_800ep_pretrain.pth.tar", None),
    "simclr": ("resnet50", "simclr_model_final_checkpoint_phase999.torch", None),
    "moco_v2": ("resnet50", "moco_v2_800ep_pretrain.pth.tar", None),
    "simsiam": ("resnet50", "simsiam_resnet50_8xb32-coslr-200e_in1k_20220825-efe91299.pth", None),
    "byol": ("resnet50", "byol_resnet50.pth", None),
    "dino_rn50": ("resnet50", "dino_resnet50_pretrain.pth", None),
    "barlowtwins": ("resnet50", "barlowtwins_resnet50_8xb256-coslr-300e_in1k_20220825-57307488.pth", None),
    "densecl": ("resnet50", "densecl_r50_imagenet_200ep.pth", None),
    "moco_v3_rn50": ("resnet50", "r-50-1000ep.pth.tar", "momentum_encoder"),
    "dino_vitb16": ("vit_base_patch16", "dino_vitbase16_pretrain.pth", None),
    "ibot": ("vit_base_patch16", "checkpoint_teacher.pth", None),
    "moco_v3_vitb16": ("vit_base_patch16", "vit-b-300ep.pth.tar", "momentum_encoder"),
    "mae": ("vit_base_patch16", "mae_pretrain_vit_base.pth", None),
    "maskfeat": ("vit_base_patch16",
                 "maskfeat_vit-base-p16_8xb256-amp-coslr-300e_in1k_20221101-6dfc8bf3.pth", None),
    "beit_v2": ("vit_base_patch16", "beitv2_base_patch16_224_pt1k.pth", None),
    "milan": ("vit_base_patch16", "milan_vitb16_clip_400ep.pth", None),
    "eva": ("vit_base_patch16",
            "eva-mae-style_vit-base-p16_16xb256-coslr-400e_in1k_20221226-26d90f07.pth", None),
    "pixmim": ("vit_base_patch16",
               "pixmim_vit-base-p16_8xb512-amp-coslr-800e_in1k_20230322-e8137924.pth", None),
}

# name -> (registry dataset, train split, test split, the study's eval preset)
DATASETS = {
    "imagenet": ("imagenet1k", "train", "validation", "imagenet_bilinear"),
    "inaturalist": ("inat2021_mini_family", "train", "val", "imagenet_bilinear"),
    "cub": ("cub200", "train", "test", "pad_square"),
    "pascal": ("voc2012", "train", "val", "crop_square"),
    "cifar100": ("cifar100", "train", "test", "pad_square"),
    **{f"imagenet_d_{d}": (f"domainnet_{d}", "train", "test", "imagenet_bilinear")
       for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
}


def _subset(spec, table, what):
  if not spec:
    return list(table)
  names = spec.split("+")
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; known: {sorted(table)}")
  return names


def protocols(datasets):
  """The study's kNN and linear protocols on ``datasets`` (entry names)."""
  return {
      "knn": dict(type="knn", datasets=datasets, knn_k=["20"], knn_metric="euclidean"),
      "knn_norm": dict(type="knn", datasets=datasets, knn_k=["20"], knn_metric="euclidean",
                       zscore=True),
      "linear": dict(type="linear", datasets=datasets, lr=["0.4"], weight_decay=["0"],
                     batchnorm=["false"], epochs=100, batch_size=1024, warmup_epochs=5,
                     clip_norm=0.5),
      "linear_bn": dict(type="linear", datasets=datasets, lr=["0.4"], weight_decay=["0"],
                        batchnorm=["true"], epochs=100, batch_size=1024, warmup_epochs=5,
                        clip_norm=0.5),
  }


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
      for name in _subset(arg.models, MODELS, "models")}
  datasets = _subset(arg.datasets, DATASETS, "datasets")
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
