"""``sslbench-jax convert``: checkpoint file -> Flax weights (.npz + .json sidecar).

Example:
  sslbench-jax convert --checkpoint swav_800ep_pretrain.pth.tar \\
      --arch resnet50 --out weights/swav.npz

Prints one summary line. Bad input prints one ``error: ...`` line to stderr
and exits with code 2, writing nothing.
"""

from __future__ import annotations

import sys

from absl import flags

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
  flags.mark_flags_as_required(["checkpoint", "arch", "out"])


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
    _, meta = convert_checkpoint(FLAGS.checkpoint, FLAGS.arch, FLAGS.out,
                                 select=FLAGS.select,
                                 allow_missing=FLAGS.allow_missing)
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
