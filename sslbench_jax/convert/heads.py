"""Released linear classifiers ("heads") of SSL frameworks, kept with the weights.

Many frameworks release the ImageNet linear classifier of their evaluation
next to (or inside) the backbone checkpoint. ``find_head`` recognises one by
its source's own names (read from each framework's code):

| layout | names | framework |
|---|---|---|
| ``linear`` | ``[module.]linear.weight`` / ``.bias`` (PyTorch, (C, D)) | DINO ``eval_linear.py`` ``LinearClassifier`` (``dino_*_linearweights.pth``, under ``state_dict``, DDP ``module.``); SwAV ``eval_linear.py`` ``RegLog`` (``swav_*_eval_linear.pth.tar``) |
| ``fc`` | ``[module.]fc.weight`` / ``.bias`` (PyTorch, (C, D)) | MoCo ``main_lincls.py`` (the whole torchvision ResNet-50 with its trained ``fc``), supervised torchvision |
| ``haiku_classifier`` | ``classifier`` ``w`` (D, C) / ``b`` | BYOL's pickle (``hk.Linear(name='classifier')``, online network) |
| ``simclr_tf1`` | ``head_supervised/linear_layer/dense/kernel`` (D, C) / ``bias`` | SimCLR v1 and v2 TF1 checkpoints (``supervised_head``) |
| ``simclr_tf2`` | ``.../supervised_head/linear_layer/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE`` | SimCLR v2 TF2 checkpoints |

A head is stored in the converted weights' ``.npz`` as ``released_head/weight``
((C, D), PyTorch layout) and ``released_head/bias`` (C,), and described in the
sidecar under ``released_head`` (source file, its sha256, layout, source names,
``num_classes``, ``dim`` and the ``representation`` it applies to, by default
``pre_logits``). ``weights.load_variables`` leaves these arrays out of the
model's variables; ``weights.load_released_head`` reads them. The
``released_head`` protocol of ``evaluate`` scores ``features @ weight.T +
bias`` exactly like ``classify`` scores the backbone's own logits.

Heads with a BatchNorm before the linear layer (SwAV's ``use_bn`` variant on
the 8192-d pooled map) are refused (one line), as is a head whose input
dimension differs from the representation's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from sslbench_jax.convert.errors import ConversionError

STORE_PREFIX = "released_head"
DEFAULT_REPRESENTATION = "pre_logits"
# A classifier found inside a backbone checkpoint (not given with --head) is
# taken as a released head only if it scores the ImageNet-1k classes: MoCo
# v1's 128-d projection (``encoder_q.fc``) or OBoW's 8192-word predictor
# (``fc``) are not classifiers.
DETECTED_CLASSES = 1000

_TF2 = "/.ATTRIBUTES/VARIABLE_VALUE"
# (layout, weight name, bias name, stored as (D, C) i.e. transposed)
_LAYOUTS = (
    ("linear", "linear.weight", "linear.bias", False),
    ("fc", "fc.weight", "fc.bias", False),
    ("haiku_classifier", "classifier.w", "classifier.b", True),
    ("simclr_tf1", "head_supervised/linear_layer/dense/kernel",
     "head_supervised/linear_layer/dense/bias", True),
    ("simclr_tf2", "supervised_head/linear_layer/dense/kernel" + _TF2,
     "supervised_head/linear_layer/dense/bias" + _TF2, True),
)


@dataclasses.dataclass(frozen=True)
class Head:
  """A linear classifier: ``logits = features @ weight.T + bias``.

  Attributes:
    weight: (num_classes, dim) float32, PyTorch layout.
    bias: (num_classes,) float32.
    layout: which source naming it was read from (``_LAYOUTS``).
    keys: the weight's and bias's names in the source file.
  """
  weight: np.ndarray
  bias: np.ndarray
  layout: str
  keys: tuple[str, str]

  @property
  def num_classes(self) -> int:
    return int(self.weight.shape[0])

  @property
  def dim(self) -> int:
    return int(self.weight.shape[1])

  def logits(self, features: np.ndarray) -> np.ndarray:
    """(N, num_classes) float32 class scores of (N, dim) features."""
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"released head takes {self.dim}-d features, got shape "
                       f"{features.shape}")
    return features @ self.weight.T + self.bias


def _candidates(flat: dict[str, Any]) -> list[tuple[str, str, str, str, bool]]:
  """Every (layout, prefix, weight key, bias key, transposed) present in ``flat``."""
  out = []
  for key in flat:
    for layout, w_name, b_name, transposed in _LAYOUTS:
      if key == w_name or key.endswith(("." + w_name, "/" + w_name)):
        prefix = key[:len(key) - len(w_name)]
        if prefix + b_name in flat:
          out.append((layout, prefix, key, prefix + b_name, transposed))
  return out


def _build(flat: dict[str, Any], found: tuple[str, str, str, str, bool],
           where: str) -> Head:
  layout, prefix, w_key, b_key, transposed = found
  bn = sorted(k for k in flat if k.startswith(prefix + "bn."))
  if bn:
    raise ConversionError(f"{where}: the head {w_key} has a BatchNorm before it "
                          f"({bn[0]}, ...: SwAV's use_bn variant); not supported")
  weight = np.asarray(flat[w_key])
  bias = np.asarray(flat[b_key])
  if weight.ndim != 2 or bias.ndim != 1:
    raise ConversionError(f"{where}: head {w_key} has shape {weight.shape} and "
                          f"{b_key} {bias.shape}; expected a 2-D weight and 1-D bias")
  if transposed:
    weight = weight.T
  if bias.shape[0] != weight.shape[0]:
    raise ConversionError(f"{where}: head {w_key} gives {weight.shape[0]} classes "
                          f"but {b_key} has {bias.shape[0]}")
  if not (np.issubdtype(weight.dtype, np.floating)
          and np.issubdtype(bias.dtype, np.floating)):
    raise ConversionError(f"{where}: head {w_key} is not a float tensor")
  if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
    raise ConversionError(f"{where}: head {w_key} holds NaN/Inf values")
  return Head(np.ascontiguousarray(weight, np.float32),
              np.ascontiguousarray(bias, np.float32), layout, (w_key, b_key))


def find_head(flat: dict[str, Any], where: str, root: str = "",
              num_classes: int | None = None) -> Head | None:
  """The one linear classifier of ``flat`` (dotted names -> arrays), or None.

  Args:
    flat: a checkpoint flattened by ``detect.flatten``.
    where: the file, for errors.
    root: the backbone's prefix in ``flat``; heads under it are preferred
      (BYOL's ``online.classifier`` over ``target.classifier``).
    num_classes: keep only heads with this many classes (detection).

  Raises:
    ConversionError: several heads and no way to choose, or a malformed one.
  """
  found = _candidates(flat)
  if num_classes is not None:
    found = [f for f in found if np.ndim(flat[f[2]]) == 2 and
             np.shape(flat[f[2]])[1 if f[4] else 0] == num_classes]
  inside = [f for f in found if root and f[1].startswith(root)]
  found = inside or found
  if not found:
    return None
  if len(found) > 1:
    raise ConversionError(f"{where} holds several linear heads "
                          f"({', '.join(sorted(f[2] for f in found))}); cannot "
                          "tell which is the released classifier")
  return _build(flat, found[0], where)


def read_head_file(path: str) -> Head:
  """The linear classifier of a released head file (any checkpoint format).

  Raises:
    FileNotFoundError: no such file.
    ConversionError: unreadable, or no / several / malformed linear heads (one
      line naming the file and the supported names).
  """
  from sslbench_jax.convert import detect  # pylint: disable=g-import-not-at-top
  from sslbench_jax.convert import readers  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"head file {path} does not exist")
  obj, _ = readers.read_checkpoint(path)
  head = find_head(detect.flatten(obj), path)
  if head is None:
    names = ", ".join(w for _, w, _, _ in _LAYOUTS)
    raise ConversionError(f"no linear head in {path}: no weight/bias pair named "
                          f"[prefix]{{{names}}}")
  return head


def check_dim(head: Head, dim: int, representation: str, where: str) -> None:
  """Refuses a head whose input size is not the representation's."""
  if head.dim != dim:
    raise ConversionError(f"{where}: head {head.keys[0]} takes {head.dim}-d input but "
                          f"the model's {representation} is {dim}-d")


def stored_arrays(head: Head) -> dict[str, np.ndarray]:
  """The arrays written into the weights ``.npz`` under ``STORE_PREFIX``."""
  return {"weight": head.weight, "bias": head.bias}


def provenance(head: Head, source_file: str, source_sha256: str,
               representation: str, detected: bool) -> dict[str, Any]:
  """The sidecar's ``released_head`` entry."""
  return dict(source_file=os.path.basename(source_file), source_sha256=source_sha256,
              layout=head.layout, weight_key=head.keys[0], bias_key=head.keys[1],
              num_classes=head.num_classes, dim=head.dim,
              representation=representation,
              detected_in_checkpoint=detected)


def from_stored(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Head:
  """The ``Head`` of stored arrays and their sidecar entry."""
  return Head(np.asarray(arrays["weight"], np.float32),
              np.asarray(arrays["bias"], np.float32), str(meta.get("layout", "")),
              (str(meta.get("weight_key", "")), str(meta.get("bias_key", ""))))
