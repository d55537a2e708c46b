"""The feature sets of an ``evaluate`` run: made once, handed to the protocols in memory.

``FeatureSets.make(wanted, uses)`` runs the extraction plan (``plan.extraction_plan``):
decode passes shared by the models reading one split (``features.passes``;
each model's weights read once and dropped after its last pass), then the
derived sets (ImageNet-ReaL cut out of val, ``data.derived``), then whatever
could not be derived. Each set is written to ``DIR/features/<tag>.npz`` by the
writer process (the persistent copy) and kept in memory as that file reads
back, until the last step reading it has run; ``inputs(key)`` gives a step its
``protocols.base.FeatureInputs``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import ml_collections

from sslbench_jax import plan

# Feature arrays kept in memory for the protocols beyond which a set is read
# back from its file when a step needs it (the ImageNet train features of a
# study are ~10 GB per model).
IN_MEMORY_BYTES = 4 << 30


class FeatureSets:
  """The run's feature sets: made once (extraction passes, derivations), kept in memory.

  Each set is written to ``DIR/features/<tag>.npz`` (the persistent copy, by
  the writer) and kept in memory, as the file reads back, until the last step
  reading it has run (within ``IN_MEMORY_BYTES``; beyond, a step reads the
  file). Models are loaded once (``features.passes.load_model``) and dropped
  after their last pass.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               metas: dict[str, dict[str, Any]]):
    self.config = config
    self.workdir = workdir
    self.metas = metas
    self.stems = plan.run_stems(config)
    self.sets: dict[plan.FeatureKey, Any] = {}
    self.uses: dict[plan.FeatureKey, int] = {}
    self.parents: set[plan.FeatureKey] = set()  # sets a derivation still reads
    self.held = 0

  def path(self, key: plan.FeatureKey) -> str:
    return os.path.join(self.workdir, "features", f"{plan.feature_tag(key, self.stems)}.npz")

  def _arch(self, model_name: str) -> str:
    return self.metas[model_name].get("arch") or self.config.models[model_name].arch

  def make(self, wanted: list[plan.FeatureKey], uses: list[plan.FeatureKey]) -> None:
    """Makes the ``wanted`` sets: passes, then derived sets, then leftovers.

    ``uses``: the feature keys of every step to run (one entry per read).
    """
    for k in uses:
      self.uses[k] = self.uses.get(k, 0) + 1
    todo = plan.extraction_plan(self.config, wanted, self._arch)
    self.parents = {parent for _, parent in todo.derived}
    self._extract(todo.passes)
    leftover = []
    for key, parent in todo.derived:
      if not self._derive(key, parent):
        leftover.append(key)
    self.parents = set()
    per_pass = self.config.extraction.get("models_per_pass", plan.MODELS_PER_PASS)
    self._extract(plan.extraction_passes(leftover, self._arch, per_pass))
    for key in list(self.sets):  # sets only a derivation read
      if not self.uses.get(key):
        self._drop(key)

  def _extract(self, passes: list[tuple[tuple[Any, ...], list[plan.FeatureKey]]]) -> None:
    from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
    from sslbench_jax.convert import cache as convert_cache  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import passes as passes_lib  # pylint: disable=g-import-not-at-top
    ex = self.config.extraction
    last = {}  # model -> index of its last pass: each model is read from disk once
    for i, (_, group) in enumerate(passes):
      for name, _, _ in group:
        last[name] = i
    loaded: dict[str, Any] = {}
    for n, ((dataset, data_dir, split, preset), group) in enumerate(passes, 1):
      logging.info("features pass %d/%d: %s %s (%s), %d model(s) in one decode pass: %s",
                   n, len(passes), dataset, split, preset, len(group),
                   ", ".join(f"{name}/{r}" for name, _, r in group))
      for name, _, _ in group:
        if name not in loaded:
          loaded[name] = passes_lib.load_model(convert_cache.weights_path(self.workdir, name))
      s = group[0][1]
      results = passes_lib.extract_split(
          [(loaded[name], r, ex.dtype) for name, _, r in group], dataset, split, data_dir,
          s.preprocessing, cache_root=os.path.join(self.workdir, "cache"),
          batch_size_per_device=ex.batch_size_per_device,
          steps_per_shard=ex.steps_per_shard)
      for key, result in zip(group, results):
        fs = result.features
        if parallel.is_writer():
          io.save(self.path(key), fs)
          logging.info("wrote %s: %s features", self.path(key), fs.features.shape)
        self._keep(key, fs)
      # The writer writes the files; the others must not read them before they exist.
      tag = plan.feature_tag(group[0], self.stems)
      parallel.sync(f"features {tag}" + (f" +{len(group) - 1}" if len(group) > 1 else ""))
      for name in [name for name in loaded if last[name] == n - 1]:
        del loaded[name]

  def _derive(self, key: plan.FeatureKey, parent: plan.FeatureKey) -> bool:
    """Cuts ``key`` (e.g. ReaL) out of its parent set (val); False: cannot, extract."""
    from sslbench_jax import parallel  # pylint: disable=g-import-not-at-top
    from sslbench_jax.data import derived  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    _, s, _ = key
    parent_path = self.path(parent)
    fs = derived.derive_features(self._get(parent), s.dataset, s.split, data_dir=s.data_dir,
                                 parent_file=parent_path)
    if fs is None:
      return False
    if parallel.is_writer():
      io.save(self.path(key), fs)
      logging.info("wrote %s: %d %s rows of %s", self.path(key), len(fs.labels), s.dataset,
                   parent_path)
    parallel.sync(f"features {plan.feature_tag(key, self.stems)}")
    self._keep(key, fs)
    return True

  def _keep(self, key: plan.FeatureKey, fs: Any) -> None:
    """Keeps ``fs`` as its file reads back (JSON meta, str ids), if it fits."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    size = fs.features.nbytes + np.asarray(fs.labels).nbytes
    if (not self.uses.get(key) and key not in self.parents) or (
        self.held + size > IN_MEMORY_BYTES):
      return  # read from its file when (if) a step needs it
    if io.count_nonfinite_rows(fs.features):
      return  # io.load refuses these rows, naming the file: let it
    self.sets[key] = io.FeatureSet(fs.features, np.asarray(fs.labels),
                                   np.asarray(fs.ids).astype(str),
                                   json.loads(json.dumps(fs.meta, sort_keys=True)))
    self.held += size

  def _get(self, key: plan.FeatureKey) -> Any:
    from sslbench_jax.features import io  # pylint: disable=g-import-not-at-top
    if key in self.sets:
      return self.sets[key]
    return io.load(self.path(key))

  def inputs(self, key: plan.FeatureKey) -> Any:
    """A step's ``protocols.base.FeatureInputs`` for feature set ``key`` (in memory)."""
    from sslbench_jax.protocols import base  # pylint: disable=g-import-not-at-top
    fs = self._get(key)
    path = self.path(key)
    name = str(fs.meta.get("representation") or "features")
    return base.FeatureInputs({name: fs.features}, fs.labels, fs.meta, path, (path,))

  def release(self, keys: tuple[plan.FeatureKey, ...]) -> None:
    """One read of each of ``keys`` done; a set nobody reads any more is dropped."""
    for k in keys:
      self.uses[k] = self.uses.get(k, 1) - 1
      if self.uses[k] <= 0:
        self._drop(k)

  def _drop(self, key: plan.FeatureKey) -> None:
    import numpy as np  # pylint: disable=g-import-not-at-top
    fs = self.sets.pop(key, None)
    if fs is not None:
      self.held -= fs.features.nbytes + np.asarray(fs.labels).nbytes
