"""``sslbench-jax features``: images or a dataset split -> representations (.npz) and/or a cache.

Examples:
  sslbench-jax features --weights lite0.npz --images photos/ --out feats.npz
  sslbench-jax features --weights dino_vitb16.npz --dataset imagenet1k \\
      --split validation --data_dir ~/tfds --cache /cache \\
      --representation last4_cls --dtype bfloat16
  # two hosts (run on each, process_id 0 and 1; or set JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID; SLURM / Cloud TPU pods are detected):
  sslbench-jax features ... --coordinator_address host0:1234 --num_processes 2 \\
      --process_id 0

The architecture comes from the weights' sidecar (``--arch`` only checks it);
the preprocessing defaults to the architecture's. ``--out`` is written by
process 0; with ``--cache`` an interrupted run resumes where it stopped, and a
finished one is read back instead of recomputed. With several hosts the cache
directory must be on a file system they share for later single-host reads;
each host writes only its own shards.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this subcommand's absl flags."""
  _define_flags(FLAGS)


def _define_flags(fv: flags.FlagValues) -> None:
  # The one definition of the options and their defaults: default_options()
  # reads them back from a private FlagValues.
  string, integer = flags.DEFINE_string, flags.DEFINE_integer
  kw = {"flag_values": fv}
  string("weights", None, "converted weights .npz (with its .json sidecar)", **kw)
  string("arch", None, "architecture; default: the weights' sidecar", **kw)
  string("images", None, "folder of images (recursive); ids = relative paths", **kw)
  string("dataset", None, "dataset name (instead of --images)", **kw)
  string("split", None, "dataset split, with --dataset", **kw)
  string("data_dir", None, "dataset root, with --dataset", **kw)
  string("out", None, "output feature .npz (features, labels, ids, meta)", **kw)
  string("cache", None, "feature cache directory (sharded, resumable)", **kw)
  string("representation", "pre_logits",
         "model output to keep: pre_logits, cls, last4_cls, patch_mean, ...", **kw)
  string("preprocessing", None, "preprocessing preset; default: the architecture's", **kw)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype", **kw)
  integer("batch_size_per_device", 64, "images per device and step", **kw)
  integer("num_threads", None, "image decode workers (default: CPU count)", **kw)
  flags.DEFINE_enum("decode_backend", "threads", ["threads", "processes"],
                    "decode workers: threads, or forked processes writing into "
                    "shared memory (same pixels, same order)", **kw)
  integer("steps_per_shard", 16, "steps per cache shard and process", **kw)
  string("coordinator_address", None,
         "multi-host: host:port of process 0's coordinator", **kw)
  integer("num_processes", None, "multi-host: number of processes", **kw)
  integer("process_id", None, "multi-host: index of this process", **kw)
  flags.DEFINE_bool("progress", True, "show a progress bar (process 0)", **kw)


def main(argv: list[str]) -> None:
  """Runs the subcommand; bad input exits with a one-line error."""
  if len(argv) > 1:
    sys.exit(f"features: unexpected arguments {argv[1:]}")
  try:
    opts = {name: FLAGS[name].value for name in default_options()}
    # The command's own --out file records whether the run was input-bound;
    # library callers (evaluate) keep timing-free, reproducible metas.
    summary = run(dict(opts, input_stats_in_meta=True))
  except (ValueError, OSError) as e:  # bad input, unreadable / unwritable files
    msg = str(e).strip()
    sys.exit(f"features: error: {msg.splitlines()[0] if msg else type(e).__name__}")
  if summary:
    print(json.dumps(summary, sort_keys=True))


def default_options() -> dict[str, Any]:
  """The options of ``run`` (the flags, by name) with their defaults."""
  fv = flags.FlagValues()
  _define_flags(fv)
  return fv.flag_values_dict()


def run(opts: dict[str, Any]) -> dict[str, Any] | None:
  """The subcommand as a function of its options (the flags, by name).

  Returns:
    A summary dict on process 0 (None elsewhere).
  """
  return run_many([opts])[0]


# Options every model of a ``run_many`` pass must share: they define the one
# source (and its preprocessing) and how it is decoded, batched and cached.
_SHARED_OPTIONS = ("images", "dataset", "split", "data_dir", "cache",
                   "batch_size_per_device", "num_threads", "decode_backend",
                   "steps_per_shard", "progress", "coordinator_address",
                   "num_processes", "process_id")


def run_many(opts_list: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
  """``run`` for several models over one source, in one decode pass.

  Each element of ``opts_list`` holds the options of one ``run`` call: its own
  ``weights``, ``arch``, ``representation``, ``dtype``, ``out`` and
  ``preprocessing``; the source, cache and batching options
  (``_SHARED_OPTIONS``) and the effective preprocessing preset (given, or the
  architecture's) must be the same for all. The images are decoded once and
  fed to every model (``extract.extract_many``); each model gets its own cache
  entry and ``--out`` file, byte for byte what ``run`` writes for it alone.

  Returns:
    One summary per model (see ``run``) on process 0, Nones elsewhere.

  Raises:
    ValueError: no options, bad options, or options that do not share one
      source and preprocessing (the message names the option).
  """
  if not opts_list:
    raise ValueError("run_many needs the options of at least one model")
  first = opts_list[0]
  # jax.distributed must start before anything touches a backend.
  from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.initialize(first["coordinator_address"], first["num_processes"],
                      first["process_id"])
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import io as features_io  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import passes  # pylint: disable=g-import-not-at-top

  for opts in opts_list:
    _check_options(opts)
    for name in _SHARED_OPTIONS:
      if opts[name] != first[name]:
        raise ValueError(f"models of one pass must share --{name}: {first[name]!r} "
                         f"({first['weights']}) vs {opts[name]!r} ({opts['weights']})")
  models = []  # (passes.LoadedModel, preset name)
  for opts in opts_list:
    loaded = passes.load_model(opts["weights"], opts["arch"])
    preset_name = opts["preprocessing"] or registry.default_preprocessing(loaded.arch)
    if models and preset_name != models[0][1]:
      raise ValueError(f"models of one pass must share the preprocessing: {models[0][1]} "
                       f"({first['weights']}) vs {preset_name} ({opts['weights']})")
    models.append((loaded, preset_name))
  preset_name = models[0][1]

  run_options = dict(batch_size_per_device=first["batch_size_per_device"],
                     num_threads=first["num_threads"], decode_backend=first["decode_backend"],
                     steps_per_shard=first["steps_per_shard"], progress=first["progress"])
  if first["dataset"]:
    # The library call evaluate makes too: the same cache keys and metas.
    explicit = [bool(o["preprocessing"]) for o in opts_list]
    results = passes.extract_split(
        [(loaded, o["representation"], o["dtype"]) for o, (loaded, _) in zip(opts_list, models)],
        first["dataset"], first["split"], first["data_dir"],
        preset_name if any(explicit) else None, cache_root=first["cache"], **run_options)
  else:
    results = _extract_images(opts_list, [loaded for loaded, _ in models], preset_name,
                              run_options)
  if not parallel.is_writer():
    return [None] * len(opts_list)
  summaries = []
  for opts, result in zip(opts_list, results):
    fs = result.features
    if opts["out"]:
      if result.stats.input is not None and opts.get("input_stats_in_meta"):
        # Was this run input-bound? (not part of the cache entry's provenance)
        fs.meta["input_pipeline"] = dict(result.stats.input,
                                         decode_backend=opts["decode_backend"])
      features_io.save(opts["out"], fs)
      logging.info("wrote %s: %s features", opts["out"], fs.features.shape)
    summaries.append(dict(
        out=opts["out"], cache_entry=result.entry_dir,
        num_examples=int(fs.features.shape[0]), dim=int(fs.features.shape[1]),
        shards_reused=result.stats.shards_reused,
        shards_computed=result.stats.shards_computed,
        seconds=round(result.stats.seconds, 3), input_pipeline=result.stats.input))
  return summaries


def _check_options(opts: dict[str, Any]) -> None:
  """The checks of one model's options that need no file."""
  if not opts["weights"]:
    raise ValueError("--weights is required (a .npz written by `sslbench-jax convert`)")
  if bool(opts["images"]) == bool(opts["dataset"]):
    raise ValueError("give exactly one source: --images DIR or --dataset NAME --split SPLIT")
  if not opts["out"] and not opts["cache"]:
    raise ValueError("nothing to write: give --out FILE.npz and/or --cache DIR")
  if opts["dataset"] and not opts["split"]:
    raise ValueError(f"--dataset {opts['dataset']} needs --split")
  if opts["batch_size_per_device"] < 1 or opts["steps_per_shard"] < 1:
    raise ValueError("--batch_size_per_device and --steps_per_shard must be >= 1")


def _extract_images(opts_list: list[dict[str, Any]], models: list[Any], preset_name: str,
                    run_options: dict[str, Any]) -> list[Any]:
  """``extract_many`` over a folder of images (``--images``) for the loaded models."""
  from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
  from sslbench_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import extract as extract_lib  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import image_folder  # pylint: disable=g-import-not-at-top
  first = opts_list[0]
  source = image_folder.ImageFolder(first["images"])
  dataset = f"folder:{source.directory}:{source.fingerprint()}"
  specs = []
  for opts, loaded in zip(opts_list, models):
    key = cache_lib.CacheKey(
        arch=loaded.arch, arch_options=loaded.arch_options,
        weights_sha256=loaded.weights_sha256, dataset=dataset, split="",
        preprocessing=preset_name, representation=opts["representation"],
        dtype=opts["dtype"])
    if opts["cache"] and parallel.is_writer():
      # Fixing the image that stopped an earlier run changed the folder's
      # fingerprint (a new key): that run's interrupted entry is dead weight.
      for stale in cache_lib.remove_superseded(opts["cache"], key,
                                               f"folder:{source.directory}:"):
        logging.warning("feature cache: removed %s, an interrupted extraction of "
                        "an earlier state of %s", stale, source.directory)
    specs.append(extract_lib.ModelSpec(
        loaded.module, loaded.variables, opts["representation"], opts["dtype"], key,
        dict(dataset=dataset, data_dir=opts["data_dir"],
             # the released checkpoint the weights were converted from
             checkpoint_sha256=loaded.meta.get("checkpoint_sha256"),
             images=os.path.abspath(opts["images"]), source=None)))
  return extract_lib.extract_many(specs, source, preprocess.get_preset(preset_name),
                                  cache_root=first["cache"], **run_options)
