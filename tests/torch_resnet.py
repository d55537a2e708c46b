"""A torchvision-structured ResNet in plain PyTorch: the reference for parity tests.

torchvision is not installable here, so this re-implements its layout (v1.5
bottleneck, module and parameter names identical to ``torchvision.models.
resnet``) with a ``width_multiplier`` applied to every width including the
stem, as SwAV's ``resnet50w2``. Used by tests and benchmarks only.
"""

from __future__ import annotations

import torch
from torch import nn

_ARCHS = {
    "resnet18": ((2, 2, 2, 2), "basic", 1),
    "resnet34": ((3, 4, 6, 3), "basic", 1),
    "resnet50": ((3, 4, 6, 3), "bottleneck", 1),
    "resnet101": ((3, 4, 23, 3), "bottleneck", 1),
    "resnet152": ((3, 8, 36, 3), "bottleneck", 1),
    "resnet50x2": ((3, 4, 6, 3), "bottleneck", 2),
    "resnet50x4": ((3, 4, 6, 3), "bottleneck", 4),
}


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + identity)


class ResNet(nn.Module):
  """torchvision ResNet; ``forward`` returns the pooled features (or logits)."""

  def __init__(self, stage_sizes, block: str, width_multiplier: int = 1,
               num_classes: int | None = None):
    super().__init__()
    block_cls = Bottleneck if block == "bottleneck" else BasicBlock
    base = 64 * width_multiplier
    self.inplanes = base
    self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(base)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for i, n in enumerate(stage_sizes):
      setattr(self, f"layer{i + 1}",
              self._make_layer(block_cls, base * 2 ** i, n, 1 if i == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = (nn.Linear(self.inplanes, num_classes) if num_classes
               else nn.Identity())

  def _make_layer(self, block_cls, planes: int, blocks: int, stride: int):
    downsample = None
    if stride != 1 or self.inplanes != planes * block_cls.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block_cls.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block_cls.expansion))
    layers = [block_cls(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block_cls.expansion
    layers += [block_cls(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def features(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.features(x))


def resnet(arch: str, num_classes: int | None = None) -> ResNet:
  """Builds ``arch`` (e.g. ``"resnet50x2"``) with torch's default init."""
  stages, block, width = _ARCHS[arch]
  return ResNet(stages, block, width, num_classes)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights AND non-trivial BatchNorm statistics/affine, eval mode.

  The default init (unit scale, zero mean) would hide a swapped mean/var or a
  dropped BN; weights are shrunk so deep nets keep O(1) activations.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(7)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
        m.bias.copy_(0.1 * torch.randn(m.out_features, generator=g))
  return model.eval()
