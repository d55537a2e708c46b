"""``sslbench-jax SUBCOMMAND --flags``: the one console entry point.

Each subcommand lives in its own module exposing ``define_flags()`` (absl
flags, defined only when that subcommand runs so names never clash) and
``main(argv)``.

Exit codes, the same for every subcommand (enforced here, once):

* ``0``: success.
* ``2``: bad input or usage -- an unknown or malformed flag or config key
  (including ``--config.key=value`` overrides and ``--config FILE:args``), a
  missing or unreadable-as-data input file, an output path that is a file
  where a folder is needed (or the reverse), any ``ValueError`` /
  ``FileNotFoundError`` (``ConversionError``, ``CorruptImageError``, ...),
  ``zipfile.BadZipFile`` or ``EOFError`` (a truncated file).
* ``1``: runtime failure -- the disk is full, the output is read-only or not
  writable (``OSError`` with errno ENOSPC / EDQUOT / EROFS / EACCES / EPERM),
  the workdir is locked by another run, or a crash (which keeps its
  traceback: it is a bug to report).

Every expected error is one line on stderr, ``<subcommand>: error: ...``,
naming the offending flag, key, file or path. A subcommand's ``main`` may
handle its own errors with ``sys.exit("message")``; the message is kept and
the exit code follows the exception being handled when it was called (its
``__context__``), so those modules need not know this convention.
"""

from __future__ import annotations

import errno
import importlib
import re
import sys
import zipfile
from typing import Any, Callable, NoReturn

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
    "finetune": ("sslbench_jax.finetune.command", "linear_aug / full / few-shot fine-tuning"),
}

EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT = 0, 1, 2
# Errors of the machine, not of the input: the same command may succeed later.
RESOURCE_ERRNOS = frozenset(getattr(errno, name) for name in
                            ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM")
                            if hasattr(errno, name))
# Exceptions that mean "the input is wrong" wherever they come from.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                    IsADirectoryError, zipfile.BadZipFile, EOFError, app.UsageError,
                    flags.Error)


def _usage() -> str:
  lines = ["usage: sslbench-jax SUBCOMMAND [--flags]   (--help per subcommand)", ""]
  lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
  return "\n".join(lines)


def one_line(text: str) -> str:
  """A (possibly multi-line, traceback-carrying) message as one line.

  absl wraps an exception raised while parsing a flag (e.g. ``get_config``
  rejecting an argument) into a message that embeds the traceback; the line
  that matters is its first (which flag) and its last (what was wrong).
  """
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  if not lines:
    return ""
  first, last = lines[0], lines[-1]
  if len(lines) == 1:
    return first
  last = re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", last)
  if "Traceback" in text:  # "flag --config=...: Error whilst parsing config file:"
    return f"{first.rstrip(':')}: {last}"
  return " ".join(lines)


def describe_error(e: BaseException) -> str:
  """One line for ``e``: the path and reason for OSErrors, else its message."""
  if isinstance(e, OSError) and e.strerror:
    where = e.filename if e.filename is not None else "(no file named)"
    hint = {errno.ENOSPC: " (disk full)", errno.EROFS: " (read-only file system)"}.get(
        e.errno, "")
    return f"{where}: {e.strerror}{hint}"
  if isinstance(e, KeyError) and e.args:
    return one_line(str(e.args[0]))
  return one_line(str(e)) or type(e).__name__


def exit_code(e: BaseException | None) -> int | None:
  """The convention's exit code for an exception; None: not an expected error."""
  if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
    return EXIT_RUNTIME
  if isinstance(e, BAD_INPUT_ERRORS):
    return EXIT_BAD_INPUT
  return None


def _fail(name: str, message: str, code: int) -> NoReturn:
  print(f"{name}: error: {message}", file=sys.stderr)
  sys.exit(code)


def _flags_parser(name: str) -> Callable[[list[str]], Any]:
  """absl's flag parsing with bad flags / config keys as one line, exit 2."""

  def parse(argv: list[str]) -> Any:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _fail(name, f"{one_line(str(e))} (see --help)", EXIT_BAD_INPUT)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      # A --config.a.b=value override naming a key the (locked) config lacks:
      # ml_collections raises these from inside the flag parser, traceback
      # and all. Name the override and the key (and its suggestion).
      text = str(e).encode().decode("unicode_escape")
      keys = re.findall(r"'([^'\\]+)'", text)
      overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
      named = [o for o in overrides if keys and keys[0] in o.split(".")[1:]]
      what = "--" + named[0] if named else "a --config override"
      suggestion = re.search(r'Did you mean "([^"]+)"', text)
      message = (f"{what}: unknown config key {keys[0]!r}" if keys
                 else f"{what}: {one_line(text)}")
      if suggestion:
        message += f" (did you mean {suggestion.group(1)!r}?)"
      _fail(name, message, EXIT_BAD_INPUT)

  return parse


def _guarded(name: str, main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` with the exit-code convention applied to what it raises."""

  def run_main(argv: list[str]) -> Any:
    try:
      return main(argv)
    except SystemExit as e:
      if isinstance(e.code, str):  # sys.exit("message"), maybe in an except block
        cause = e.__context__
        code = exit_code(cause)
        if code is None:
          code = EXIT_BAD_INPUT if cause is None else EXIT_RUNTIME
        message = (describe_error(cause) if isinstance(cause, OSError) and cause.strerror
                   else re.sub(rf"^(sslbench-jax )?{name}: error: |^error: ", "", e.code))
        _fail(name, one_line(message), code)
      raise
    except Exception as e:  # pylint: disable=broad-except
      code = exit_code(e)
      if code is None:
        raise  # a crash: keep the traceback (exit 1)
      _fail(name, describe_error(e), code)

  return run_main


def run(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(EXIT_OK if len(argv) >= 2 else EXIT_BAD_INPUT)
  name = argv[1]
  if name not in COMMANDS:
    print(f"unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  module = importlib.import_module(COMMANDS[name][0])
  before = set(flags.FLAGS)
  module.define_flags()
  # absl's --help lists the key flags of the main program (sys.argv[0]).
  for flag_name in set(flags.FLAGS) - before:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag_name])
  app.run(_guarded(name, module.main), argv=[f"{argv[0]} {name}"] + argv[2:],
          flags_parser=_flags_parser(name))


if __name__ == "__main__":
  run()
