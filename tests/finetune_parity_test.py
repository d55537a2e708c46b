"""The JAX train step vs a PyTorch loop of the same recipe, written here.

Same init (the Flax init copied into the PyTorch reference modules of
tests/torch_resnet.py and tests/torch_vit.py), same uint8 batches (the
augmentation is fixed: the batches are given), same recipe: torch.optim SGD /
AdamW with one param group per (learning rate, weight decay), an epoch-wise
LambdaLR, CrossEntropyLoss(label_smoothing), clip_grad_norm_. The 20 losses
and the final parameters agree to 1e-4 (relative).

Learning rates are kept where the training is not chaotic: at larger ones
(SGD lr 2.0 here) float32 rounding alone is amplified step by step, and a
float32 PyTorch run departs from a float64 one by 4e-4 (relative loss) at
step 19 just as JAX's does; at the rates below the two PyTorch runs agree to
1e-6. AdamW cases use eps 1e-5 (both sides) for the same reason: with 1e-8
Adam's sign-like update turns rounding noise in near-zero gradient elements
into O(lr) parameter differences.
"""

import math
import re

import jax
import numpy as np
import pytest
import torch
from torch import nn

import torch_resnet
import torch_vit
from sslbench_jax import parallel
from sslbench_jax.finetune import model as model_lib
from sslbench_jax.finetune import optim
from sslbench_jax.finetune import recipes
from sslbench_jax.finetune import step as step_lib

STEPS, SPE, B, C, S = 20, 4, 8, 5, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIT = dict(patch_size=8, width=32, depth=2, num_heads=2, img_size=S)
RESNET = dict(stage_sizes=(1, 1))


class TorchClassifier(nn.Module):

  def __init__(self, backbone, dim, head_bn):
    super().__init__()
    self.backbone = backbone
    self.head_bn = nn.BatchNorm1d(dim) if head_bn else None
    self.head = nn.Linear(dim, C)

  def forward(self, x):
    f = self.backbone(x)
    f = f["pre_logits"] if isinstance(f, dict) else f
    return self.head(f if self.head_bn is None else self.head_bn(f))


def _torch_name(flax_path):
  parts = []
  for p in flax_path:
    p = re.sub(r"^(blocks|layer\d)_(\d+)$", r"\1.\2", p)
    p = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
         "patch_embed": "patch_embed.proj", "kernel": "weight", "scale": "weight",
         "mean": "running_mean", "var": "running_var"}.get(p, p)
    parts.append(p)
  return ".".join(parts)


def _to_torch(v):
  v = np.asarray(v)
  if v.ndim == 4:
    v = v.transpose(3, 2, 0, 1)
  elif v.ndim == 2:
    v = v.T
  return torch.from_numpy(np.array(v))


def _flat(tree):
  return {tuple(str(getattr(k, "key", k)) for k in p): v
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _load(tmodel, variables):
  sd = tmodel.state_dict()
  seen = set()
  for col in ("params", "batch_stats"):
    for path, v in _flat(variables.get(col, {})).items():
      name = _torch_name(path)
      assert name in sd, name
      t = _to_torch(v)
      assert sd[name].shape == t.shape, (name, sd[name].shape, t.shape)
      sd[name].copy_(t)
      seen.add(name)
  missing = {k for k in sd if k not in seen and not k.endswith("num_batches_tracked")}
  assert not missing, missing


def _layer_scale(name, decay, depth, vit):
  # The study's rule, written from vitb16_layerwise_lr_scales.csv.
  if not vit:
    return 1.0
  m = re.match(r"backbone\.blocks\.(\d+)\.", name)
  if m:
    layer = int(m.group(1)) + 1
  elif re.match(r"backbone\.(patch_embed|cls_token|pos_embed)", name):
    layer = 0
  else:
    layer = depth + 1
  return decay ** (depth + 1 - layer)


def _torch_loop(tmodel, r, batches, vit, depth):
  groups = {}
  for name, p in tmodel.named_parameters():
    if not r.trains_backbone and name.startswith("backbone."):
      p.requires_grad_(False)
      continue
    head = name.startswith("head")
    base = (r.head_lr if head and r.head_lr else r.lr) * r.batch_size / 256
    lr = base * _layer_scale(name, r.layer_decay, depth, vit)
    no_wd = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
    wd = 0.0 if no_wd else r.weight_decay
    groups.setdefault((lr, wd), []).append(p)
  pg = [dict(params=ps, lr=lr, weight_decay=wd) for (lr, wd), ps in groups.items()]
  if r.optimizer == "sgd":
    opt = torch.optim.SGD(pg, lr=0.1, momentum=r.momentum)
  else:
    opt = torch.optim.AdamW(pg, lr=0.1, betas=r.betas, eps=r.eps)
  w, e_total = r.warmup_epochs, r.epochs
  def factor(e):
    if e < w:
      return (e + 1) / (w + 1)
    if w:
      return 0.5 * (1 + math.cos(math.pi * (e - w) / (e_total - w + 1)))
    return 0.5 * (1 + math.cos(math.pi * e / e_total))
  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
  tmodel.train()
  if not r.trains_backbone and r.frozen_bn == "eval":
    tmodel.backbone.eval()
  mean = torch.tensor(MEAN).view(1, 3, 1, 1)
  std = torch.tensor(STD).view(1, 3, 1, 1)
  losses = []
  trainable = [p for p in tmodel.parameters() if p.requires_grad]
  for i, (x, y) in enumerate(batches):
    xt = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    loss = loss_fn(tmodel(xt), torch.from_numpy(y).long())
    opt.zero_grad()
    loss.backward()
    if r.clip_norm is not None:
      torch.nn.utils.clip_grad_norm_(trainable, r.clip_norm)
    opt.step()
    losses.append(loss.item())
    if (i + 1) % SPE == 0:
      sched.step()
  return losses


CASES = {
    "resnet_full_sgd_bn_head": ("resnet18", dict(
        protocol="full", optimizer="sgd", lr=0.2, weight_decay=1e-3, head_bn=True,
        label_smoothing=0.1)),
    "resnet_linear_aug_bn_update": ("resnet18", dict(
        protocol="linear_aug", lr=4.0, head_bn=True, frozen_bn="update")),
    "resnet_linear_aug_bn_eval": ("resnet18", dict(
        protocol="linear_aug", lr=4.0, label_smoothing=0.1)),
    "resnet_full_adamw": ("resnet18", dict(
        protocol="full", optimizer="adamw", lr=0.005, weight_decay=0.05,
        label_smoothing=0.1, eps=1e-5)),
    "vit_full_adamw_layer_decay": ("vit_small_patch16", dict(
        protocol="full", optimizer="adamw", lr=0.05, weight_decay=0.05,
        layer_decay=0.65, label_smoothing=0.1, eps=1e-5)),
    "vit_fewshot_sgd_head_lr": ("vit_small_patch16", dict(
        protocol="fewshot", optimizer="sgd", lr=1.0, head_lr=8.0, warmup_epochs=0,
        layer_decay=0.75, label_smoothing=0.1, weight_decay=1e-3,
        label_fraction=0.1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_twenty_steps_match_pytorch(case):
  arch, overrides = CASES[case]
  r = recipes.Recipe(**{"epochs": 5, "batch_size": B, "warmup_epochs": 2,
                        "clip_norm": 0.5, **overrides})
  vit = arch.startswith("vit")
  options = VIT if vit else RESNET
  model = model_lib.build(arch, C, head_bn=r.head_bn, arch_options=options)
  variables = jax.device_get(model_lib.init_variables(model, seed=1))
  if not vit:  # non-trivial running statistics (they matter in "eval" mode)
    rs = np.random.RandomState(5)
    variables["batch_stats"] = jax.tree.map(
        lambda v: (0.1 * rs.randn(*v.shape) + (v > 0.5)).astype(np.float32),
        variables["batch_stats"])
  if vit:
    tb = torch_vit.VisionTransformer(**VIT)
  else:
    tb = torch_resnet.ResNet((1, 1), "basic")
    tb.forward = lambda x: torch.flatten(tb.avgpool(tb.layer2(tb.layer1(
        tb.maxpool(tb.relu(tb.bn1(tb.conv1(x))))))), 1)
  dim = 32 if vit else 128
  tmodel = TorchClassifier(tb, dim, r.head_bn)
  _load(tmodel, variables)

  rs = np.random.RandomState(0)
  batches = [(rs.randint(0, 256, (B, S, S, 3)).astype(np.uint8),
              rs.randint(0, C, B).astype(np.int32)) for _ in range(STEPS)]
  torch_losses = _torch_loop(tmodel, r, batches, vit, VIT["depth"])

  mesh = parallel.make_mesh()
  trainable, _ = step_lib.split_trainable(r, variables["params"])
  tx = optim.make_optimizer(r, arch, trainable, SPE)
  steps = step_lib.Steps(model, r, tx, mesh, MEAN, STD)
  state = steps.init_state(variables)
  losses = []
  for x, y in batches:
    state, loss = steps.train(state, x, y)
    losses.append(float(loss))
  np.testing.assert_allclose(losses, torch_losses, rtol=1e-4)
  assert losses[-1] != losses[0]

  sd = tmodel.state_dict()
  final = jax.device_get(steps.variables(state))
  moved = 0
  for path, v in _flat(final["params"]).items():
    ref = sd[_torch_name(path)].numpy()
    got = _to_torch(v).numpy()
    # 1e-4 relative; the 1e-6 floor covers leaves still near zero (BatchNorm
    # biases at ~1e-5 whose gradients are sums that cancel).
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6, err_msg=str(path))
    moved += not np.allclose(got, _to_torch(_flat(variables["params"])[path]).numpy())
  assert moved > 0
  for path, v in _flat(final.get("batch_stats", {})).items():
    if path[-1] == "mean":  # torch's running_var uses the unbiased variance
      ref = sd[_torch_name(path)].numpy()
      np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-5, err_msg=str(path))
