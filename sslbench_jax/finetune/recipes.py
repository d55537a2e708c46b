"""The trained protocols' recipes, each default written once with its source.

Source of every default: "A Closer Look at Benchmarking Self-Supervised
Pre-training with Image Classification" (the study), read from its code
(``shared/reference/protocol_hyperparameters_from_code.csv``,
``fewshot_setups.csv``, ``vitb16_layerwise_lr_scales.csv``):

* ``linear_aug``: frozen backbone, RandomResizedCrop(0.08-1) + flip each step,
  Linear head N(0, 0.01) / 0 (optional BatchNorm1d before it), SGD momentum
  0.9, wd 0, lr 0.1 x batch / 256, batch 1024, 100 epochs, 5 warm-up epochs
  then cosine (epoch-wise), global-norm clip 0.5.
* ``full``: the whole network trains; SGD lr 0.1 x batch / 256, batch 256,
  100 epochs, warm-up 5 + cosine, clip 0.5; ViT: layer decay 0.65, label
  smoothing 0.1, drop path 0.2. ``optimizer="adamw"`` is the SSL papers'
  (MAE / BEiT) fine-tuning optimizer instead: lr 5e-4 x batch / 256, wd 0.05,
  betas (0.9, 0.999), same layer decay; no decay on 1-D parameters, biases
  and cls/pos/register tokens.
* ``fewshot``: ``full`` on a class-balanced ``int(f x N / C)``-per-class
  subset (f = 0.01 or 0.1), separate backbone / head learning rates of the
  named setup (default ``byol2``, the study's CLI default), cosine over the
  epochs without warm-up, batch 256.

The epoch-wise schedule (``lr_factor``): during warm-up epoch ``e < W`` the
factor is ``(e + 1) / (W + 1)``; afterwards a cosine from 1 towards 0 over
``E - W + 1`` epochs, ``0.5 (1 + cos(pi (e - W) / (E - W + 1)))`` (the
study's "cosine 1->0 over (100-5+1) steps"); without warm-up (few-shot)
torch's ``CosineAnnealingLR(T_max=E)``, ``0.5 (1 + cos(pi e / E))``. The
learning rate is constant within an epoch, as the study steps it per epoch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

PROTOCOLS = ("linear_aug", "full", "fewshot")
OPTIMIZERS = ("sgd", "adamw")
FROZEN_BN = ("eval", "update")
LABEL_FRACTIONS = (0.01, 0.1)
STUDY = "Closer Look (arXiv:2407.12210) code: protocol_hyperparameters_from_code.csv"

# fewshot_setups.csv: setup -> {label fraction or None (any): (lr_backbone, lr_head, epochs)}
FEWSHOT_SETUPS: dict[str, dict[float | None, tuple[float, float, int]]] = {
    "swav": {0.1: (0.01, 0.2, 20), 0.01: (0.02, 5.0, 20)},
    "barlowtwins": {None: (0.5, 0.005, 20)},
    "byol1": {None: (0.01, 0.01, 30)},
    "byol2": {None: (0.1, 0.1, 30)},
}
DEFAULT_FEWSHOT_SETUP = "byol2"  # run_fewshot_finetuning.py --setup default


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One trained protocol's hyperparameters (learning rates at batch 256).

  Attributes:
    protocol: one of ``PROTOCOLS``.
    epochs: training epochs.
    batch_size: global batch (independent of the device count).
    optimizer: "sgd" (momentum, coupled weight decay as torch's SGD) or
      "adamw" (decoupled, as torch's AdamW).
    lr: backbone learning rate at batch 256 (scaled by ``batch_size / 256``).
    head_lr: the head's learning rate at batch 256 (None: same as ``lr``).
    momentum: SGD momentum.
    weight_decay: weight decay (masked: never on 1-D parameters or tokens).
    betas, eps: AdamW moments and epsilon.
    warmup_epochs: linear warm-up epochs before the cosine (0: plain cosine).
    clip_norm: global gradient-norm clip (None: no clipping).
    label_smoothing: cross-entropy label smoothing.
    layer_decay: ViT layer-wise lr decay (1.0: none; ignored for convnets).
    drop_path: ViT stochastic depth rate (ignored for convnets).
    head_bn: BatchNorm1d (affine, eps 1e-5, momentum 0.1) before the head.
    frozen_bn: for ``linear_aug`` only: a frozen convnet's BatchNorm in
      "eval" mode (running statistics) or "update" (train mode: batch
      statistics, running statistics updated, as the study's code runs).
    backbone_bn: for ``full`` / ``fewshot``: the backbone's BatchNorm with
      "batch" statistics (train mode, running statistics updated: the study)
      or its "running" statistics kept fixed (eval mode; the affine
      parameters still train), for backbones whose running statistics
      adapt too slowly to a new domain (EfficientNet's momentum 0.01).
    label_fraction: few-shot label fraction (None for the full train set).
    fewshot_setup: few-shot setup name (``FEWSHOT_SETUPS``).
    subset_seed: seed of the few-shot subset (``fewshot.sample_subset``).
    seed: seed of the head init, data order, augmentation and drop path.
    accum_steps: gradient accumulation micro-batches per step.
    crop_scale_min: RandomResizedCrop's smallest area fraction (the study:
      torchvision's default 0.08).
    reference: where the defaults come from.
  """
  protocol: str
  epochs: int
  batch_size: int
  optimizer: str = "sgd"
  lr: float = 0.1
  head_lr: float | None = None
  momentum: float = 0.9
  weight_decay: float = 0.0
  betas: tuple[float, float] = (0.9, 0.999)
  eps: float = 1e-8
  warmup_epochs: int = 5
  clip_norm: float | None = 0.5
  label_smoothing: float = 0.0
  layer_decay: float = 1.0
  drop_path: float = 0.0
  head_bn: bool = False
  frozen_bn: str = "eval"
  backbone_bn: str = "batch"
  label_fraction: float | None = None
  fewshot_setup: str | None = None
  subset_seed: int = 42
  seed: int = 0
  accum_steps: int = 1
  crop_scale_min: float = 0.08
  reference: str = STUDY

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if self.backbone_bn not in ("batch", "running"):
      raise ValueError(f"backbone_bn {self.backbone_bn!r}; known: batch, running")
    if self.frozen_bn not in FROZEN_BN:
      raise ValueError(f"frozen_bn {self.frozen_bn!r}; known: {', '.join(FROZEN_BN)}")
    for name in ("epochs", "batch_size", "accum_steps"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    if not 0 <= self.warmup_epochs < self.epochs:
      raise ValueError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs="
                       f"{self.epochs})")
    if self.batch_size % self.accum_steps:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of "
                       f"accum_steps {self.accum_steps}")
    if not 0 < self.crop_scale_min <= 1:
      raise ValueError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
    if not 0 < self.layer_decay <= 1:
      raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.protocol == "fewshot" and self.label_fraction not in LABEL_FRACTIONS:
      raise ValueError(f"fewshot needs label_fraction in {LABEL_FRACTIONS} (the "
                       f"study's), got {self.label_fraction!r}")
    if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
      raise ValueError(f"learning rates must be > 0, got lr={self.lr}, head_lr={self.head_lr}")

  @property
  def trains_backbone(self) -> bool:
    return self.protocol != "linear_aug"

  @property
  def backbone_bn_train(self) -> bool:
    """Whether the backbone's BatchNorm runs in train mode (batch statistics)."""
    if self.trains_backbone:
      return self.backbone_bn == "batch"
    return self.frozen_bn == "update"

  def abs_lr(self, head: bool = False) -> float:
    """The learning rate actually applied: base x batch / 256 (the study's rule)."""
    base = self.head_lr if head and self.head_lr is not None else self.lr
    return base * self.batch_size / 256.0

  def lr_factor(self, epoch: int) -> float:
    """The schedule's multiplier for (0-based) ``epoch`` (module docstring)."""
    w, e_total = self.warmup_epochs, self.epochs
    if epoch < w:
      return (epoch + 1) / (w + 1)
    if w:
      return 0.5 * (1.0 + math.cos(math.pi * (epoch - w) / (e_total - w + 1)))
    return 0.5 * (1.0 + math.cos(math.pi * epoch / e_total))

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["betas"] = list(self.betas)
    return d


def recipe(protocol: str, family: str = "resnet", *, optimizer: str = "sgd",
           label_fraction: float | None = None, fewshot_setup: str | None = None,
           **overrides: Any) -> Recipe:
  """The study's recipe of ``protocol`` for a backbone ``family``.

  Args:
    protocol: "linear_aug", "full" or "fewshot".
    family: "resnet", "vit" or "efficientnet" (``registry.family``); ViTs get
      the study's layer decay 0.65, label smoothing 0.1 and drop path 0.2 when
      the backbone trains.
    optimizer: "sgd" (the study's) or "adamw" (MAE/BEiT-style fine-tuning).
    label_fraction: 0.01 or 0.1 for ``fewshot``.
    fewshot_setup: a ``FEWSHOT_SETUPS`` name (default ``byol2``).
    **overrides: any ``Recipe`` field (e.g. ``epochs=3, batch_size=64``).

  Returns:
    A validated ``Recipe``.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
  fields = {f.name for f in dataclasses.fields(Recipe)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown recipe field(s) {unknown}; known: {sorted(fields)}")
  d: dict[str, Any] = dict(protocol=protocol, optimizer=optimizer)
  if protocol == "linear_aug":
    d.update(epochs=100, batch_size=1024, lr=0.1, warmup_epochs=5)
  else:
    d.update(epochs=100, batch_size=256, lr=0.1, warmup_epochs=5)
    if family == "vit":
      d.update(layer_decay=0.65, label_smoothing=0.1, drop_path=0.2)
    if optimizer == "adamw":
      d.update(lr=5e-4, weight_decay=0.05)
  if protocol == "fewshot":
    setup = fewshot_setup or DEFAULT_FEWSHOT_SETUP
    if setup not in FEWSHOT_SETUPS:
      raise ValueError(f"few-shot setup {setup!r}; known: {', '.join(FEWSHOT_SETUPS)}")
    table = FEWSHOT_SETUPS[setup]
    row = table.get(label_fraction, table.get(None))
    if row is None:
      raise ValueError(f"few-shot setup {setup!r} has no row for label fraction "
                       f"{label_fraction!r}; it has {sorted(table)}")
    lr_backbone, lr_head, epochs = row
    d.update(lr=lr_backbone, head_lr=lr_head, epochs=epochs, warmup_epochs=0,
             label_fraction=label_fraction, fewshot_setup=setup)
  elif label_fraction is not None:
    raise ValueError(f"label_fraction is only for the fewshot protocol, not {protocol}")
  default_epochs = d["epochs"]
  d.update(overrides)
  if "epochs" in overrides and "warmup_epochs" not in overrides and d["warmup_epochs"]:
    # A shortened run keeps the warm-up's share (5 of 100 epochs), >= 1 epoch.
    share = round(d["warmup_epochs"] * d["epochs"] / default_epochs)
    d["warmup_epochs"] = min(max(1, share), d["epochs"] - 1)
  return Recipe(**d)
