"""``sslbench-jax convert``: checkpoint file -> Flax weights (.npz + .json sidecar).

Example:
  sslbench-jax convert --checkpoint swav_800ep_pretrain.pth.tar \\
      --arch resnet50 --out weights/swav.npz

``--arch_options=key=value,key=value`` sets options of the architecture's
Flax module (the fields of ``registry.create_model(arch)``), overriding what
the converter infers from the checkpoint; each override of an inferred value
is logged, and the options used are stored in the sidecar's ``arch_options``.
Values are read as int, float, ``true``/``false``, ``none`` or else a
string, and must then match the type of the module field (an int is accepted
for a float field; ``none`` only for an optional one; ``dtype`` takes
``float32``, ``bfloat16`` or ``float16``); string fields the module checks
against a fixed set (ResNet ``block``, ViT ``pool``) take only those values.
E.g. a DINO-layout ViT checkpoint whose features should be computed
at other resolutions with timm's position-embedding resize:

  sslbench-jax convert --checkpoint dino_vitbase16.pth --arch vit_base_patch16 \\
      --out dino_vitb16.npz \\
      --arch_options=pos_interp_offset=0,pos_interp_antialias=true

Tensors holding NaN/Inf are refused (named, exit 2) unless
``--allow_nonfinite``; the names are then recorded in the sidecar's
``nonfinite_tensors``.

Prints one summary line. Bad input (including an unknown option key, listed
against the valid ones, an item that is not ``key=value``, or a value of the
wrong type for its key, and an unsafe or oversized checkpoint) prints one
``error: ...`` line to stderr and exits with code 2, writing nothing. An
output that cannot be written (read-only folder, disk full) prints one line
and exits with code 1, leaving nothing that reads as finished weights.
"""

from __future__ import annotations

import sys

from absl import flags

# The option checks live in convert/arch_options.py (evaluate's config check
# uses them too); the private names stay importable here for the tests.
from sslbench_jax.convert.arch_options import _coerce  # pylint: disable=unused-import
from sslbench_jax.convert.arch_options import _describe  # pylint: disable=unused-import
from sslbench_jax.convert.arch_options import _MISMATCH  # pylint: disable=unused-import
from sslbench_jax.convert.arch_options import _settable  # pylint: disable=unused-import
from sslbench_jax.convert.arch_options import parse_arch_options
from sslbench_jax.convert.converter import convert_checkpoint
from sslbench_jax.convert.errors import ConversionError
from sslbench_jax.convert.errors import OutputError

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
                      "int, float, true/false, none, else string; each must "
                      "match the type of its field).")
  flags.DEFINE_boolean("allow_nonfinite", False, "Convert even if tensors hold "
                       "NaN/Inf (listed in the sidecar); by default that is an "
                       "error naming them.")
  flags.DEFINE_string("head", None, "A released linear-head file (DINO "
                      "*_linearweights.pth, SwAV *_eval_linear.pth.tar, MoCo "
                      "lincls, ...) stored with the weights for the released_head "
                      "protocol (docs/convert.md).")
  flags.DEFINE_string("head_representation", "pre_logits", "The model output the "
                      "head applies to (its size must be the head's input size).")
  flags.DEFINE_boolean("detect_head", True, "Without --head, store a 1000-class "
                       "linear head the checkpoint itself carries.")
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
    # Checked before the checkpoint is read: a typo fails fast, writes nothing.
    options = parse_arch_options(FLAGS.arch_options, FLAGS.arch)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    _, meta = convert_checkpoint(FLAGS.checkpoint, FLAGS.arch, FLAGS.out,
                                 select=FLAGS.select,
                                 allow_missing=FLAGS.allow_missing,
                                 options=options,
                                 allow_nonfinite=FLAGS.allow_nonfinite,
                                 head=FLAGS.head,
                                 head_representation=FLAGS.head_representation,
                                 detect_head=FLAGS.detect_head)
  except (ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OutputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  counts = meta["counts"]
  print(f"{FLAGS.out}: {meta['arch']} from {meta['source']} checkpoint "
        f"({meta['source_format']}, prefix {meta['prefix']!r}); "
        f"{counts['mapped']} tensors mapped, {counts['dropped']} dropped, "
        f"{counts['missing_allowed']} missing allowed"
        + (f" (dropped {_dropped_groups(meta['dropped_keys'], meta['prefix'])})"
           if meta["dropped_keys"] else "")
        + (f"; released head {meta['released_head']['weight_key']} "
           f"({meta['released_head']['num_classes']} classes on "
           f"{meta['released_head']['representation']})"
           if meta.get("released_head") else ""))
