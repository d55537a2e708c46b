"""``sslbench-jax SUBCOMMAND --flags``: the one console entry point.

Each subcommand lives in its own module exposing ``define_flags()`` (absl
flags, defined only when that subcommand runs so names never clash) and
``main(argv)``. absl parses the flags, so grain workers see them parsed.
"""

from __future__ import annotations

import importlib
import sys

from absl import app
from absl import flags

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("sslbench_jax.convert.command",
                "PyTorch/safetensors/npz checkpoint -> Flax weights (.npz + .json)"),
    "features": ("sslbench_jax.features.command",
                 "extract representations of images / a dataset split"),
    "probe": ("sslbench_jax.probes.command",
              "kNN / linear / logreg / few-shot probes on cached features"),
    "analyze": ("sslbench_jax.analysis.analyze_command",
                "aggregates, correlations, rank changes from a results CSV"),
    "report": ("sslbench_jax.analysis.report_command",
               "Markdown/HTML report with plots from a results CSV"),
    "evaluate": ("sslbench_jax.evaluate",
                 "the main job: a whole evaluation from a config file"),
}


def _usage() -> str:
  lines = ["usage: sslbench-jax SUBCOMMAND [--flags]   (--help per subcommand)", ""]
  lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
  return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    print(f"unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(COMMANDS[name][0])
  before = set(flags.FLAGS)
  module.define_flags()
  # absl's --help lists the key flags of the main program (sys.argv[0]).
  for name in set(flags.FLAGS) - before:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(module.main, argv=[f"{argv[0]} {name}"] + argv[2:])


if __name__ == "__main__":
  run()
