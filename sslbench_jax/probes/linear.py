"""Linear probes on cached features: many heads trained in one jitted pass.

A grid of heads (learning rate x weight decay x {no BN, BatchNorm without
affine before the head (MAE's probe)} x feature source x optimizer) is trained
on the same mini-batches. Heads that share a feature source, a BN setting and
an optimizer form a group whose weights are stacked (H, D, C); one step of a
group is one (B, D) x (D, H*C) matmul (plus one for the weight gradient) and a
``vmap`` of the per-head optax update (per-head clipping, momentum, decay). BatchNorm statistics depend only on the data,
so they are computed once per source and shared by that source's BN heads.

Training is data-parallel over ``parallel.make_mesh`` (rows over ``DATA_AXIS``): the
training features are sharded over the devices (each holds 1/N of the rows,
plus padding), or, when a ``device_budget_bytes`` cannot hold that share,
streamed from the host in chunks of steps (``_data_layout``); the rows of
every mini-batch are processed by the devices that hold them, while the heads
and the optimizer state are replicated. The loss and the BatchNorm statistics
are means over the real rows of the whole batch, so XLA reduces the
per-device partial sums and every step computes the same numbers as on one
device (up to float summation order, ~1e-6).

The recipe (its defaults: ``Options``, "A Closer Look" as coded): SGD with
momentum, an epoch-wise warmup + cosine schedule, per-head global-norm
gradient clipping, head init N(0, 0.01), bias 0, no label smoothing; AdamW
(decoupled weight decay) is the alternative optimizer.

Model selection (``fit_select``; ``run`` is the protocol entry point): all
heads train on a stratified, seeded ``1 - holdout`` of the training set and are
ranked on the held-out rest; the best (first in grid order
on ties) is retrained on the whole training set and evaluated on test once.
Test data never influences the choice unless ``select_on_test=True``, a mode
labelled "max over test" for comparing with papers that report it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time
from typing import Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
import tqdm

from sslbench_jax import parallel
from sslbench_jax.metrics import accuracy
from sslbench_jax.probes import _data_layout
from sslbench_jax.probes import _rows
from sslbench_jax.probes._selection import (GridResult, check_finite,
                                            holdout_option, select_on_test_option,
                                            stratified_split)
from sslbench_jax.protocols.base import (NON_NEGATIVE, POSITIVE,
                                         FeatureInputs, Protocol, ProtocolResult,
                                         RunContext, check_options, option)

OPTIMIZERS = ("sgd", "adamw")
BN_EPS = 1e-6        # MAE: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1    # PyTorch's default running-statistics momentum


@dataclasses.dataclass(frozen=True)
class Options:
  """The linear protocol's options; defaults: the linear recipe of "A Closer
  Look at Benchmarking Self-supervised Pre-training" as coded
  (protocol_hyperparameters_from_code.csv): SGD momentum 0.9, lr 0.1 x
  batch / 256 (0.4), batch 1024, 100 epochs, 5 warm-up epochs + cosine,
  global-norm clip 0.5, no weight decay, heads with and without BatchNorm
  (selected on 10% of train held out)."""
  lr: tuple[float, ...] | None = option(
      None, "linear: absolute peak learning rates", check=POSITIVE,
      default_text="0.1 x batch / 256")
  weight_decay: tuple[float, ...] = option((0.0,), "linear: weight decays",
                                           check=NON_NEGATIVE)
  batchnorm: tuple[bool, ...] = option((False, True),
                                       "linear: BN-without-affine settings")
  optimizer: tuple[str, ...] = option(("sgd",), "linear: sgd and/or adamw",
                                      choices=OPTIMIZERS)
  epochs: int = option(100, "linear: epochs", check=POSITIVE)
  batch_size: int = option(1024, "linear: batch size", check=POSITIVE)
  warmup_epochs: int = option(5, "linear: warmup epochs", check=NON_NEGATIVE)
  clip_norm: float = option(0.5, "linear: gradient global-norm clip (0: off)",
                            check=NON_NEGATIVE)
  holdout: float = holdout_option()
  select_on_test: bool = select_on_test_option()
  device_budget_bytes: int | None = option(
      None, "linear: bytes per device the training features may occupy (less "
      "than a device's share of them: streamed from the host)", check=POSITIVE,
      default_text="none (resident on the devices)")

  def __post_init__(self):
    check_options(self)

  def lrs(self) -> tuple[float, ...]:
    """The learning rates: ``lr``, else the recipe's 0.1 x batch / 256."""
    return self.lr if self.lr else (0.1 * self.batch_size / 256,)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """One linear head of the grid.

  Attributes:
    source: name of the feature source it reads (e.g. "cls", "avgpool").
    lr: peak learning rate (absolute, already scaled by batch size).
    weight_decay: L2 (SGD, coupled as in PyTorch) or decoupled (AdamW) decay.
    batchnorm: BatchNorm without affine parameters before the head.
    optimizer: "sgd" (momentum) or "adamw".
  """
  source: str
  lr: float
  weight_decay: float = 0.0
  batchnorm: bool = False
  optimizer: str = "sgd"

  def hparams(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Shared training settings of all heads.

  Attributes:
    epochs: passes over the training set.
    batch_size: examples per step (the last, partial batch is kept, as a
      PyTorch DataLoader with drop_last=False does).
    warmup_epochs: epochs of linear warmup (factor (e+1)/(warmup+1)).
    clip_norm: per-head global gradient-norm clip (None: off).
    momentum: SGD momentum.
    init_std: std of the normal head initialisation.
    seed: initialisation and data order.
    eval_batch_size: examples per evaluation step.
  """
  # The recipe's values are ``Options``' defaults (defined there, once).
  epochs: int = Options.epochs
  batch_size: int = Options.batch_size
  warmup_epochs: int = Options.warmup_epochs
  clip_norm: float | None = Options.clip_norm
  momentum: float = 0.9
  init_std: float = 0.01
  seed: int = 0
  eval_batch_size: int = 4096

  @classmethod
  def from_options(cls, options: Options, seed: int) -> "TrainConfig":
    """The training settings of ``options`` (clip_norm 0 = off)."""
    return cls(epochs=options.epochs, batch_size=options.batch_size,
               warmup_epochs=options.warmup_epochs,
               clip_norm=options.clip_norm or None, seed=seed)


@dataclasses.dataclass
class Heads:
  """Trained heads, in the order of their configs.

  Attributes:
    configs: the head configs.
    weights: per head (D_source, C) float32 NumPy arrays.
    biases: per head (C,).
    bn_stats: per source with a BN head: (running mean, running var).
  """
  configs: list[HeadConfig]
  weights: list[np.ndarray]
  biases: list[np.ndarray]
  bn_stats: dict[str, tuple[np.ndarray, np.ndarray]]

  def logits(self, features: Mapping[str, np.ndarray], index: int) -> np.ndarray:
    """(N, C) logits of head ``index`` on ``features[source]``."""
    cfg = self.configs[index]
    x = np.asarray(features[cfg.source], np.float32)
    if cfg.batchnorm:
      mean, var = self.bn_stats[cfg.source]
      x = (x - mean) / np.sqrt(var + BN_EPS)
    return x @ self.weights[index] + self.biases[index]


def grid(sources: Sequence[str],
         lrs: Sequence[float],
         weight_decays: Sequence[float] = (0.0,),
         batchnorm: Sequence[bool] = (False, True),
         optimizers: Sequence[str] = ("sgd",)) -> list[HeadConfig]:
  """The cartesian product of head settings, in a fixed order.

  Args:
    sources: feature source names.
    lrs: absolute peak learning rates.
    weight_decays: weight decay values.
    batchnorm: which BN settings to include.
    optimizers: subset of ``OPTIMIZERS``.

  Returns:
    A list of ``HeadConfig`` (source-major, then optimizer, BN, lr, wd).
  """
  return [HeadConfig(s, float(lr), float(wd), bool(bn), opt)
          for s, opt, bn, lr, wd in itertools.product(
              sources, optimizers, batchnorm, lrs, weight_decays)]


def lr_factor(epoch, epochs: int, warmup_epochs: int):
  """The study's epoch-wise warmup + cosine multiplier (works on jnp too)."""
  w = warmup_epochs
  warm = (epoch + 1) / (w + 1)
  cos = 0.5 * (1 + jnp.cos(jnp.pi * (epoch - w) / max(epochs - w, 1)))
  return jnp.where(epoch < w, warm, cos)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of the training set used in ``epoch`` (seeded)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
  return np.asarray(jax.random.permutation(key, n))


def train(features: Mapping[str, np.ndarray],
          labels: np.ndarray,
          num_classes: int,
          configs: Sequence[HeadConfig],
          train_config: TrainConfig = TrainConfig(),
          init: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
          devices: Sequence[jax.Device] | None = None,
          progress: bool = True,
          device_budget_bytes: int | None = None) -> Heads:
  """Trains all ``configs`` together on the same mini-batches.

  Args:
    features: source name -> (N, D_source) training features.
    labels: (N,) integer labels.
    num_classes: C.
    configs: heads to train (any mix of sources/BN/optimizers).
    train_config: epochs, batch size, schedule, clipping, seed.
    init: optional per-head (W (D, C), b (C,)) initial values; default
      W ~ N(0, init_std), b = 0, drawn per head from the seed.
    devices: devices over which the data and the batch rows are sharded
      (default: all).
    progress: show a tqdm bar (examples/s, updated once per epoch) on
      process 0. It waits for each epoch to finish before dispatching the
      next, which costs one dispatch latency per epoch and changes no number.
    device_budget_bytes: bytes per device the training features may occupy.
      None or a budget that holds each device's 1/N share of the features:
      the features live on the devices, sharded ("resident"). Otherwise they
      stay on the host and every epoch streams the mini-batches to the devices
      in chunks of steps of at most half the budget ("streamed"). Both modes
      train on the same mini-batches (same numbers up to float summation
      order).

  Returns:
    The trained ``Heads``.
  """
  t0 = time.time()
  configs = list(configs)
  tc = train_config
  labels = np.asarray(labels)
  n = _check(features, labels, num_classes, configs)
  if tc.epochs < 1 or tc.batch_size < 1:
    raise ValueError(f"epochs and batch_size must be >= 1, got {tc.epochs}, "
                     f"{tc.batch_size}")
  if device_budget_bytes is not None and device_budget_bytes <= 0:
    raise ValueError(f"device_budget_bytes must be > 0, got {device_budget_bytes}")
  groups = _groups(configs)
  dims = {s: features[s].shape[1] for s in {c.source for c in configs}}

  params = []
  for g, members in enumerate(groups):
    ws, bs = [], []
    for i in members:
      d = dims[configs[i].source]
      if init is not None:
        w0, b0 = init[i]
        if w0.shape != (d, num_classes) or b0.shape != (num_classes,):
          raise ValueError(f"init[{i}] must be ({d}, {num_classes}), "
                           f"({num_classes},), got {w0.shape}, {b0.shape}")
      else:
        key = jax.random.fold_in(jax.random.PRNGKey(tc.seed), 1000 + i)
        w0 = tc.init_std * jax.random.normal(key, (d, num_classes))
        b0 = np.zeros((num_classes,))
      ws.append(jnp.asarray(w0, jnp.float32))
      bs.append(jnp.asarray(b0, jnp.float32))
    params.append({"w": jnp.stack(ws), "b": jnp.stack(bs)})

  spec = tuple((configs[m[0]].source, configs[m[0]].batchnorm,
                configs[m[0]].optimizer) for m in groups)
  lrs = tuple(jnp.asarray([configs[i].lr for i in m], jnp.float32) for m in groups)
  wds = tuple(jnp.asarray([configs[i].weight_decay for i in m], jnp.float32)
              for m in groups)
  sources = tuple(sorted(dims))
  mesh = parallel.make_mesh(devices=devices)
  replicated = NamedSharding(mesh, P())
  steps = -(-n // tc.batch_size)
  layout = _data_layout.plan(n, steps, tc.batch_size, mesh.devices.size,
                             sum(dims.values()) * 4, device_budget_bytes)
  logging.info("linear probe: training features %s (%.1f MB per device)",
               layout.mode, layout.device_bytes / 2**20)
  step_args = (spec, sources, tc.clip_norm, tc.momentum, tc.epochs,
               tc.warmup_epochs, mesh)
  init_fn = _init_fn(spec, tc.momentum)
  params, lrs, wds = jax.device_put((tuple(params), lrs, wds), replicated)
  opt_state = init_fn(params, wds)
  bn = jax.device_put({s: (np.zeros((dims[s],), np.float32),
                           np.ones((dims[s],), np.float32)) for s in sources},
                      replicated)
  state = (params, opt_state, bn)
  host = {s: features[s] for s in sources}
  if layout.mode == "resident":
    data = {s: _data_layout.put_rows(host[s], layout.rows_per_device, mesh)
            for s in sources}
  # One epoch is one jitted scan (or one per streamed chunk), so its end is the
  # finest point the host can observe without splitting the scan; the bar waits
  # there (only when shown) so that its rate is compute, not asynchronous
  # dispatch, throughput.
  bar = tqdm.tqdm(total=tc.epochs * n, unit="ex", unit_scale=True,
                  smoothing=0.1, desc=f"linear ({len(configs)} heads)",
                  disable=not progress or not parallel.is_writer())
  # Dispatch is asynchronous: waiting for the call before the previous one
  # keeps at most two epochs' tables (or two streamed chunks) on the devices.
  tokens = collections.deque()

  def dispatch(fn, *args):
    nonlocal state
    state, token = fn(state, *args)
    tokens.append(token)
    if len(tokens) > 1:
      tokens.popleft().block_until_ready()

  with bar:
    for epoch in range(tc.epochs):
      order = epoch_order(tc.seed, epoch, n)
      e = jnp.int32(epoch)
      if layout.mode == "resident":
        idx, y, mask = _data_layout.local_tables(order, labels, layout, mesh)
        dispatch(_resident_epoch_fn(*step_args), data, idx, y, mask, lrs, wds, e)
        del idx, y, mask
      else:
        for start in range(0, steps, layout.chunk_steps):
          stop = min(start + layout.chunk_steps, steps)
          xs, y, mask = _data_layout.stream_chunk(host, labels, order, start,
                                                  stop, layout, mesh)
          dispatch(_streamed_chunk_fn(*step_args), xs, y, mask, lrs, wds, e)
          del xs, y, mask
      if not bar.disable:
        jax.block_until_ready(state)
        bar.update(n)
        bar.set_postfix(epoch=f"{epoch + 1}/{tc.epochs}", refresh=False)
  params, _, bn = state

  weights, biases = [None] * len(configs), [None] * len(configs)
  for members, p in zip(groups, params):
    w, b = np.asarray(p["w"]), np.asarray(p["b"])
    for j, i in enumerate(members):
      weights[i], biases[i] = w[j], b[j]
  bn_stats = {s: (np.asarray(bn[s][0]), np.asarray(bn[s][1])) for s in sources
              if any(c.batchnorm and c.source == s for c in configs)}
  seconds = time.time() - t0  # the host reads above waited for the last epoch
  logging.info("linear probe: trained %d heads, %d epochs x %d examples "
               "(%d steps of %d) in %.1fs with compilation, %.0f examples/s",
               len(configs), tc.epochs, n, tc.epochs * steps, tc.batch_size,
               seconds, tc.epochs * n / max(seconds, 1e-9))
  return Heads(configs, weights, biases, bn_stats)


def evaluate(heads: Heads, features: Mapping[str, np.ndarray],
             labels: np.ndarray, ks: Sequence[int] = (1,),
             batch_size: int = 4096) -> np.ndarray:
  """Top-k accuracies (%) of every head: array (num_heads, len(ks)).

  Heads sharing a source and BN setting are scored together (one batched
  matmul per chunk of examples, jitted). Classes are ranked by logit, ties by
  lower class index.
  """
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  out = np.zeros((len(heads.configs), len(ks)))
  if n == 0:
    return out
  chunk = min(batch_size, n)
  groups: dict[tuple, list[int]] = {}
  for i, c in enumerate(heads.configs):
    groups.setdefault((c.source, c.batchnorm), []).append(i)
  for (source, use_bn), members in groups.items():
    x = np.asarray(features[source], np.float32)
    if use_bn:
      mean, var = heads.bn_stats[source]
      x = (x - mean) / np.sqrt(var + BN_EPS)
    w = jnp.asarray(np.stack([heads.weights[i] for i in members]))
    b = jnp.asarray(np.stack([heads.biases[i] for i in members]))
    hits = np.zeros((len(members), len(ks)))
    for start in range(0, n, chunk):
      xc, yc = x[start:start + chunk], labels[start:start + chunk]
      valid = len(yc)
      if valid < chunk:  # one shape for every chunk
        xc = np.concatenate([xc, np.zeros((chunk - valid, x.shape[1]), np.float32)])
        yc = np.concatenate([yc, np.full((chunk - valid,), -1, np.int32)])
      hits += np.asarray(_topk_hits(w, b, jnp.asarray(xc), jnp.asarray(yc),
                                    tuple(ks)))
    out[members] = 100.0 * hits / n
  return out


@functools.partial(jax.jit, static_argnums=(4,))
def _topk_hits(w, b, x, y, ks):
  """(H, len(ks)) counts of labels in each head's top-k; label -1 never hits."""
  logits = jnp.einsum("nd,hdc->hnc", x, w) + b[:, None, :]
  # The package's one top-k rule (ties: lower class index; fewer than k
  # classes: all of them), per head.
  hit = jax.vmap(lambda l: accuracy.ranked_hits(l, y, max(ks)))(logits)
  return jnp.stack([jnp.sum(jnp.any(hit[..., :k], axis=-1), axis=-1) for k in ks],
                   axis=-1)


def fit_select(train_features: Mapping[str, np.ndarray],
               train_labels: np.ndarray,
               test_features: Mapping[str, np.ndarray],
               test_labels: np.ndarray | None,
               num_classes: int,
               configs: Sequence[HeadConfig],
               train_config: TrainConfig = TrainConfig(),
               holdout: float = Options.holdout,
               select_on_test: bool = False,
               progress: bool = True,
               device_budget_bytes: int | None = None,
               devices: Sequence[jax.Device] | None = None) -> GridResult:
  """Selects a head on held-out train, retrains it on all train, tests once.

  Args:
    train_features: source -> (N_train, D_source).
    train_labels: (N_train,).
    test_features: source -> (N_test, D_source).
    test_labels: (N_test,) class indices, or None when the test set is scored
      elsewhere from ``test_scores`` (e.g. multi-label ReaL).
    num_classes: C.
    configs: the grid (see ``grid``).
    train_config: shared training settings (its seed also seeds the split).
    holdout: fraction of every class held out for selection.
    select_on_test: "max over test" mode: train every head on all of train
      and report the best test accuracy (NOT a fair protocol; for comparing
      with papers that did this; needs ``test_labels``).
    progress: show a bar per training pass (see ``train``).
    device_budget_bytes: per-device bytes for the training features of each
      training pass (see ``train``: sharded on the devices, or streamed).
    devices: the training mesh's devices (default: all).

  Returns:
    A ``GridResult`` over ``configs``.
  """
  configs = list(configs)
  train_labels = np.asarray(train_labels)
  for what, sources in (("train_features", train_features),
                        ("test_features", test_features)):
    for source, x in sources.items():
      check_finite(f"{what}[{source!r}]", x)
  if test_labels is not None:
    test_labels = np.asarray(test_labels)
  n_test = len(next(iter(test_features.values())))
  if select_on_test:
    if test_labels is None:
      raise ValueError("linear probe: select_on_test ranks the heads by top-1 on "
                       "test and needs single-label (N,) test labels")
    heads = train(train_features, train_labels, num_classes, configs,
                  train_config, progress=progress,
                  device_budget_bytes=device_budget_bytes,
                  devices=devices)
    acc = evaluate(heads, test_features, test_labels, (1, 5))
    best = int(np.argmax(acc[:, 0]))
    return GridResult(configs, acc[:, 0].tolist(), best, "max over test",
                      float(acc[best, 0]), float(acc[best, 1]), n_test,
                      heads.logits(test_features, best))

  fit, held = stratified_split(train_labels, holdout, train_config.seed)
  if len(held) == 0:
    raise ValueError("the held-out slice is empty: every class has < 2 training "
                     "examples; use select_on_test or a single config")
  if len(configs) > 1:
    heads = train({s: v[fit] for s, v in train_features.items()},
                  train_labels[fit], num_classes, configs, train_config,
                  progress=progress, device_budget_bytes=device_budget_bytes,
                  devices=devices)
    acc = evaluate(heads, {s: v[held] for s, v in train_features.items()},
                   train_labels[held])[:, 0]
  else:
    acc = np.array([math.nan])
  best = int(np.nanargmax(acc)) if len(configs) > 1 else 0
  logging.info("linear probe: selected %s (held-out top-1 %.2f)", configs[best],
               acc[best])
  final = train(train_features, train_labels, num_classes, [configs[best]],
                train_config, progress=progress,
                device_budget_bytes=device_budget_bytes,
                devices=devices)
  test = (evaluate(final, test_features, test_labels, (1, 5))[0]
          if test_labels is not None else (math.nan, math.nan))
  return GridResult(configs, acc.tolist(), best, "holdout", float(test[0]),
                    float(test[1]), n_test, final.logits(test_features, 0))


def _check(features, labels, num_classes, configs) -> int:
  if not configs:
    raise ValueError("no head configs given")
  for c in configs:
    if c.source not in features:
      raise ValueError(f"feature source {c.source!r} not given; available: "
                       f"{sorted(features)}")
    if c.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
    if not c.lr > 0 or c.weight_decay < 0:
      raise ValueError(f"need lr > 0 and weight_decay >= 0, got {c}")
  n = len(labels)
  for s, v in features.items():
    if v.ndim != 2 or len(v) != n:
      raise ValueError(f"features[{s!r}] must be ({n}, D), got {v.shape}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be (N,) integers, got {labels.shape} {labels.dtype}")
  if n == 0 or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be non-empty and lie in [0, {num_classes})")
  return n


def _groups(configs: Sequence[HeadConfig]) -> list[list[int]]:
  """Indices of configs sharing (source, batchnorm, optimizer), grid order."""
  groups: dict[tuple, list[int]] = {}
  for i, c in enumerate(configs):
    groups.setdefault((c.source, c.batchnorm, c.optimizer), []).append(i)
  return list(groups.values())


def _direction(optimizer: str, weight_decay, momentum: float):
  """The per-head update direction; the step is -lr(t) * direction.

  SGD: PyTorch's coupled decay then heavy-ball momentum (buf = mu buf + g + wd p).
  AdamW: Adam's bias-corrected direction plus decoupled decay wd * p.
  """
  if optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum))
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay))


@functools.lru_cache(maxsize=16)
def _init_fn(spec, momentum):
  @jax.jit
  def init(params, wds):
    return tuple(jax.vmap(lambda p, wd, o=opt: _direction(o, wd, momentum).init(p))(
        p, wd) for (_, _, opt), p, wd in zip(spec, params, wds))
  return init


def _step_fn(spec, sources, clip_norm, momentum, mesh):
  """One training step of every group: (carry, xs, y, mask, lrs, wds, factor) -> carry.

  ``xs``: source -> (B', D) batch rows sharded over "data"; masked rows count
  in no sum. Traced inside the epoch / chunk scans below.
  """
  replicated = NamedSharding(mesh, P())
  clip = (optax.clip_by_global_norm(clip_norm) if clip_norm is not None
          else optax.identity())

  def group_loss(p, x, y, mask):
    """Sum over the group's heads of each head's mean cross-entropy.

    Heads are independent, so the gradient of the sum is every head's own
    gradient. The logits of all heads come from ONE (B, D) x (D, H*C) matmul
    (and the weight gradient from one (D, B) x (B, H*C)), which runs much
    faster than a batch of H small matmuls.
    """
    h, d, c = p["w"].shape
    w = jnp.transpose(p["w"], (1, 0, 2)).reshape(d, h * c)
    logits = (x @ w).reshape(-1, h, c) + p["b"][None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[:, None])
    return jnp.sum(ce * mask[:, None]) / jnp.sum(mask)

  def head_update(g, p, state, lr, wd, opt):
    g, _ = clip.update(g, clip.init(g))
    d, state = _direction(opt, wd, momentum).update(g, state, p)
    return jax.tree.map(lambda a, b: a - lr * b, p, d), state

  def step(carry, xs, y, mask, lrs, wds, factor):
    params, opt_state, bn = carry
    maskf = mask.astype(jnp.float32)
    xs_bn, new_bn = {}, dict(bn)
    for s in sources:
      x = xs[s]
      if any(b and src == s for src, b, _ in spec):
        # BatchNorm1d in train mode over the valid rows of the batch.
        count = jnp.sum(maskf)
        mean = jnp.sum(x * maskf[:, None], 0) / count
        var = jnp.sum(jnp.square(x - mean) * maskf[:, None], 0) / count
        xs_bn[s] = (x - mean) / jnp.sqrt(var + BN_EPS)
        unbiased = var * count / jnp.maximum(count - 1, 1)
        rm, rv = bn[s]
        new_bn[s] = ((1 - BN_MOMENTUM) * rm + BN_MOMENTUM * mean,
                     (1 - BN_MOMENTUM) * rv + BN_MOMENTUM * unbiased)
    new_params, new_states = [], []
    for (s, use_bn, opt), p, o, lr, wd in zip(spec, params, opt_state, lrs, wds):
      x = xs_bn[s] if use_bn else xs[s]
      grads = jax.grad(group_loss)(p, x, y, maskf)
      p, o = jax.vmap(
          lambda g_, p_, o_, lr_, wd_, opt=opt: head_update(
              g_, p_, o_, lr_ * factor, wd_, opt))(grads, p, o, lr, wd)
      new_params.append(p)
      new_states.append(o)
    carry = (tuple(new_params), tuple(new_states), new_bn)
    return jax.lax.with_sharding_constraint(carry, replicated)

  return step


@functools.lru_cache(maxsize=16)
def _resident_epoch_fn(spec, sources, clip_norm, momentum, epochs, warmup, mesh):
  """Jitted: one epoch over features sharded on the devices (``_data_layout``).

  (state, data, idx, y, mask, lrs, wds, epoch) -> (state, token). ``data``:
  source -> row blocks over "data"; ``idx``/``y``/``mask``: (steps, devices *
  cap) local tables. Every device gathers its own rows of each batch
  (shard_map), so no device ever reads another's block.
  """
  step = _step_fn(spec, sources, clip_norm, momentum, mesh)
  rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
  replicated = NamedSharding(mesh, P())
  gather = jax.shard_map(lambda d, i: {s: v[i] for s, v in d.items()}, mesh=mesh,
                         in_specs=(P(parallel.DATA_AXIS),) * 2,
                         out_specs=P(parallel.DATA_AXIS))

  def epoch(state, data, idx, y, mask, lrs, wds, epoch_index):
    factor = lr_factor(epoch_index, epochs, warmup)

    def body(carry, batch):
      i, yb, mb = (jax.lax.with_sharding_constraint(a, rows) for a in batch)
      return step(carry, gather(data, i), yb, mb, lrs, wds, factor), None

    state, _ = jax.lax.scan(body, state, (idx, y, mask))
    return state, jnp.sum(mask)

  return jax.jit(epoch, donate_argnums=(0,), out_shardings=replicated)


@functools.lru_cache(maxsize=16)
def _streamed_chunk_fn(spec, sources, clip_norm, momentum, epochs, warmup, mesh):
  """Jitted: consecutive steps on host-streamed rows (``_data_layout``).

  (state, xs, y, mask, lrs, wds, epoch) -> (state, token); ``xs``: source ->
  (k, B', D) with the rows of every step sharded over "data".
  """
  step = _step_fn(spec, sources, clip_norm, momentum, mesh)
  rows = NamedSharding(mesh, P(parallel.DATA_AXIS))
  replicated = NamedSharding(mesh, P())

  def chunk(state, xs, y, mask, lrs, wds, epoch_index):
    factor = lr_factor(epoch_index, epochs, warmup)

    def body(carry, batch):
      x, yb, mb = jax.lax.with_sharding_constraint(batch, rows)
      return step(carry, x, yb, mb, lrs, wds, factor), None

    state, _ = jax.lax.scan(body, state, (xs, y, mask))
    return state, jnp.sum(mask)

  return jax.jit(chunk, donate_argnums=(0,), out_shardings=replicated)


def run(train: FeatureInputs, test: FeatureInputs, options: Options = Options(), *,
        mesh: jax.sharding.Mesh | None = None, context: RunContext = RunContext()
        ) -> ProtocolResult:
  """The linear protocol: the grid of ``options`` (x feature sources), selected
  on held-out train (or "max over test"), the selected head retrained on all
  of train and scored on test once; rows of the test set's metrics."""
  p = _rows.prepare(train, test, context, "linear", multi_source=True)
  o = options
  configs = grid(list(p.train), o.lrs(), o.weight_decay, o.batchnorm, o.optimizer)
  tc = TrainConfig.from_options(o, int(context.seed))
  r = fit_select(p.train, p.ytr, p.test, p.yte, p.num_classes, configs, tc,
                 holdout=o.holdout, select_on_test=o.select_on_test,
                 progress=bool(context.progress),
                 device_budget_bytes=o.device_budget_bytes,
                 devices=_rows.devices(mesh))
  hp = dict(r.selected.hparams(), epochs=tc.epochs, batch_size=tc.batch_size,
            # The analysis tells a searched BN (a hyper-parameter) from a fixed one.
            batchnorm_grid=list(o.batchnorm),
            warmup_epochs=tc.warmup_epochs, clip_norm=tc.clip_norm,
            grid_size=len(configs), selection=r.selection, holdout=o.holdout)
  p.rows.add_metrics("linear", hp, r.test_scores)
  metric = "test_top1" if r.selection == "max over test" else "holdout_top1"
  scores = {_rows.label(c.hparams()): {metric: v}
            for c, v in zip(configs, r.holdout_top1)}
  return ProtocolResult(p.rows.rows, scores, _rows.label(r.selected.hparams()))


def fit_scores(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, num_classes: int,
               options: Options, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None
               ) -> np.ndarray:
  """(N_test, C) logits of one head, the first grid point of ``options``,
  trained on (x, y) with seed ``seed`` (few-shot's probe)."""
  o = options
  cfg = HeadConfig("x", o.lrs()[0], o.weight_decay[0], o.batchnorm[0], o.optimizer[0])
  heads = train({"x": x}, y, num_classes, [cfg], TrainConfig.from_options(o, seed),
                progress=False, device_budget_bytes=o.device_budget_bytes,
                devices=_rows.devices(mesh))
  return heads.logits({"x": x_test}, 0)


PROTOCOL = Protocol(
    name="linear", consumes="features", options=Options, run=run,
    reference="A Closer Look at Benchmarking Self-supervised Pre-training "
    "(linear recipe as coded); MAE (BatchNorm without affine before the head)",
    fit_scores=fit_scores)
