"""Position-embedding resize rules == each source's own ``F.interpolate`` call.

A tiny ViT (patch 16, trained grid 4x4 = 64 px) is evaluated at 96x96 (6x6,
upsampling) and 96x48 (6x3, downsampling one axis). The PyTorch reference
(tests/torch_vit.py) resizes with a transcription of the source's code: DINO's
``interpolate_pos_encoding``, MAE's ``interpolate_pos_embed`` and timm's
``resample_abs_pos_embed``; the Flax model gets the options of the matching
``vit_keys.POS_INTERP_RULES`` entry.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_vit
from sslbench_jax.backbones import registry
from sslbench_jax.backbones import vit
from sslbench_jax.convert import vit_keys

TOL = 1e-4
ARCH = "vit_small_patch16"
TINY = {"width": 64, "num_heads": 2, "depth": 2}
OUTPUTS = ("pre_logits", "cls", "patch_mean", "last4_cls")

SOURCE_RESIZE = {
    "dino_offset": torch_vit.dino_interpolate_pos_encoding,
    "exact_size": torch_vit.mae_interpolate_pos_embed,
    "exact_size_antialias": torch_vit.timm_resample_abs_pos_embed,
}


def _torch_model(resize, seed=0):
  return torch_vit.VisionTransformer(
      patch_size=16, img_size=64, pos_resize=resize, **TINY).randomize_(seed).eval()


def _flax_features(tmodel, rule, images):
  state = vit_keys.canonicalize(
      {k: v.detach().numpy() for k, v in tmodel.state_dict().items()})
  options = {**vit_keys.infer_options(state, ARCH), **TINY,
             **vit_keys.POS_INTERP_RULES[rule]}
  variables = vit_keys.to_flax(state, ARCH, options)
  model = registry.create_model(ARCH, **options)
  return model.apply(variables, jnp.asarray(images), train=False)


def _torch_features(tmodel, images):
  with torch.no_grad():
    return {k: v.numpy() for k, v in
            tmodel(torch.from_numpy(images).permute(0, 3, 1, 2)).items()}


def _images(h, w):
  return np.random.default_rng(1).normal(size=(2, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("size", [(96, 96), (96, 48)])
@pytest.mark.parametrize("rule", sorted(SOURCE_RESIZE))
def test_rule_matches_source_resize(rule, size):
  tmodel = _torch_model(SOURCE_RESIZE[rule])
  images = _images(*size)
  out = _flax_features(tmodel, rule, images)
  ref = _torch_features(tmodel, images)
  for key in OUTPUTS:
    np.testing.assert_allclose(np.asarray(out[key]), ref[key], atol=TOL,
                               rtol=0, err_msg=f"{rule}: {key}")
  # The rules are told apart: another source's resize misses by far more.
  for other in sorted(set(SOURCE_RESIZE) - {rule}):
    other_ref = _torch_features(_torch_model(SOURCE_RESIZE[other]), images)
    gap = np.abs(np.asarray(out["pre_logits"]) - other_ref["pre_logits"]).max()
    assert gap > 100 * TOL, (rule, other, gap)


def test_native_resolution_ignores_the_rule():
  images = _images(64, 64)
  outs = [np.asarray(_flax_features(_torch_model(None), rule, images)["pre_logits"])
          for rule in sorted(SOURCE_RESIZE)]
  ref = _torch_features(_torch_model(None), images)["pre_logits"]
  for out in outs:
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("offset", [0.0, 0.1])
@pytest.mark.parametrize("n_in,n_out", [(4, 6), (14, 2), (6, 3), (37, 16),
                                        (5, 12), (7, 7)])
def test_antialias_matrix_matches_torch(n_in, n_out, offset):
  # float64 torch is the exact scheme (up- and downsampling, size= and
  # scale_factor=); an axis whose length is unchanged is left as is.
  grid = np.random.default_rng(0).normal(size=(n_in, n_in + 1, 2))
  size = (n_out, n_out + 1)
  x = torch.from_numpy(grid).permute(2, 0, 1)[None]
  if offset:
    scale = tuple((s + offset) / n for s, n in zip(size, grid.shape[:2]))
    want = F.interpolate(x, scale_factor=scale, mode="bicubic", antialias=True)
  else:
    want = F.interpolate(x, size=size, mode="bicubic", antialias=True)
  want = want[0].permute(1, 2, 0).numpy()
  exact = np.einsum("oi,ijc,pj->opc",
                    vit.bicubic_matrix(n_in, n_out, offset, True), grid,
                    vit.bicubic_matrix(n_in + 1, n_out + 1, offset, True))
  np.testing.assert_allclose(exact, want, atol=1e-12, rtol=0)
  got = vit.resize_grid(jnp.asarray(grid, jnp.float32), size, offset,
                        antialias=True)
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-6, rtol=0)


def test_default_is_unchanged_dino_offset():
  model = registry.create_model(ARCH)
  assert (model.pos_interp_offset, model.pos_interp_antialias) == (0.1, False)
