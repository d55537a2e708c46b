"""``sslbench-jax convert``: checkpoint file -> Flax weights (.npz + .json sidecar).

Example:
  sslbench-jax convert --checkpoint swav_800ep_pretrain.pth.tar \\
      --arch resnet50 --out weights/swav.npz

``--arch_options=key=value,key=value`` sets options of the architecture's
Flax module (the fields of ``registry.create_model(arch)``), overriding what
the converter infers from the checkpoint; each override of an inferred value
is logged, and the options used are stored in the sidecar's ``arch_options``.
Values are read as int, float, ``true``/``false``, ``none`` or else a
string. E.g. a DINO-layout ViT checkpoint whose features should be computed
at other resolutions with timm's position-embedding resize:

  sslbench-jax convert --checkpoint dino_vitbase16.pth --arch vit_base_patch16 \\
      --out dino_vitb16.npz \\
      --arch_options=pos_interp_offset=0,pos_interp_antialias=true

Prints one summary line. Bad input (including an unknown option key, listed
against the valid ones, or an item that is not ``key=value``) prints one
``error: ...`` line to stderr and exits with code 2, writing nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from sslbench_jax.backbones import registry
from sslbench_jax.convert.converter import convert_checkpoint
from sslbench_jax.convert.errors import ConversionError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  flags.DEFINE_string("checkpoint", None, "PyTorch (.pth/.pth.tar/.torch/.pt), "
                      ".safetensors or .npz checkpoint.")
  flags.DEFINE_string("arch", None, "Architecture name (backbones.registry.ARCHS).")
  flags.DEFINE_string("out", None, "Output .npz (a .json sidecar is written next to it).")
  flags.DEFINE_string("select", None, "Which backbone when the file holds several, "
                      "e.g. student, momentum_encoder, target.")
  flags.DEFINE_string("allow_missing", None, "Regex of tensor names allowed to be "
                      "absent (their weights stay randomly initialised).")
  flags.DEFINE_string("arch_options", None, "Comma-separated key=value options of "
                      "the arch's Flax module overriding the inferred ones, e.g. "
                      "pos_interp_offset=0,pos_interp_antialias=true (values: "
                      "int, float, true/false, none, else string).")
  flags.mark_flags_as_required(["checkpoint", "arch", "out"])


# Flax adds these to every module's dataclass; they are not architecture options.
_NOT_OPTIONS = ("parent", "name")
_WORDS = {"true": True, "false": False, "none": None}


def _parse_value(text: str) -> Any:
  """``text`` as int, float, bool/None (``true``/``false``/``none``) or str."""
  if text.lower() in _WORDS:
    return _WORDS[text.lower()]
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_arch_options(text: str | None, arch: str) -> dict[str, Any]:
  """Parses ``"key=value,key=value"`` into options for ``create_model(arch)``.

  Args:
    text: the ``--arch_options`` value; ``None`` or empty means no options.
    arch: a ``registry.ARCHS`` name; keys must be fields of its Flax module.

  Returns:
    ``{key: value}`` with values parsed by ``_parse_value``.

  Raises:
    ValueError: unknown arch, an item that is not ``key=value`` (or repeats a
      key), or a key that is not a field of the module (valid ones listed).
  """
  if not text:
    return {}
  valid = [f.name for f in dataclasses.fields(registry.create_model(arch))
           if f.name not in _NOT_OPTIONS]
  options: dict[str, Any] = {}
  for item in text.split(","):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not key or not value:
      raise ValueError(f"malformed --arch_options item {item!r}: expected "
                       "key=value (e.g. pos_interp_offset=0)")
    if key not in valid:
      raise ValueError(f"unknown --arch_options key {key!r} for {arch}; valid: "
                       f"{', '.join(sorted(valid))}")
    if key in options:
      raise ValueError(f"--arch_options key {key!r} is given twice")
    options[key] = _parse_value(value)
  return options


def _dropped_groups(dropped: list[str], prefix: str, limit: int = 4) -> str:
  """Dropped keys grouped where they leave the backbone's path: ``a.b.*``."""
  root = [c for c in prefix.split(".") if c]
  groups = set()
  for key in dropped:
    parts = key.split(".")
    shared = 0
    while shared < min(len(root), len(parts)) and parts[shared] == root[shared]:
      shared += 1
    groups.add(".".join(parts[:shared + 1]) + (".*" if len(parts) > shared + 1 else ""))
  groups = sorted(groups)
  more = f" +{len(groups) - limit} more" if len(groups) > limit else ""
  return ", ".join(groups[:limit]) + more


def main(argv: list[str]) -> None:
  """Runs the conversion; exit code 2 with a one-line message on bad input."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  try:
    # Checked before the checkpoint is read: a typo fails fast, writes nothing.
    options = parse_arch_options(FLAGS.arch_options, FLAGS.arch)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    _, meta = convert_checkpoint(FLAGS.checkpoint, FLAGS.arch, FLAGS.out,
                                 select=FLAGS.select,
                                 allow_missing=FLAGS.allow_missing,
                                 options=options)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  counts = meta["counts"]
  print(f"{FLAGS.out}: {meta['arch']} from {meta['source']} checkpoint "
        f"({meta['source_format']}, prefix {meta['prefix']!r}); "
        f"{counts['mapped']} tensors mapped, {counts['dropped']} dropped, "
        f"{counts['missing_allowed']} missing allowed"
        + (f" (dropped {_dropped_groups(meta['dropped_keys'], meta['prefix'])})"
           if meta["dropped_keys"] else ""))
