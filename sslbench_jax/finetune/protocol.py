"""The trained protocols in the protocol table (``protocols/registry.py``).

Three entries, each consuming images (``base.ImageInputs``) and the model's
converted weights (``context.weights_path``), each running ``train.run`` in
``context.workdir`` (checkpoints, ``metrics.jsonl``, ``result.json``: a
re-run on a finished directory does nothing, an interrupted one resumes):

* ``finetune_linear_aug``: the study's linear probe with on-the-fly
  augmentation (frozen backbone);
* ``finetune_full``: full fine-tuning;
* ``finetune_fewshot``: full fine-tuning on a class-balanced 1 % / 10 % label
  subset (the cached few-shot probe's sampler, ``probes.fewshot.sample_subset``).

The names are the results store's ``protocol`` column, the same the
``finetune --results`` CLI writes (``finetune_<--protocol>``).

Options: every default is the study's recipe, read from
``finetune/recipes.py`` (defined there once). A default of None is *derived*
by ``recipes.recipe`` from the backbone family, the optimizer or the few-shot
setup (ViT: layer decay 0.65, label smoothing 0.1, drop path 0.2; AdamW: lr
5e-4, wd 0.05; few-shot: the setup's learning rates and epochs; warm-up: 5 of
100 epochs, the same share of a shortened run).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sslbench_jax.finetune import recipes
from sslbench_jax.protocols import base

_DEFAULT = {f.name: f.default for f in dataclasses.fields(recipes.Recipe)
            if f.default is not dataclasses.MISSING}
_LINEAR = recipes.recipe("linear_aug")
_FULL = recipes.recipe("full")
_POSITIVE = (lambda x: x > 0, "> 0")
_NON_NEGATIVE = (lambda x: x >= 0, ">= 0")
_UNIT = (lambda x: 0 < x <= 1, "in (0, 1]")
_DERIVED = "derived"  # by recipes.recipe (module docstring)


@dataclasses.dataclass(frozen=True)
class _Run:
  """Run-level options every trained protocol shares (not the recipe)."""
  dtype: str = base.option("float32", "backbone compute dtype (parameters, optimizer "
                           "state and loss stay float32)", choices=("float32", "bfloat16"))
  image_size: int | None = base.option(None, "train / eval crop side (None: the "
                                       "preprocessing preset's)", check=_POSITIVE)
  eval_batch_size: int = base.option(256, "global eval batch (padded + masked)",
                                     check=_POSITIVE)
  checkpoint_every_steps: int = base.option(500, "checkpoint period in steps (also "
                                            "every epoch end)", check=_POSITIVE)
  threads: int = base.option(4, "host decode / augmentation threads", check=_POSITIVE)
  train_limit: int | None = base.option(None, "smoke runs: the first N training "
                                        "examples only", check=_POSITIVE)
  test_limit: int | None = base.option(None, "smoke runs: the first N test examples "
                                       "only", check=_POSITIVE)
  param_sharding: str = base.option("replicated", "fsdp: parameters and optimizer "
                                    "state split over the mesh's model axis (ViT-L)",
                                    choices=("replicated", "fsdp"))
  model_axis_size: int = base.option(1, "devices of the mesh's model axis (a mesh "
                                     "with another one is rebuilt over its devices)",
                                     check=_POSITIVE)

  def __post_init__(self):
    base.check_options(self)


# Run-level fields (not the recipe): where and how the run executes.
_RUN_FIELDS = tuple(f.name for f in dataclasses.fields(_Run))


@dataclasses.dataclass(frozen=True)
class _Common(_Run):
  """Recipe options with the same default in every trained protocol."""
  momentum: float = base.option(_DEFAULT["momentum"], "SGD momentum", check=_NON_NEGATIVE)
  warmup_epochs: int | None = base.option(None, "warm-up epochs (None: 5 of 100, "
                                          "the same share of a shortened run)",
                                          check=_NON_NEGATIVE, default_text=_DERIVED)
  clip_norm: float = base.option(_DEFAULT["clip_norm"], "global gradient-norm clip",
                                 check=_POSITIVE)
  head_bn: bool = base.option(_DEFAULT["head_bn"], "BatchNorm1d before the head")
  crop_scale_min: float = base.option(_DEFAULT["crop_scale_min"],
                                      "RandomResizedCrop's smallest area fraction",
                                      check=_UNIT)
  accum_steps: int = base.option(_DEFAULT["accum_steps"], "gradient accumulation "
                                 "micro-batches", check=_POSITIVE)


@dataclasses.dataclass(frozen=True)
class LinearAugOptions(_Common):
  """``finetune_linear_aug``: the study's linear probe, augmented every step."""
  epochs: int = base.option(_LINEAR.epochs, "training epochs", check=_POSITIVE)
  batch_size: int = base.option(_LINEAR.batch_size, "global batch", check=_POSITIVE)
  lr: float = base.option(_LINEAR.lr, "lr at batch 256 (x batch / 256)", check=_POSITIVE)
  weight_decay: float = base.option(_LINEAR.weight_decay, "weight decay",
                                    check=_NON_NEGATIVE)
  frozen_bn: str = base.option(_DEFAULT["frozen_bn"], "a frozen convnet's BatchNorm: "
                               "eval (running statistics) or update (train mode, "
                               "the study's code)", choices=recipes.FROZEN_BN)


@dataclasses.dataclass(frozen=True)
class FullOptions(_Common):
  """``finetune_full``: the whole backbone trains (the study's recipe)."""
  optimizer: str = base.option(_FULL.optimizer, "sgd (the study's) or adamw "
                               "(MAE/BEiT-style)", choices=recipes.OPTIMIZERS)
  epochs: int = base.option(_FULL.epochs, "training epochs", check=_POSITIVE)
  batch_size: int = base.option(_FULL.batch_size, "global batch", check=_POSITIVE)
  lr: float | None = base.option(None, "lr at batch 256 (None: sgd 0.1, adamw 5e-4)",
                                 check=_POSITIVE, default_text=_DERIVED)
  head_lr: float | None = base.option(None, "head lr at batch 256 (None: lr)",
                                      check=_POSITIVE)
  weight_decay: float | None = base.option(None, "weight decay (None: sgd 0, adamw "
                                           "0.05)", check=_NON_NEGATIVE,
                                           default_text=_DERIVED)
  label_smoothing: float | None = base.option(
      None, "label smoothing (None: ViT 0.1, else 0)", check=_NON_NEGATIVE,
      default_text=_DERIVED)
  layer_decay: float | None = base.option(
      None, "ViT layer-wise lr decay (None: ViT 0.65, else 1)", check=_UNIT,
      default_text=_DERIVED)
  drop_path: float | None = base.option(None, "ViT drop-path rate (None: ViT 0.2)",
                                        check=_NON_NEGATIVE, default_text=_DERIVED)
  backbone_bn: str = base.option(_DEFAULT["backbone_bn"], "backbone BatchNorm on "
                                 "batch statistics (the study's, SyncBN) or fixed "
                                 "running statistics", choices=("batch", "running"))


@dataclasses.dataclass(frozen=True)
class FewshotOptions(FullOptions):
  """``finetune_fewshot``: full fine-tuning on a 1 % / 10 % label subset."""
  label_fraction: float = base.option(recipes.LABEL_FRACTIONS[0], "label fraction",
                                      choices=recipes.LABEL_FRACTIONS)
  fewshot_setup: str = base.option(recipes.DEFAULT_FEWSHOT_SETUP, "the study's "
                                   "few-shot setup (its lrs and epochs)",
                                   choices=tuple(recipes.FEWSHOT_SETUPS))
  subset_seed: int = base.option(_DEFAULT["subset_seed"], "seed of the label subset "
                                 "(probes.fewshot.sample_subset, trial 0)")
  epochs: int | None = base.option(None, "training epochs (None: the setup's)",
                                   check=_POSITIVE, default_text=_DERIVED)
  lr: float | None = base.option(None, "backbone lr at batch 256 (None: the setup's)",
                                 check=_POSITIVE, default_text=_DERIVED)
  head_lr: float | None = base.option(None, "head lr at batch 256 (None: the setup's)",
                                      check=_POSITIVE, default_text=_DERIVED)
  warmup_epochs: int | None = base.option(None, "warm-up epochs (None: 0, cosine "
                                          "only)", check=_NON_NEGATIVE,
                                          default_text=_DERIVED)


# The CLI's --protocol name (recipes.PROTOCOLS) -> its options type.
OPTIONS = {"linear_aug": LinearAugOptions, "full": FullOptions, "fewshot": FewshotOptions}
_PROTOCOL_OF = {cls: name for name, cls in OPTIONS.items()}


def to_recipe(options: Any, family: str, seed: int = 0) -> recipes.Recipe:
  """The ``Recipe`` of ``options`` for a backbone ``family`` ("resnet", "vit", ...).

  Options left None take ``recipes.recipe``'s derived value.
  """
  protocol = _PROTOCOL_OF[type(options)]
  fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
  for name in _RUN_FIELDS:
    fields.pop(name)
  optimizer = fields.pop("optimizer", "sgd")
  label_fraction = fields.pop("label_fraction", None)
  setup = fields.pop("fewshot_setup", None)
  overrides = {k: v for k, v in fields.items() if v is not None}
  return recipes.recipe(protocol, family, optimizer=optimizer,
                        label_fraction=label_fraction, fewshot_setup=setup,
                        seed=seed, **overrides)


def _image_split(train: base.ImageInputs, test: base.ImageInputs) -> tuple[str | None, str | None]:
  """(data_dir, preprocessing) shared by the two splits; ValueError if they differ."""
  if train.dataset != test.dataset:
    raise ValueError(f"trained protocols train and test on one dataset, got "
                     f"{train.dataset!r} and {test.dataset!r}")
  if train.data_dir != test.data_dir:
    raise ValueError(f"{train.dataset}: train data_dir {train.data_dir!r} differs from "
                     f"test data_dir {test.data_dir!r}")
  pre = {p for p in (train.preprocessing, test.preprocessing) if p is not None}
  if len(pre) > 1:
    raise ValueError(f"{train.dataset}: train preprocessing {train.preprocessing!r} "
                     f"differs from test preprocessing {test.preprocessing!r}")
  return train.data_dir, (pre.pop() if pre else None)


def run_config(train: base.ImageInputs, test: base.ImageInputs, options: Any,
               context: base.RunContext) -> Any:
  """The ``train.RunConfig`` a protocol call runs (no training; validates)."""
  # pylint: disable=import-outside-toplevel
  from sslbench_jax.backbones import registry
  from sslbench_jax.finetune import train as train_lib
  if not context.weights_path:
    raise ValueError(f"{_PROTOCOL_OF[type(options)]}: context.weights_path (the "
                     "model's converted weights) is required")
  if not context.workdir:
    raise ValueError(f"{_PROTOCOL_OF[type(options)]}: context.workdir (the run's "
                     "directory: checkpoints, metrics, result) is required")
  data_dir, preprocessing = _image_split(train, test)
  meta = context.weights_meta
  if meta is None:  # train.run validates the file itself; only the arch is read here
    from sslbench_jax.backbones import weights  # pylint: disable=import-outside-toplevel
    meta = weights.load_variables(context.weights_path)[1]
  arch = meta.get("arch")
  if not arch:
    raise ValueError(f"{context.weights_path}: no arch in the weights' metadata")
  recipe = to_recipe(options, registry.family(arch), seed=context.seed)
  return train_lib.RunConfig(
      weights=context.weights_path, dataset=train.dataset, recipe=recipe,
      workdir=context.workdir, data_dir=data_dir, preprocessing=preprocessing,
      image_size=options.image_size, dtype=options.dtype,
      checkpoint_every_steps=options.checkpoint_every_steps,
      eval_batch_size=options.eval_batch_size, threads=options.threads,
      progress=context.progress, train_limit=options.train_limit,
      test_limit=options.test_limit, train_split=train.split, test_split=test.split,
      param_sharding=options.param_sharding, model_axis_size=options.model_axis_size)


def run(train: base.ImageInputs, test: base.ImageInputs, options: Any, *,
        mesh: Any = None, context: base.RunContext) -> base.ProtocolResult:
  """Trains ``options``' protocol on ``train``, tests on ``test`` every epoch.

  Args:
    train: the training split (dataset, split, data_dir, preprocessing).
    test: the test split (same dataset, data_dir and preprocessing).
    options: a ``LinearAugOptions``, ``FullOptions`` or ``FewshotOptions``.
    mesh: a ``parallel.make_mesh`` mesh (None: ``make_mesh(model_axis_size)``;
      one whose model axis is not ``options.model_axis_size`` is rebuilt over
      the same devices).
    context: ``weights_path`` and ``workdir`` are required (the run goes to
      ``workdir/<train.config_digest>``: checkpoints, metrics, result); ``model`` / ``dataset`` / ``split`` name the rows, ``seed``
      seeds the head, data order and augmentation.

  Returns:
    The ``top1`` / ``top5`` rows (``train.result_rows``: recipe, layer decay,
    label fraction, subset seed, precision, device count in the row), the
    scores under the protocol's name, no selection.

  Raises:
    ValueError: bad input (splits of two datasets, no weights / workdir, a
      workdir holding another run).
    train.Preempted: SIGTERM; the run resumes when called again.
  """
  from sslbench_jax.finetune import train as train_lib  # pylint: disable=import-outside-toplevel
  from sslbench_jax import parallel  # pylint: disable=import-outside-toplevel
  cfg = run_config(train, test, options, context)
  # One run directory per configuration under the caller's: a changed option
  # starts a new run (the old one stays, finished or resumable), the same
  # configuration finds its own again.
  cfg = dataclasses.replace(cfg, workdir=os.path.join(context.workdir,
                                                      train_lib.config_digest(cfg)))
  if mesh is not None and mesh.shape[parallel.MODEL_AXIS] != cfg.model_axis_size:
    mesh = parallel.make_mesh(cfg.model_axis_size, devices=mesh.devices.flat)
  os.makedirs(cfg.workdir, exist_ok=True)
  result = train_lib.run(cfg, mesh=mesh)
  rows = train_lib.result_rows(cfg, result, model=context.model, dataset=context.dataset,
                               split=context.split)
  name = f"finetune_{cfg.recipe.protocol}"
  return base.ProtocolResult(rows=rows, scores={name: {"top1": result["top1"],
                                                       "top5": result["top5"]}})


_REFERENCE = ("Closer Look (arXiv:2407.12210), its code: protocol_hyperparameters_"
              "from_code.csv, fewshot_setups.csv, vitb16_layerwise_lr_scales.csv")
LINEAR_AUG = base.Protocol("finetune_linear_aug", "images", LinearAugOptions, run,
                           _REFERENCE)
FULL = base.Protocol("finetune_full", "images", FullOptions, run, _REFERENCE)
FEWSHOT = base.Protocol("finetune_fewshot", "images", FewshotOptions, run, _REFERENCE)
