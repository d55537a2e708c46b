"""Feature extraction of a registry dataset split for several loaded models, as a library call.

``load_model(weights_path)`` reads converted weights once (variables, sidecar,
Flax module); ``extract_split(models, dataset, split, ...)`` decodes the
split once and feeds every model (``extract.extract_many``), each with the
cache key and provenance ``sslbench-jax features --dataset`` gives it, so a
model's features and cache entry are the same whether it ran alone or with
others, from the CLI or from ``evaluate``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """Converted weights read once, ready for any number of extraction passes.

  Attributes:
    weights_path: the ``.npz`` file (messages).
    module: the Flax module (``backbones.registry.create_model``).
    variables: its variables (host arrays).
    meta: the sidecar (arch, arch_options, weights / checkpoint sha256, head).
    arch: the architecture name.
    arch_options: the module options the weights were converted with.
  """
  weights_path: str
  module: Any
  variables: Any
  meta: dict[str, Any]
  arch: str
  arch_options: dict[str, Any]

  @property
  def weights_sha256(self) -> str:
    """The weights' sha256 (sidecar; hashed from the file for old sidecars)."""
    from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
    return self.meta.get("weights_sha256") or weights.sha256_file(self.weights_path)


def load_model(weights_path: str, arch: str | None = None) -> LoadedModel:
  """Reads ``weights_path`` (+ sidecar) and builds its module.

  Args:
    weights_path: weights written by ``sslbench-jax convert``.
    arch: checked against the sidecar's; required when the sidecar has none.

  Raises:
    FileNotFoundError / ValueError: missing or inconsistent weights (named),
      an ``arch`` that is not the sidecar's.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.backbones import weights  # pylint: disable=g-import-not-at-top
  variables, meta = weights.load_variables(weights_path)
  recorded = meta.get("arch")
  if arch and recorded and arch != recorded:
    raise ValueError(f"--arch {arch} but {weights_path} holds {recorded} "
                     "(see its .json sidecar)")
  arch = arch or recorded
  if not arch:
    raise ValueError(f"{weights_path} has no arch in its sidecar; pass --arch")
  arch_options = meta.get("arch_options") or {}
  return LoadedModel(weights_path, registry.create_model(arch, **arch_options), variables,
                     meta, arch, arch_options)


def open_split(dataset: str, split: str, data_dir: str | None, preset_name: str,
               explicit: bool) -> Any:
  """One split of a ``data.registry`` dataset, preprocessed with ``preset_name``.

  ``explicit``: the user chose the preset (no warning when it is not the study's).
  """
  from sslbench_jax.data import registry as data_registry  # pylint: disable=g-import-not-at-top
  spec = data_registry.get_spec(dataset)
  if spec.preprocessing != preset_name and not explicit:
    logging.warning("%s's study preprocessing is %s; using %s (--preprocessing to "
                    "change)", dataset, spec.preprocessing, preset_name)
  return data_registry.open_dataset(dataset, split, data_dir=data_dir,
                                    preprocessing=preset_name)


def source_name(dataset: str, data_dir: str | None) -> str:
  """The cache key's dataset: the name, ``@<abs data_dir>`` when one is given
  (generic datasets, "folder" or "csv", differ only by where they live)."""
  return f"{dataset}@{os.path.abspath(data_dir)}" if data_dir else dataset


def extract_split(models: Sequence[tuple[LoadedModel, str, str]], dataset: str, split: str,
                  data_dir: str | None, preprocessing: str | None, *,
                  cache_root: str | None, batch_size_per_device: int = 64,
                  steps_per_shard: int = 16, num_threads: int | None = None,
                  decode_backend: str = "threads", progress: bool = True) -> list[Any]:
  """Features of one registry split for several models, in one decode pass.

  Args:
    models: ``(loaded model, representation, dtype)`` per feature set.
    dataset, split, data_dir: the split (``data.registry``).
    preprocessing: the preset; None: the (common) architecture default.
    cache_root: the feature cache (None: no cache).
    batch_size_per_device, steps_per_shard, num_threads, decode_backend,
      progress: as ``extract.extract_many``.

  Returns:
    One ``extract.ExtractResult`` per entry of ``models`` (the same
    ``FeatureSet`` on every process).

  Raises:
    ValueError: no models, or models whose default presets differ.
  """
  from sslbench_jax.backbones import registry  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from sslbench_jax.features import extract as extract_lib  # pylint: disable=g-import-not-at-top
  if not models:
    raise ValueError("extract_split needs at least one model")
  presets = [preprocessing or registry.default_preprocessing(m.arch) for m, _, _ in models]
  if len(set(presets)) > 1:
    raise ValueError(f"models of one pass must share the preprocessing: {presets[0]} "
                     f"({models[0][0].weights_path}) vs "
                     f"{next(p for p in presets if p != presets[0])}")
  preset_name = presets[0]
  # A data.dataset.Dataset preprocesses its images itself (no preset below).
  source = open_split(dataset, split, data_dir, preset_name, preprocessing is not None)
  described = source.describe() if hasattr(source, "describe") else None
  key_dataset = source_name(dataset, data_dir)
  specs = []
  for model, representation, dtype in models:
    key = cache_lib.CacheKey(
        arch=model.arch, arch_options=model.arch_options,
        weights_sha256=model.weights_sha256, dataset=key_dataset, split=split,
        preprocessing=preset_name, representation=representation, dtype=dtype)
    specs.append(extract_lib.ModelSpec(
        model.module, model.variables, representation, dtype, key,
        dict(dataset=dataset, data_dir=data_dir,
             # the released checkpoint the weights were converted from
             checkpoint_sha256=model.meta.get("checkpoint_sha256"), images=None,
             # label space, preprocessing detail of a registry dataset
             source=described)))
  return extract_lib.extract_many(
      specs, source, None, batch_size_per_device=batch_size_per_device,
      num_threads=num_threads, decode_backend=decode_backend, cache_root=cache_root,
      steps_per_shard=steps_per_shard, progress=progress)
