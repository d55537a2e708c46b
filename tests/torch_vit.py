"""A timm-structured Vision Transformer in plain PyTorch (test/benchmark reference).

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``,
``cls_token``, ``reg_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.ls1.gamma``,
``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``, ``blocks.N.ls2.gamma``, ``norm``,
``fc_norm``). With ``rel_pos_bias=True`` the attention is BEiT's (timm
``Beit`` names): ``attn.qkv`` without bias plus ``attn.q_bias``/``attn.v_bias``,
``attn.relative_position_bias_table`` and the ``relative_position_index``
buffer; there is no absolute ``pos_embed``.

Written independently of the Flax model: position embeddings are resized with
``F.interpolate(mode="bicubic", align_corners=False)``, by DINO's
``scale_factor=(h + 0.1) / g`` (``pos_interp_offset``) or, with offset 0, by
``size=``; BEiT bias tables by ``size=``; registers follow
DINOv2 (inserted after CLS, after the position embedding is added).

``pos_resize`` replaces that with one of the per-source functions below
(``dino_interpolate_pos_encoding``, ``mae_interpolate_pos_embed``,
``timm_resample_abs_pos_embed``), each a transcription of the
``F.interpolate`` call in that source's own code.

Import from tests with ``import torch_vit`` (pytest puts tests/ on sys.path),
from benchmarks with ``sys.path.insert(0, "tests")``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _interp(grid: torch.Tensor, size: tuple[int, int],
            offset: float = 0.0) -> torch.Tensor:
  """(C, h, w) -> (C, *size): DINO's scale-factor bicubic, or size-based if offset=0."""
  if tuple(grid.shape[-2:]) == tuple(size):
    return grid
  if not offset:
    return F.interpolate(grid[None], size=size, mode="bicubic",
                         align_corners=False, antialias=False)[0]
  h, w = grid.shape[-2:]
  out = F.interpolate(grid[None], mode="bicubic", align_corners=False,
                      scale_factor=((size[0] + offset) / h, (size[1] + offset) / w))[0]
  assert tuple(out.shape[-2:]) == tuple(size), out.shape
  return out


def _split(pos_embed):
  """(1, 1 + M*M, D) -> CLS row (1, 1, D), patch grid (1, D, M, M)."""
  n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
  m = int(math.sqrt(n))
  return pos_embed[:, :1], pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)


def _join(cls_pos, grid):
  return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], 1)


def dino_interpolate_pos_encoding(pos_embed, grid):
  """DINO / iBOT / DINOv2 (no registers) ``interpolate_pos_encoding``."""
  n = pos_embed.shape[1] - 1
  if grid[0] * grid[1] == n and grid[0] == grid[1]:
    return pos_embed
  cls_pos, patch = _split(pos_embed)
  w0, h0 = grid[0] + 0.1, grid[1] + 0.1
  m = math.sqrt(n)
  patch = F.interpolate(patch, scale_factor=(w0 / m, h0 / m), mode="bicubic")
  assert int(w0) == patch.shape[-2] and int(h0) == patch.shape[-1]
  return _join(cls_pos, patch)


def mae_interpolate_pos_embed(pos_embed, grid):
  """MAE ``util.pos_embed.interpolate_pos_embed`` (BEiT, MMPretrain alike)."""
  cls_pos, patch = _split(pos_embed)
  if tuple(patch.shape[-2:]) == tuple(grid):
    return pos_embed
  patch = F.interpolate(patch, size=tuple(grid), mode="bicubic",
                        align_corners=False)
  return _join(cls_pos, patch)


def timm_resample_abs_pos_embed(pos_embed, grid):
  """timm ``resample_abs_pos_embed`` with its defaults (also DINOv2-reg)."""
  n = pos_embed.shape[1] - 1
  if grid[0] * grid[1] == n and grid[0] == grid[1]:
    return pos_embed
  cls_pos, patch = _split(pos_embed.float())
  patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", antialias=True)
  return _join(cls_pos, patch)


def beit_relative_position_index(gh: int, gw: int) -> torch.Tensor:
  coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw),
                                      indexing="ij"))
  flat = torch.flatten(coords, 1)
  rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
  rel[:, :, 0] += gh - 1
  rel[:, :, 1] += gw - 1
  rel[:, :, 0] *= 2 * gw - 1
  num = (2 * gh - 1) * (2 * gw - 1) + 3
  index = torch.zeros((gh * gw + 1,) * 2, dtype=torch.long)
  index[1:, 1:] = rel.sum(-1)
  index[0, 0:] = num - 3
  index[0:, 0] = num - 2
  index[0, 0] = num - 1
  return index


class PatchEmbed(nn.Module):

  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim, heads, qkv_bias=True, rel_grid=None):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.rel_grid = rel_grid
    if rel_grid is None:
      self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    else:
      self.qkv = nn.Linear(dim, 3 * dim, bias=False)
      self.q_bias = nn.Parameter(torch.zeros(dim))
      self.v_bias = nn.Parameter(torch.zeros(dim))
      gh, gw = rel_grid
      self.relative_position_bias_table = nn.Parameter(
          torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, heads))
      self.register_buffer("relative_position_index",
                           beit_relative_position_index(gh, gw), persistent=True)
    self.proj = nn.Linear(dim, dim)

  def _rel_bias(self, grid):
    table = self.relative_position_bias_table
    gh, gw = self.rel_grid
    if tuple(grid) == (gh, gw):
      index = self.relative_position_index
    else:
      main = table[:-3].reshape(2 * gh - 1, 2 * gw - 1, -1).permute(2, 0, 1)
      main = _interp(main, (2 * grid[0] - 1, 2 * grid[1] - 1))
      table = torch.cat([main.permute(1, 2, 0).reshape(-1, self.heads),
                         table[-3:]])
      index = beit_relative_position_index(*grid)
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

  def forward(self, x, grid):
    b, n, c = x.shape
    if self.rel_grid is None:
      qkv = self.qkv(x)
    else:
      bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
      qkv = F.linear(x, self.qkv.weight, bias)
    qkv = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if self.rel_grid is not None:
      attn = attn + self._rel_bias(grid)[None]
    attn = attn.softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):

  def __init__(self, dim, init):
    super().__init__()
    self.gamma = nn.Parameter(init * torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, heads, mlp_ratio, qkv_bias, layerscale, rel_grid, eps):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.attn = Attention(dim, heads, qkv_bias, rel_grid)
    self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()

  def forward(self, x, grid):
    x = x + self.ls1(self.attn(self.norm1(x), grid))
    return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
  """timm-named ViT; ``forward`` returns the same dict as the Flax model."""

  def __init__(self, patch_size=16, width=384, depth=12, num_heads=6,
               mlp_ratio=4.0, qkv_bias=True, layerscale=None, num_registers=0,
               pool="cls", rel_pos_bias=False, img_size=224, ln_eps=1e-6,
               pos_interp_offset=0.1, pos_resize=None):
    super().__init__()
    self.pos_interp_offset = pos_interp_offset
    self.pos_resize = pos_resize
    self.patch, self.pool, self.num_registers = patch_size, pool, num_registers
    self.grid = img_size // patch_size
    self.patch_embed = PatchEmbed(patch_size, width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    if num_registers:
      self.reg_token = nn.Parameter(torch.zeros(1, num_registers, width))
    self.pos_embed = (None if rel_pos_bias else
                      nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, width)))
    rel_grid = (self.grid, self.grid) if rel_pos_bias else None
    self.blocks = nn.ModuleList(
        Block(width, num_heads, mlp_ratio, qkv_bias, layerscale, rel_grid, ln_eps)
        for _ in range(depth))
    if pool == "mean":
      self.fc_norm = nn.LayerNorm(width, eps=ln_eps)
    else:
      self.norm = nn.LayerNorm(width, eps=ln_eps)

  def randomize_(self, seed: int = 0) -> "VisionTransformer":
    """Fills every parameter with noise at a trained network's scale.

    Weights get std 1/sqrt(fan_in) (activations stay O(1) at any width),
    biases/tokens/tables std 0.2, LayerNorm scales 1 + N(0, 0.2^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("weight") and p.ndim >= 2:
          p.copy_(noise / p[0].numel() ** 0.5)
        elif name.endswith("weight") and "norm" in name:
          p.copy_(1.0 + 0.2 * noise)
        else:
          p.copy_(0.2 * noise)
    return self

  def forward(self, images_nchw):
    b, _, h, w = images_nchw.shape
    grid = (h // self.patch, w // self.patch)
    x = self.patch_embed(images_nchw)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
    if self.pos_embed is not None and self.pos_resize is not None:
      x = x + self.pos_resize(self.pos_embed, grid)
    elif self.pos_embed is not None:
      width = x.shape[-1]
      patch_pos = self.pos_embed[0, 1:].reshape(self.grid, self.grid, width)
      patch_pos = _interp(patch_pos.permute(2, 0, 1), grid,
                          self.pos_interp_offset).permute(1, 2, 0)
      x = x + torch.cat([self.pos_embed[0, :1], patch_pos.reshape(-1, width)])[None]
    if self.num_registers:
      x = torch.cat([x[:, :1], self.reg_token.expand(b, -1, -1), x[:, 1:]], 1)
    cls_per_block = []
    for blk in self.blocks:
      x = blk(x, grid)
      cls_per_block.append(x[:, 0])
    first = 1 + self.num_registers
    if self.pool == "mean":
      norm = self.fc_norm
      patch_mean = norm(x[:, first:].mean(1))
      cls = norm(x[:, 0])
      pre_logits = patch_mean
    else:
      norm = self.norm
      xn = norm(x)
      cls = xn[:, 0]
      patch_mean = xn[:, first:].mean(1)
      pre_logits = cls
    last4 = torch.cat([norm(c) for c in cls_per_block[-4:]], -1)
    return {"pre_logits": pre_logits, "cls": cls, "patch_mean": patch_mean,
            "last4_cls": last4}
