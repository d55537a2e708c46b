"""backbones._precision: bfloat16 inputs, float32 accumulation, one rounding.

References: NumPy float64 dots/convolutions of the same bfloat16-rounded
values, ``lax.conv_general_dilated`` in float32, the float32 Flax forward and
the PyTorch reference modules (tests/torch_resnet.py, tests/torch_vit.py).
"""

import jax
import jax.extend
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sslbench_jax.backbones import _precision
from sslbench_jax.backbones import registry
from sslbench_jax.convert import _family
from sslbench_jax.convert import resnet_keys
from sslbench_jax.convert import vit_keys
import torch_resnet
import torch_vit

BF16_EPS = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)
FEATURE_RTOL = 1e-2   # the documented bf16-vs-float32 feature tolerance
NHWC = ("NHWC", "HWIO", "NHWC")


def _bf16(shape, seed):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return jnp.asarray(x, jnp.bfloat16)


def _f64(x):
  return np.asarray(x, np.float64)


def _conv_ref(x, w, stride, pad):
  """float64 NHWC/HWIO convolution by explicit patch sums (NumPy)."""
  x = np.pad(_f64(x), ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride[0] + 1
  wo = (x.shape[2] - kw) // stride[1] + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + (ho - 1) * stride[0] + 1:stride[0],
                j:j + (wo - 1) * stride[1] + 1:stride[1]]
      out += patch @ _f64(w[i, j])
  return out


def _assert_one_rounding(got, ref64):
  # A float32 accumulation rounded once to bf16: |err| <= eps |ref| plus the
  # float32 summation error (tiny); a bf16 accumulator would be far off.
  got = _f64(got)
  tol = BF16_EPS * np.abs(ref64) + 1e-4 * np.abs(ref64).max()
  assert np.all(np.abs(got - ref64) <= tol), np.abs(got - ref64).max()


def test_dot_general_accumulates_in_float32_and_rounds_once():
  a, b = _bf16((64, 1536), 0), _bf16((1536, 48), 1)
  got = _precision.dot_general(a, b, (((1,), (0,)), ((), ())))
  assert got.dtype == jnp.bfloat16
  _assert_one_rounding(got, _f64(a) @ _f64(b))
  # An explicit preferred_element_type is honoured (float32 out, no rounding).
  f32 = _precision.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
  assert f32.dtype == jnp.float32
  np.testing.assert_allclose(f32, _f64(a) @ _f64(b), rtol=1e-5, atol=1e-4)


def test_einsum_float32_accumulation_and_output_dtype():
  q, k = _bf16((2, 5, 3, 64), 2), _bf16((2, 7, 3, 64), 3)
  ref = np.einsum("bqhd,bkhd->bhqk", _f64(q), _f64(k))
  got = _precision.einsum("bqhd,bkhd->bhqk", q, k)
  assert got.dtype == jnp.bfloat16
  _assert_one_rounding(got, ref)
  logits = _precision.einsum("bqhd,bkhd->bhqk", q, k, out_dtype=jnp.float32)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("hw,k,stride,pad", [
    ((9, 9), 1, 1, ((0, 0), (0, 0))),     # pointwise -> one dot
    ((9, 11), 1, 2, ((0, 0), (0, 0))),    # strided 1x1 (ResNet shortcut), odd size
    ((35, 33), 16, 16, ((0, 0), (0, 0))),  # ViT patch embedding, ragged edge cropped
    ((10, 10), 3, 2, ((1, 1), (1, 1))),   # general conv: lax with float32 accumulation
])
def test_conv_matches_float64_reference(hw, k, stride, pad):
  x, w = _bf16((2,) + hw + (24,), 4), _bf16((k, k, 24, 40), 5)
  got = _precision.conv_general_dilated(
      x, w, (stride, stride), pad, dimension_numbers=lax.conv_dimension_numbers(
          x.shape, w.shape, NHWC))
  assert got.dtype == jnp.bfloat16
  ref = _conv_ref(x, w, (stride, stride), pad)
  assert got.shape == ref.shape
  _assert_one_rounding(got, ref)
  # In float32 the dot rewrites give lax's convolution (up to summation order).
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  np.testing.assert_allclose(
      _precision.conv_general_dilated(x32, w32, (stride, stride), pad,
                                      dimension_numbers=dn),
      lax.conv_general_dilated(x32, w32, (stride, stride), pad,
                               dimension_numbers=dn), rtol=1e-5, atol=1e-4)


def test_float32_modules_keep_flax_defaults():
  assert _precision.dense_kwargs(jnp.float32) == {}
  assert _precision.conv_kwargs(jnp.float32) == {}
  assert _precision.dense_kwargs(jnp.bfloat16) == {"dot_general": _precision.dot_general}
  assert _precision.is_reduced(jnp.float16) and not _precision.is_reduced(None)


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _eqns(sub)


@pytest.mark.parametrize("arch,options", [
    ("resnet50", {}), ("vit_small_patch16", {"depth": 2, "num_classes": 7})])
def test_bf16_graph_has_only_float32_accumulating_dots(arch, options):
  model = registry.create_model(arch, dtype=jnp.bfloat16, **options)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(model.apply)(variables, x).jaxpr
  dots = [e for e in _eqns(jaxpr) if e.primitive.name == "dot_general"]
  convs = [e for e in _eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
  bf16_dots = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
  assert bf16_dots and all(
      e.params["preferred_element_type"] == jnp.float32 for e in bf16_dots)
  assert all(e.params["preferred_element_type"] == jnp.float32 for e in convs)
  if arch == "resnet50":
    # 1x1 convs (36 of 53, incl. the 4 strided shortcuts) became dots; the
    # 7x7 stem and the 16 3x3 convs remain convolutions.
    assert sorted({tuple(e.invars[1].aval.shape[:2]) for e in convs}) == [(3, 3), (7, 7)]
    assert len(convs) == 17 and len(bf16_dots) == 36
  else:
    assert not convs  # the patch embedding is a dot too


def _resnet(seed):
  tmodel = torch_resnet.randomize(torch_resnet.resnet("resnet50"), seed=seed)
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  return tmodel, resnet_keys.to_flax(_family.SourceState(state), "resnet50",
                                     {"num_classes": None})


def _max_rel(got, want):
  got, want = _f64(got), _f64(want)
  return np.abs(got - want).max() / np.abs(want).max()


def test_resnet50_bf16_features_within_1e2_of_float32_and_torch():
  tmodel, variables = _resnet(seed=7)
  x = np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32)
  f32 = registry.create_model("resnet50").apply(variables, x)
  bf16 = registry.create_model("resnet50", dtype=jnp.bfloat16).apply(variables, x)
  with torch.no_grad():
    ref = tmodel.features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(f32["pre_logits"], ref, atol=1e-4, rtol=0)
  for key in ("pre_logits", "layer3_avg"):
    assert bf16[key].dtype == jnp.float32
    assert _max_rel(bf16[key], f32[key]) < FEATURE_RTOL, key
  assert _max_rel(bf16["pre_logits"], ref) < FEATURE_RTOL


def _vit(depth):
  tmodel = torch_vit.VisionTransformer(patch_size=16, width=384, depth=depth,
                                       num_heads=6).randomize_(11).eval()
  state = vit_keys.canonicalize({k: v.detach().numpy()
                                 for k, v in tmodel.state_dict().items()})
  options = dict(vit_keys.infer_options(state, "vit_small_patch16"), depth=depth)
  return tmodel, vit_keys.to_flax(state, "vit_small_patch16", options), options


def test_vit_small_bf16_features_within_1e2_of_float32_and_torch():
  tmodel, variables, options = _vit(depth=12)
  x = np.random.RandomState(5).randn(2, 48, 48, 3).astype(np.float32)
  f32 = registry.create_model("vit_small_patch16", **options).apply(variables, x)
  bf16 = registry.create_model("vit_small_patch16", **dict(options, dtype=jnp.bfloat16)
                               ).apply(variables, x)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  for key in ("pre_logits", "cls", "patch_mean", "last4_cls"):
    np.testing.assert_allclose(f32[key], ref[key].numpy(), atol=1e-4, rtol=0)
    assert bf16[key].dtype == jnp.bfloat16
    assert _max_rel(bf16[key], f32[key]) < FEATURE_RTOL, key
    assert _max_rel(bf16[key], ref[key].numpy()) < FEATURE_RTOL, key


def test_bf16_gradients_follow_float32():
  # Fine-tuning differentiates the bf16 forward: same parameter tree, finite
  # gradients pointing where the float32 ones do.
  _, variables, options = _vit(depth=2)
  x = jnp.asarray(np.random.RandomState(6).randn(2, 32, 32, 3), jnp.float32)

  def grads(dtype):
    model = registry.create_model("vit_small_patch16", **dict(options, dtype=dtype))
    loss = lambda p: jnp.sum(model.apply({"params": p}, x)["pre_logits"]
                             .astype(jnp.float32) ** 2)
    return jax.grad(loss)(variables["params"])

  g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
  assert jax.tree.structure(g32) == jax.tree.structure(g16)
  a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g32)])
  b = np.concatenate([np.ravel(np.asarray(v, np.float32)) for v in jax.tree.leaves(g16)])
  assert np.all(np.isfinite(b))
  cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  assert cosine > 0.99, cosine


def test_resnet_bf16_gradients_follow_float32():
  # Through the 1x1-as-dot and strided-shortcut rewrites: same tree, finite
  # gradients aligned with the float32 ones. (Eval-mode BatchNorm: train mode
  # on 4 random 32 px images normalises layer4 over 4 values, where bf16 and
  # float32 gradients are unrelated with the previous code as well.)
  _, variables = _resnet(seed=8)
  x = jnp.asarray(np.random.RandomState(9).randn(2, 32, 32, 3), jnp.float32)

  def grads(dtype):
    model = registry.create_model("resnet50", dtype=dtype)
    loss = lambda p: jnp.sum(model.apply(dict(variables, params=p), x)["pre_logits"] ** 2)
    return jax.grad(loss)(variables["params"])

  g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
  assert jax.tree.structure(g32) == jax.tree.structure(g16)
  a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g32)])
  b = np.concatenate([np.ravel(np.asarray(v, np.float32)) for v in jax.tree.leaves(g16)])
  assert np.all(np.isfinite(b))
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
