"""SimCLR v1/v2's official TensorFlow checkpoints -> torchvision-named ResNet tensors.

Two naming schemes, both read from ``google-research/simclr``:

* **TF1** (``resnet.py`` + ``model.py``; SimCLR v1 ``ResNet50_1x`` and the
  v2 ``simclrv2/pretrained/r50_1x_sk0/model.ckpt-*`` checkpoints): the encoder
  lives under ``base_model/``, built with ``tf.layers``, so its variables are
  named by creation order: ``conv2d``, ``conv2d_1``, ... and
  ``batch_normalization``, ``batch_normalization_1``, ... (``kernel``;
  ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``). The order is the
  stem conv, then per bottleneck block the projection shortcut (first block
  of a group only) followed by the 1x1, 3x3 and 1x1 convs; every conv is
  followed by its BatchNorm, so ``conv2d_i`` pairs with
  ``batch_normalization_i``.
* **TF2** (``tf2/resnet.py`` + ``tf2/model.py``, ``tf.train.Checkpoint``):
  object paths ``.../resnet_model/initial_conv_relu_max_pool/{0: conv, 2: bn}``
  and ``.../resnet_model/block_groups/{g}/layers/{b}/projection_layers/{0: conv,
  1: bn}`` / ``conv_relu_dropblock_layers/{0, 3, 6: conv; 1, 4, 7: bn}``, each
  variable ending ``/.ATTRIBUTES/VARIABLE_VALUE``.

Both use ``conv2d_fixed_padding`` (symmetric explicit padding for strided
convs, as torchvision) but a ``"SAME"`` stem max-pool (asymmetric on even
inputs), and expect inputs in [0, 1] without mean/std normalisation
(preprocessing preset ``no_norm``); docs/convert.md.

Selective-kernel (``sk1``) variants (ResNet-D stem, SK convs) and widths
other than 1x are refused with one line; optimizer slots (``Momentum``,
``.OPTIMIZER_SLOT``) are left out; heads stay under their own names so the
converter reports them as dropped.
"""

from __future__ import annotations

import re

from absl import logging
import numpy as np

from sslbench_jax.convert import tf_bundle
from sslbench_jax.convert.errors import ConversionError

_TF1_ROOT = "base_model/"
_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
       "moving_variance": "running_var"}
_TF1_VAR = re.compile(
    r"^base_model/(conv2d|batch_normalization)(?:_(\d+))?/"
    r"(kernel|gamma|beta|moving_mean|moving_variance)$")
# Slot variables of the optimizers SimCLR used (Momentum, LARS).
_TF1_SLOT = re.compile(r"/(Momentum|LARS\w*|ExponentialMovingAverage)$")
# torchvision stage sizes of the bottleneck ResNets, by their number of convs.
_DEPTHS = {53: (3, 4, 6, 3), 104: (3, 4, 23, 3), 155: (3, 8, 36, 3)}


def _conv(kernel: np.ndarray, name: str) -> np.ndarray:
  if kernel.ndim != 4:
    raise ConversionError(f"SimCLR conv kernel {name} has shape {kernel.shape}, "
                          "expected (kH, kW, in, out)")
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def _check_stem(kernel: np.ndarray, name: str) -> None:
  """Refuses the SK variant's ResNet-D stem and widths other than 1x."""
  if kernel.shape[:2] == (3, 3):
    raise ConversionError(
        f"{name} is a 3x3 ResNet-D stem: a selective-kernel (SimCLR v2 sk1) "
        "checkpoint, which is not supported (use an r50_1x_sk0 checkpoint)")
  width, rem = divmod(kernel.shape[-1], 64)
  if rem or width != 1:
    raise ConversionError(
        f"{name} has {kernel.shape[-1]} output channels: a width "
        f"{kernel.shape[-1] / 64:g}x SimCLR ResNet; only 1x is supported")


def _torchvision_order(stages: tuple[int, ...]) -> list[str]:
  """torchvision conv/BN module pairs in SimCLR's TF1 creation order."""
  order = ["conv1|bn1"]
  for i, n in enumerate(stages, start=1):
    for j in range(n):
      if j == 0:
        order.append(f"layer{i}.{j}.downsample.0|layer{i}.{j}.downsample.1")
      order += [f"layer{i}.{j}.conv{k}|layer{i}.{j}.bn{k}" for k in (1, 2, 3)]
  return order


def _tf1(tensors: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
  convs: dict[int, np.ndarray] = {}
  bns: dict[int, dict[str, np.ndarray]] = {}
  rest = []
  for key, value in tensors.items():
    if not key.startswith(_TF1_ROOT):
      rest.append(key)
      continue
    if _TF1_SLOT.search(key):
      continue
    m = _TF1_VAR.match(key)
    if not m:
      raise ConversionError(f"unknown SimCLR encoder variable {key!r} "
                            "(selective-kernel or squeeze-excitation variant?)")
    index = int(m.group(2) or 0)
    if m.group(1) == "conv2d":
      convs[index] = value
    else:
      bns.setdefault(index, {})[m.group(3)] = value
  if not convs:
    raise ConversionError("no base_model/conv2d/kernel")
  _check_stem(convs.get(0, np.zeros((0,) * 4)), "base_model/conv2d/kernel")
  n = len(convs)
  if sorted(convs) != list(range(n)) or sorted(bns) != list(range(n)):
    raise ConversionError(
        f"SimCLR base_model has {n} conv2d and {len(bns)} batch_normalization "
        "layers that are not numbered 0..N-1 in pairs (selective-kernel "
        "variant?)")
  if n not in _DEPTHS:
    raise ConversionError(
        f"SimCLR base_model has {n} conv layers; a bottleneck ResNet-50/101/152 "
        f"has {'/'.join(map(str, _DEPTHS))} (selective-kernel variant or "
        "ResNet-18/34?)")
  state = {}
  for i, pair in enumerate(_torchvision_order(_DEPTHS[n])):
    conv, bn = pair.split("|")
    suffix = "" if i == 0 else f"_{i}"
    state[conv + ".weight"] = _conv(convs[i], f"base_model/conv2d{suffix}/kernel")
    missing = set(_BN) - set(bns[i])
    if missing:
      raise ConversionError(f"base_model/batch_normalization{suffix} lacks "
                            f"{', '.join(sorted(missing))}")
    for tf_name, torch_name in _BN.items():
      state[f"{bn}.{torch_name}"] = bns[i][tf_name]
  return state, rest


_TF2_STEM = re.compile(r"^initial_conv_relu_max_pool/(\d+)/(conv2d|bn)/(\w+)$")
_TF2_BLOCK = re.compile(
    r"^block_groups/(\d+)/layers/(\d+)/"
    r"(projection_layers|conv_relu_dropblock_layers)/(\d+)/(.+)$")
_TF2_MAIN = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3"}
_TF2_PROJ = {0: "downsample.0", 1: "downsample.1"}


def _tf2_name(path: str) -> str:
  """torchvision key for a ``resnet_model``-relative TF2 variable path."""
  m = _TF2_STEM.match(path)
  if m:
    index, kind, var = int(m.group(1)), m.group(2), m.group(3)
    if (index, kind) == (0, "conv2d") and var == "kernel":
      return "conv1.weight"
    if (index, kind) == (2, "bn") and var in _BN:
      return "bn1." + _BN[var]
    raise ConversionError(
        f"SimCLR TF2 stem variable resnet_model/{path} is not a 7x7 conv + BN "
        "stem: a selective-kernel (sk1) checkpoint, which is not supported")
  m = _TF2_BLOCK.match(path)
  if m:
    g, b, where, index, rest = (int(m.group(1)), int(m.group(2)), m.group(3),
                                int(m.group(4)), m.group(5))
    module = (_TF2_PROJ if where == "projection_layers" else _TF2_MAIN).get(index)
    if module is not None and rest.count("/") == 1:
      kind, var = rest.split("/")
      is_conv = module.startswith("conv") or module == "downsample.0"
      if is_conv and kind == "conv2d" and var == "kernel":
        return f"layer{g + 1}.{b}.{module}.weight"
      if not is_conv and kind == "bn" and var in _BN:
        return f"layer{g + 1}.{b}.{module}.{_BN[var]}"
    raise ConversionError(
        f"unsupported SimCLR TF2 variable resnet_model/{path} (selective-kernel "
        "or squeeze-excitation variant?)")
  raise ConversionError(f"unknown SimCLR TF2 variable resnet_model/{path}")


def _tf2(tensors: dict[str, np.ndarray]) -> tuple[dict, list[str]]:
  state, rest = {}, []
  for key, value in tensors.items():
    if ".OPTIMIZER_SLOT" in key:
      continue
    _, sep, path = key.partition("resnet_model/")
    if not sep or not key.endswith(_TF2_SUFFIX):
      rest.append(key)
      continue
    path = path[:-len(_TF2_SUFFIX)]
    name = _tf2_name(path)
    if name in state:
      raise ConversionError(f"two SimCLR TF2 variables map to {name} "
                            f"(second: {key!r})")
    is_conv = name.startswith("conv1.") or re.search(r"\.(conv\d|downsample\.0)\.", name)
    state[name] = _conv(value, key) if is_conv else value
  if "conv1.weight" not in state:
    raise ConversionError("no resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel")
  _check_stem(np.transpose(state["conv1.weight"], (2, 3, 1, 0)),
              "resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel")
  return state, rest


def simclr_state_dict(tensors: dict[str, np.ndarray]) -> dict[str, dict | np.ndarray]:
  """Maps a SimCLR checkpoint's variables onto a torchvision ResNet state dict.

  Args:
    tensors: ``{TensorFlow variable name: array}`` from ``tf_bundle.read_bundle``.

  Returns:
    ``{"base_model": state}`` (TF1) or ``{"resnet_model": state}`` (TF2), the
    state torchvision-named in PyTorch layout, plus every non-encoder,
    non-optimizer variable under its own name (heads, ``global_step``), which
    the converter reports as dropped.

  Raises:
    ConversionError: not SimCLR's naming, a selective-kernel or wider
      variant, or an inconsistent checkpoint (one line naming the variable).
  """
  if any(k.startswith(_TF1_ROOT) for k in tensors):
    state, rest, root = *_tf1(tensors), "base_model"
  elif any("resnet_model/" in k for k in tensors):
    state, rest, root = *_tf2(tensors), "resnet_model"
  else:
    some = ", ".join(sorted(tensors)[:3])
    raise ConversionError(
        "a TensorFlow checkpoint without SimCLR's base_model/ (TF1) or "
        f"resnet_model/ (TF2) encoder variables (variables look like {some})")
  logging.warning(
      "SimCLR checkpoint: the model expects inputs in [0, 1] without mean/std "
      "normalisation (use --preprocessing no_norm); its stem max-pool pads "
      "'SAME' where the Flax ResNet pads like torchvision (docs/convert.md)")
  out: dict[str, dict | np.ndarray] = {root: state}
  for key in rest:
    if ".OPTIMIZER_SLOT" not in key and not _TF1_SLOT.search(key):
      out[key] = tensors[key]
  return out


def read_simclr(index_path: str) -> dict[str, dict | np.ndarray]:
  """Reads a SimCLR TensorFlow checkpoint (its ``.index`` file) without TF."""
  # Optimizer slots (as large as the model, twice) are not even read.
  return simclr_state_dict(tf_bundle.read_bundle(index_path, skip=_is_slot))


def _is_slot(name: str) -> bool:
  return ".OPTIMIZER_SLOT" in name or bool(_TF1_SLOT.search(name))
