"""The published studies' tables the config files share (``configs/*.py``).

Configs are files, not a package; what several of them read lives here, so
no config loads another config's file:

* ``CLOSER_LOOK_MODELS`` / ``CLOSER_LOOK_DATASETS``: "A Closer Look at
  Benchmarking Self-supervised Pre-training with Image Classification"'s 26
  checkpoints and 11 datasets (``configs/closer_look.py``; the ImageNet
  variants config probes the same backbones);
* ``closer_look_protocols(datasets)``: its cached-feature protocols, typed
  protocol-table entries; the linear recipe is the linear protocol's own
  defaults (``probes/linear.py``'s ``Options``: defined there once);
* ``IMAGENET_VARIANTS``: the ImageNet test sets besides val
  (``configs/imagenet_variants.py``, ``configs/benchmark_lottery.py``);
* ``subset(spec, table, what)``: a config's ``a+b+c`` argument.
"""

from __future__ import annotations

from typing import Any, Mapping

# name -> (arch, checkpoint file, select)
CLOSER_LOOK_MODELS = {
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
CLOSER_LOOK_DATASETS = {
    "imagenet": ("imagenet1k", "train", "validation", "imagenet_bilinear"),
    "inaturalist": ("inat2021_mini_family", "train", "val", "imagenet_bilinear"),
    "cub": ("cub200", "train", "test", "pad_square"),
    "pascal": ("voc2012", "train", "val", "crop_square"),
    "cifar100": ("cifar100", "train", "test", "pad_square"),
    **{f"imagenet_d_{d}": (f"domainnet_{d}", "train", "test", "imagenet_bilinear")
       for d in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
}

# entry name -> (registry test dataset, test split, folder-root config argument)
IMAGENET_VARIANTS = {
    "imagenet_real": ("imagenet_real", "validation", None),
    "imagenet_v2": ("imagenet_v2", "test", "v2_dir"),
    "imagenet_r": ("imagenet_r", "test", "r_dir"),
    "imagenet_sketch": ("imagenet_sketch", "test", "sketch_dir"),
    "imagenet_a": ("imagenet_a", "test", "a_dir"),
}


def subset(spec: str, table: Mapping[str, Any], what: str) -> list[str]:
  """The names of a config argument ``a+b+c`` (all of ``table``'s when empty).

  Raises:
    ValueError: a name not in ``table`` (the known ones listed).
  """
  if not spec:
    return list(table)
  names = spec.split("+")
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; known: {sorted(table)}")
  return names


def closer_look_protocols(datasets: list[str]) -> dict[str, dict[str, Any]]:
  """The study's kNN and linear protocols on ``datasets`` (entry names).

  kNN: Euclidean, 1/distance votes, k = 20, raw and z-scored. Linear: the
  linear protocol's defaults, which are this study's recipe (SGD momentum
  0.9, lr 0.1 x 1024/256 = 0.4, batch 1024, 100 epochs, 5 warm-up + cosine,
  clip 0.5, weight decay 0), without and with BatchNorm before the head.
  """
  return {
      "knn": dict(type="knn", datasets=datasets, knn_k=[20], knn_metric="euclidean"),
      "knn_norm": dict(type="knn", datasets=datasets, knn_k=[20], knn_metric="euclidean",
                       zscore=True),
      "linear": dict(type="linear", datasets=datasets, batchnorm=[False]),
      "linear_bn": dict(type="linear", datasets=datasets, batchnorm=[True]),
  }
