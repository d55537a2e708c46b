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
        f"{counts['missing_allowed']} missing allowed")
