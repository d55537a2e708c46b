"""Explicit name matching: model names -> method/backbone/family, dataset roles.

Results come from configs written by different people ("dino_resnet50",
"DINO RN50", "moco-v3_vit_b16", ...). Matching is done by rules written out
here (and tested), never by fuzzy string similarity: a name that no rule
recognises maps to ``None``/"unknown" instead of to a guess.
"""

from __future__ import annotations

import dataclasses
import json
import re

# The 26 methods of "A Closer Look at Benchmarking Self-supervised
# Pre-training with Image Classification" (models_26.csv):
# method key -> (display name, method family, backbones it exists with).
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "jigsaw": ("Jigsaw", "discriminative", ("ResNet",)),
    "rotnet": ("RotNet", "discriminative", ("ResNet",)),
    "npid": ("NPID", "discriminative", ("ResNet",)),
    "sela_v2": ("SeLa-v2", "discriminative", ("ResNet",)),
    "npid_plusplus": ("NPID++", "discriminative", ("ResNet",)),
    "pirl": ("PIRL", "discriminative", ("ResNet",)),
    "clusterfit": ("ClusterFit", "discriminative", ("ResNet",)),
    "deepcluster_v2": ("DeepCluster-v2", "discriminative", ("ResNet",)),
    "swav": ("SwAV", "discriminative", ("ResNet",)),
    "simclr": ("SimCLR", "discriminative", ("ResNet",)),
    "moco_v2": ("MoCo v2", "discriminative", ("ResNet",)),
    "simsiam": ("SimSiam", "discriminative", ("ResNet",)),
    "byol": ("BYOL", "discriminative", ("ResNet",)),
    "dino": ("DINO", "discriminative", ("ResNet", "ViT")),
    "barlowtwins": ("Barlow Twins", "discriminative", ("ResNet",)),
    "densecl": ("DenseCL", "discriminative", ("ResNet",)),
    "moco_v3": ("MoCo v3", "discriminative", ("ResNet", "ViT")),
    "ibot": ("iBOT", "discriminative", ("ViT",)),
    "mae": ("MAE", "generative", ("ViT",)),
    "maskfeat": ("MaskFeat", "generative", ("ViT",)),
    "beit_v2": ("BEiT v2", "generative", ("ViT",)),
    "milan": ("MILAN", "generative", ("ViT",)),
    "eva": ("EVA", "generative", ("ViT",)),
    "pixmim": ("PixMIM", "generative", ("ViT",)),
    # Further frameworks of published_baselines.csv (the "Benchmark Lottery"
    # study's 12 ResNet-50 frameworks and the releases users compare with).
    "moco_v1": ("MoCo v1", "discriminative", ("ResNet",)),
    "simclr_v2": ("SimCLR v2", "discriminative", ("ResNet",)),
    "pcl_v1": ("PCL v1", "discriminative", ("ResNet",)),
    "pcl_v2": ("PCL v2", "discriminative", ("ResNet",)),
    "obow": ("OBoW", "discriminative", ("ResNet",)),
    "vicreg": ("VICReg", "discriminative", ("ResNet",)),
    "supervised": ("Supervised", "supervised", ("ResNet", "ViT")),
}

# Compact spellings (lower case, punctuation removed) -> method key.
_ALIASES: dict[str, str | None] = {k.replace("_", ""): k for k in METHODS}
_ALIASES.update({
    "npid++": "npid_plusplus", "npidpp": "npid_plusplus",
    "siamsiam": "simsiam",  # the study's repo key has this typo
    "simclrv1": "simclr",
    "selav2": "sela_v2", "sela": "sela_v2",
    "deepclusterv2": "deepcluster_v2", "dcv2": "deepcluster_v2",
    "barlow": "barlowtwins",
    "mocov2": "moco_v2", "mocov3": "moco_v3",
    "beitv2": "beit_v2", "beit2": "beit_v2",
    "mocov1": "moco_v1",
    "simclrv2": "simclr_v2", "simclr2": "simclr_v2",
    "pclv1": "pcl_v1", "pclv2": "pcl_v2",
    "barlowtwin": "barlowtwins",
    "vicregl": None,  # VICRegL is a different method: never read as VICReg
})

# Backbone spellings inside a compacted name, longest first.
_BACKBONE_RE = re.compile(
    r"(resnet50|resnet|rn50|r50|vitbasepatch16224|vitbasepatch16|vitbase16|"
    r"vitb16|vitbase|vitb|vit)")
_EPOCHS_RE = re.compile(r"^\d+(ep|epoch|epochs|e)$")
# Tokens that name no method: SimCLR v2's "1x" width and "sk0" (no selective
# kernels) of the plain ResNet-50 release. Other widths / SK variants are
# different networks and stay in the name (so they are not matched).
_NEUTRAL_TOKENS = ("1x", "sk0")

UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a model name tells us.

  Attributes:
    method: key in ``METHODS`` or None when not recognised.
    backbone: "ResNet", "ViT" or "unknown".
    method_family: "discriminative", "generative", "supervised" or
      "unknown".
    epochs: pre-training epochs named in the model name (``800ep``), if any.
  """
  method: str | None
  backbone: str
  method_family: str
  epochs: int | None = None


def parse_model_name(name: str) -> ModelInfo:
  """Recognises the SSL method and backbone in a model name.

  Rules: lower-case; split on non-alphanumerics (``+`` kept); drop epoch
  tokens like ``800ep``; join; find and remove one backbone spelling
  (``resnet50``/``rn50``/``r50`` -> ResNet, ``vit_b16``/``vit_base`` -> ViT);
  the rest must be a known method spelling. A method released with only one
  backbone in the study implies that backbone.

  Args:
    name: e.g. ``"dino_resnet50"``, ``"MoCo v2 (800ep)"``, ``"mae_vitb16"``.

  Returns:
    ``ModelInfo``; ``method`` None when no rule matches.
  """
  tokens = [t for t in re.split(r"[^a-z0-9+]+", name.lower()) if t]
  compact = "".join(t for t in tokens
                    if not _EPOCHS_RE.match(t) and t not in _NEUTRAL_TOKENS)
  epoch_tokens = [int(re.match(r"\d+", t).group()) for t in tokens if _EPOCHS_RE.match(t)]
  epochs = epoch_tokens[0] if len(epoch_tokens) == 1 else None
  backbone = UNKNOWN
  m = _BACKBONE_RE.search(compact)
  if m:
    backbone = "ViT" if m.group(1).startswith("vit") else "ResNet"
    compact = compact[:m.start()] + compact[m.end():]
  method = _ALIASES.get(compact)
  if method is None:
    return ModelInfo(None, backbone, UNKNOWN, epochs)
  _, fam, backbones = METHODS[method]
  if backbone == UNKNOWN and len(backbones) == 1:
    backbone = backbones[0]
  return ModelInfo(method, backbone, fam, epochs)


# ----------------------------------------------------------------- datasets

IN_DOMAIN = "imagenet"
# ImageNet-v2 has three test sets (``imagenet_v2`` = MatchedFrequency, the
# common default; Threshold0.7; TopImages), kept apart.
VARIANTS = ("imagenet_real", "imagenet_v2", "imagenet_v2_threshold", "imagenet_v2_top",
            "imagenet_r", "imagenet_sketch", "imagenet_a")
_DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

DATASET_DISPLAY = {
    "imagenet": "ImageNet-1k", "imagenet_real": "ImageNet ReaL",
    "imagenet_v2": "ImageNet-v2", "imagenet_v2_threshold": "ImageNet-v2 Thr0.7",
    "imagenet_v2_top": "ImageNet-v2 Top", "imagenet_r": "ImageNet-R",
    "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A",
    "inaturalist": "iNat2021-mini", "cub": "CUB-200", "pascal": "Pascal VOC",
    "cifar100": "CIFAR-100",
    **{f"imagenet_d_{d}": f"IN-D {d}" for d in _DOMAINNET},
}


def canonical_dataset(dataset: str, split: str = "") -> str:
  """Maps a dataset (and split) name to a canonical key.

  ImageNet val -> ``"imagenet"``; its evaluation variants -> ``VARIANTS``
  (also recognised from the split, e.g. dataset ``imagenet2012`` split
  ``real``); ImageNet-v2's three versions stay apart (``imagenet_v2``,
  ``imagenet_v2_threshold``, ``imagenet_v2_top``); the 10 transfer
  datasets of the study -> ``inaturalist``, ``cub``, ``pascal``,
  ``cifar100``, ``imagenet_d_<domain>``. Unrecognised names are
  returned lower-cased unchanged.

  Args:
    dataset: dataset name as stored in the results.
    split: split name (only used to spot ImageNet variants).

  Returns:
    The canonical key.
  """
  c = re.sub(r"[^a-z0-9]", "", dataset.lower())
  if "imagenetd" in c or "domainnet" in c:
    for d in _DOMAINNET:
      if c.endswith(d):
        return f"imagenet_d_{d}"
    return dataset.lower()
  if c.startswith("inat"):
    return "inaturalist"
  if c.startswith("cub"):
    return "cub"
  if "pascal" in c or c.startswith("voc"):
    return "pascal"
  if c.startswith("cifar100"):
    return "cifar100"
  # TFDS spells ImageNet "imagenet2012" (e.g. "imagenet2012_real").
  c = re.sub(r"^(imagenet(2012|1k)|ilsvrc2012)", "imagenet", c)
  variant = {"imagenetreal": "imagenet_real",
             "imagenetv2": "imagenet_v2", "imagenetr": "imagenet_r",
             "imagenetrendition": "imagenet_r", "imagenetsketch": "imagenet_sketch",
             "imageneta": "imagenet_a", "imagenetadversarial": "imagenet_a"}
  if c.startswith("imagenetv2"):
    # The version suffix (TFDS "imagenet_v2/threshold-0.7", registry
    # "imagenet_v2_threshold", ...) says which of the three test sets.
    version = c[len("imagenetv2"):]
    for start, canon in (("threshold", "imagenet_v2_threshold"), ("top", "imagenet_v2_top"),
                         ("matched", "imagenet_v2")):
      if version.startswith(start):
        return canon
    return "imagenet_v2" if not version else dataset.lower()
  for prefix in sorted(variant, key=len, reverse=True):
    if c == prefix:
      return variant[prefix]
  if c.startswith(("imagenet", "ilsvrc")):
    s = re.sub(r"[^a-z0-9]", "", split.lower())
    for key, canon in (("real", "imagenet_real"), ("v2", "imagenet_v2"),
                       ("sketch", "imagenet_sketch")):
      if key in s:
        return canon
    return IN_DOMAIN
  return dataset.lower()


def dataset_display(key: str) -> str:
  """Short human-readable name of a canonical dataset key."""
  return DATASET_DISPLAY.get(key, key)


# "batchnorm" is what probes.linear records.
_BN_KEYS = ("batchnorm", "final_batch_norm", "use_final_batch_norm", "batch_norm", "bn")
# A BatchNorm marker at the end of a protocol (config entry) name: the study
# config's "linear_bn" entry is "linear" with BN, and must pair with "linear".
_BN_SUFFIX_RE = re.compile(r"[_+-](bn|batchnorm|batch_norm)$", re.IGNORECASE)
BN_SUFFIX = "+bn"


def _hparams_dict(protocol: str, hparams: str | dict | None) -> dict:
  if isinstance(hparams, str):
    try:
      hparams = json.loads(hparams) if hparams.strip() else {}
    except json.JSONDecodeError:
      raise ValueError(f"hparams of protocol {protocol!r} is not JSON: "
                       f"{hparams[:60]!r}") from None
  return hparams if isinstance(hparams, dict) else {}


def _truthy(v) -> bool:
  return v.strip().lower() in ("true", "1", "yes") if isinstance(v, str) else bool(v)


def uses_batchnorm(protocol: str, hparams: str | dict | None) -> bool:
  """Whether a row's hparams say BatchNorm before the head."""
  hp = _hparams_dict(protocol, hparams)
  return any(hp.get(k) for k in _BN_KEYS)


def protocol_label(protocol: str, hparams: str | dict | None = None,
                   bn_selected: bool = False) -> str:
  """Protocol name, labelled ``<base>+bn`` when BatchNorm before the head is set.

  The label of a BN run is its name without a trailing BN marker (``_bn``,
  ``-bn``, ``+bn``, ``_batchnorm``) plus ``+bn``, so a config entry
  ``linear_bn`` (``batchnorm=true``) becomes ``linear+bn`` and pairs with the
  ``linear`` entry in the BatchNorm-effect analysis.

  Args:
    protocol: e.g. ``"linear"`` or ``"linear_bn"``.
    hparams: dict or JSON string of the run's hyper-parameters.
    bn_selected: BN on/off was chosen by model selection (a grid over both):
      then it is a selected hyper-parameter like the learning rate, not part
      of the protocol, and the name is kept as it is. Also assumed when the
      hparams carry ``batchnorm_grid`` (the BN settings searched) with both.

  Returns:
    e.g. ``"linear"`` or ``"linear+bn"``.
  """
  hp = _hparams_dict(protocol, hparams)
  grid = hp.get("batchnorm_grid")
  if isinstance(grid, (list, tuple)) and len({_truthy(g) for g in grid}) > 1:
    bn_selected = True  # the row says BN on/off was searched
  if bn_selected or not uses_batchnorm(protocol, hparams):
    return protocol
  return _BN_SUFFIX_RE.sub("", protocol) + BN_SUFFIX
