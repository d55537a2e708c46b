"""Flax ViT == the timm-structured PyTorch ViT (tests/torch_vit.py), float32."""

import jax
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
OUTPUTS = ("pre_logits", "cls", "patch_mean", "last4_cls")


def _torch_model(arch, seed=0, **options):
  m = registry.create_model(arch)
  kwargs = dict(patch_size=m.patch_size, width=m.width, depth=m.depth,
                num_heads=m.num_heads)
  kwargs.update(options)
  return torch_vit.VisionTransformer(**kwargs).randomize_(seed).eval()


def _flax_variables(tmodel, arch, **extra):
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  state = vit_keys.canonicalize(state)
  options = dict(vit_keys.infer_options(state, arch), **extra)
  return vit_keys.to_flax(state, arch, options), options


def _images(batch, h, w, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)


def _compare(arch, images, tmodel, extra=None):
  extra = dict(extra or {})
  variables, options = _flax_variables(tmodel, arch, **extra)
  model = registry.create_model(arch, **options)
  out = model.apply(variables, jnp.asarray(images), train=False)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(images).permute(0, 3, 1, 2))
  for key in OUTPUTS:
    got, want = np.asarray(out[key]), ref[key].numpy()
    assert got.shape == want.shape, key
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=key)
  return out, options


def test_vit_small_real_config_interpolated_pos_embed():
  # The full registry config (12 blocks, 224 grid 14x14) at 32x32: 2x2 grid.
  tmodel = _torch_model("vit_small_patch16")
  out, options = _compare("vit_small_patch16", _images(2, 32, 32), tmodel)
  assert options["pool"] == "cls" and options["img_size"] == 224
  assert out["last4_cls"].shape == (2, 4 * 384)


def test_vit_base_cls_and_mean_pool():
  images = _images(2, 48, 48)
  _compare("vit_base_patch16", images,
           _torch_model("vit_base_patch16", depth=4), {"depth": 4})
  _, options = _compare("vit_base_patch16", images,
                        _torch_model("vit_base_patch16", depth=4, pool="mean"),
                        {"depth": 4})
  assert options["pool"] == "mean"


def test_vit_small_patch14_registers_layerscale():
  tmodel = _torch_model("vit_small_patch14", depth=2, num_registers=4,
                        layerscale=1e-5, img_size=518)
  _, options = _compare("vit_small_patch14", _images(2, 42, 42), tmodel,
                        {"depth": 2})
  assert options["num_registers"] == 4 and options["layerscale"] is not None
  assert options["img_size"] == 518


@pytest.mark.parametrize("size", [(224, 224), (64, 96)])
def test_beit_relative_position_bias_mean_pool(size):
  # At 224 the bias tables are used as trained; at 64x96 they are resized.
  tmodel = _torch_model("vit_small_patch16", depth=2, rel_pos_bias=True,
                        pool="mean", layerscale=0.1)
  _, options = _compare("vit_small_patch16", _images(1, *size), tmodel,
                        {"depth": 2})
  assert options["rel_pos_bias"] and options["pool"] == "mean"


@pytest.mark.parametrize("offset", [0.1, 0.0])
@pytest.mark.parametrize("img_size,size", [(32, (80, 48)), (96, (48, 80))])
def test_pos_embed_interpolation_other_sizes(img_size, size, offset):
  # Upsampling 2x2 -> 5x3 and downsampling 6x6 -> 3x5, non-square; DINO's
  # scale-factor scheme (offset 0.1) and the plain size-based one.
  tmodel = _torch_model("vit_small_patch16", depth=1, img_size=img_size,
                        pos_interp_offset=offset)
  _compare("vit_small_patch16", _images(2, *size), tmodel,
           {"depth": 1, "pos_interp_offset": offset})


def test_dinov2_grid_at_224_uses_the_offset():
  # DINOv2 (518 -> 37x37 grid) evaluated at 224 (16x16): the two schemes
  # differ, and the default reproduces DINOv2's own interpolation.
  assert np.abs(vit.bicubic_matrix(37, 16, 0.1) - vit.bicubic_matrix(37, 16)).max() > 1e-3
  tmodel = _torch_model("vit_small_patch14", depth=1, img_size=518)
  _compare("vit_small_patch14", _images(1, 224, 224), tmodel, {"depth": 1})


def _torch_resize(grid, size, offset):
  x = torch.from_numpy(grid).permute(2, 0, 1)[None]
  if offset:
    scale = tuple((s + offset) / n for s, n in zip(size, grid.shape[:2]))
    y = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
  else:
    y = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
  return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("offset", [0.0, 0.1])
@pytest.mark.parametrize("n_in,n_out", [(14, 2), (2, 5), (37, 16), (7, 7), (27, 13)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out, offset):
  # float64 torch is the exact scheme: the matrices reproduce it to rounding;
  # the float32 JAX resize then only differs by float32 rounding.
  grid = np.random.default_rng(0).normal(size=(n_in, n_in + 1, 3))
  size = (n_out, n_out + 2)
  want = _torch_resize(grid, size, offset)
  exact = np.einsum("oi,ijc,pj->opc", vit.bicubic_matrix(n_in, n_out, offset),
                    grid, vit.bicubic_matrix(n_in + 1, n_out + 2, offset))
  np.testing.assert_allclose(exact, want, atol=1e-12, rtol=0)
  if (n_in, n_in + 1) != size:
    got = vit.resize_grid(jnp.asarray(grid, jnp.float32), size, offset)
    np.testing.assert_allclose(np.asarray(got), want, atol=5e-6, rtol=0)


def test_drop_path_rate_one_skips_the_last_block():
  # Rates are linspace(0, 1, depth): with depth 2 block 0 always runs and block
  # 1's residual branches are always dropped, i.e. the torch model without it.
  tmodel = _torch_model("vit_small_patch16", depth=2, img_size=32)
  variables, options = _flax_variables(tmodel, "vit_small_patch16", depth=2)
  model = registry.create_model("vit_small_patch16",
                                **dict(options, drop_path_rate=1.0))
  images = _images(2, 32, 32)
  out = model.apply(variables, jnp.asarray(images), train=True,
                    rngs={"dropout": jax.random.PRNGKey(0)})
  del tmodel.blocks[1]
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(out["pre_logits"]),
                             ref["pre_logits"].numpy(), atol=TOL, rtol=0)
  # In eval mode both blocks run, so the result differs.
  eval_out = model.apply(variables, jnp.asarray(images), train=False)
  assert np.abs(np.asarray(eval_out["pre_logits"]) - ref["pre_logits"].numpy()).max() > 1e-2


def test_bfloat16_compute_close_to_float32():
  tmodel = _torch_model("vit_small_patch16", depth=2, img_size=32)
  variables, options = _flax_variables(tmodel, "vit_small_patch16", depth=2)
  images = jnp.asarray(_images(2, 32, 32))
  f32 = registry.create_model("vit_small_patch16", **options).apply(variables, images)
  bf16 = registry.create_model("vit_small_patch16", **dict(options, dtype=jnp.bfloat16)
                               ).apply(variables, images)
  assert bf16["pre_logits"].dtype == jnp.bfloat16
  scale = np.abs(np.asarray(f32["pre_logits"])).max()
  err = np.abs(np.asarray(bf16["pre_logits"], np.float32) - np.asarray(f32["pre_logits"])).max()
  assert err < 0.05 * scale


def test_bad_pool_and_tiny_input_errors():
  model = registry.create_model("vit_small_patch16", depth=1, pool="max")
  with pytest.raises(ValueError, match="pool"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  model = registry.create_model("vit_small_patch16", depth=1)
  with pytest.raises(ValueError, match="patch"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
