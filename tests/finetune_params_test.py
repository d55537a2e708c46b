"""init_params / layer_lr_scales against the study's published ViT-B/16 table."""

import csv
import os

import jax
import numpy as np
import pytest

from sslbench_jax import finetune
from sslbench_jax.finetune import model as model_lib

_CSV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                    "vitb16_layerwise_lr_scales.csv")


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _study_table():
  if not os.path.exists(_CSV):
    pytest.skip("../shared/reference is absent")
  with open(_CSV) as f:
    return {int(r["layer_id"]): float(r["lr_scale_at_0.65"]) for r in csv.DictReader(f)}


def test_vit_b16_scales_are_the_studys_14_values_on_the_right_leaves():
  table = _study_table()
  params = finetune.init_params("vit_base_patch16", 10, abstract=True)
  scales = _flat(finetune.layer_lr_scales("vit_base_patch16", params, 0.65))
  assert set(scales) == set(_flat(params))
  # The rule written independently: which layer a timm name belongs to.
  def layer(name):
    parts = name.split("/")
    if parts[1].startswith("blocks_"):
      return int(parts[1].split("_")[1]) + 1
    if parts[1] in ("patch_embed", "cls_token", "pos_embed"):
      return 0
    return 13
  seen = set()
  for name, s in scales.items():
    lid = layer(name)
    seen.add(lid)
    np.testing.assert_allclose(s, table[lid], rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(s, 0.65 ** (13 - lid), rtol=1e-12, err_msg=name)
  assert seen == set(range(14))
  assert scales["backbone/patch_embed/kernel"] == pytest.approx(table[0])
  assert scales["backbone/blocks_11/mlp/fc2/bias"] == pytest.approx(0.65)
  assert scales["backbone/norm/scale"] == 1.0 and scales["head/kernel"] == 1.0
  assert len(set(scales.values())) == 14


def test_resnet_scales_are_one_everywhere():
  params = finetune.init_params("resnet18", 5, abstract=True, head_bn=True)
  scales = jax.tree.leaves(finetune.layer_lr_scales("resnet18", params, 0.65))
  assert len(scales) == len(jax.tree.leaves(params)) and set(scales) == {1.0}


def test_head_init_is_normal_001_and_zero_bias():
  p = finetune.init_params("resnet18", 1000, seed=3)
  w = np.asarray(p["head"]["kernel"])
  assert w.shape == (512, 1000) and not np.any(p["head"]["bias"])
  assert abs(w.std() - 0.01) < 3e-4 and abs(w.mean()) < 1e-4


def test_weight_decay_mask_skips_1d_and_tokens():
  params = finetune.init_params("vit_small_patch16", 3, abstract=True, depth=1)
  mask = _flat(model_lib.weight_decay_mask(params))
  assert mask["backbone/blocks_0/attn/qkv/kernel"] and mask["head/kernel"]
  assert not mask["backbone/cls_token"] and not mask["backbone/pos_embed"]
  assert not mask["backbone/blocks_0/attn/qkv/bias"]
  assert not mask["backbone/norm/scale"]
