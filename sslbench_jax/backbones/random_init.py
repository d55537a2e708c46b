"""Randomly initialised backbones: the floor baseline of a comparison.

``checkpoint="random:<seed>"`` in an evaluate config (or ``write`` here)
produces a weights ``.npz`` + sidecar exactly like ``sslbench-jax convert``
does, from the module's own Flax initialisers seeded with ``seed``, instead of
from a released checkpoint. The sidecar's provenance says so: ``source`` =
``"random_init seed=<seed>"``, ``source_format`` = ``"random_init"``,
``checkpoint`` = ``"random:<seed>"``; there is no released checkpoint, so
``checkpoint_sha256`` is absent and results carry the weights' own sha256.
BatchNorm statistics keep their initial values (mean 0, variance 1).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sslbench_jax.backbones import registry
from sslbench_jax.backbones import weights

PREFIX = "random:"


def parse_seed(spec: str) -> int | None:
  """``"random:<seed>"`` -> seed (int >= 0); None for any other checkpoint spec.

  Raises:
    ValueError: ``random:`` followed by something that is not a seed.
  """
  if not spec.startswith(PREFIX):
    return None
  text = spec[len(PREFIX):]
  if not text.isdigit():
    raise ValueError(f"checkpoint {spec!r}: random:<seed> needs a non-negative integer seed")
  return int(text)


def provenance(arch: str, seed: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
  """The sidecar metadata of ``write(arch, seed, ...)`` (without the weights hash)."""
  # As the JSON sidecar holds them (tuples become lists), so is_current compares like with like.
  options = json.loads(json.dumps(dict(options or {})))
  return {"arch": arch, "arch_options": options,
          "source_format": "random_init", "source": f"random_init seed={seed}",
          "checkpoint": f"{PREFIX}{seed}", "seed": int(seed)}


def init_variables(arch: str, seed: int, options: dict[str, Any] | None = None) -> Any:
  """Flax variables of ``create_model(arch, **options)`` from ``PRNGKey(seed)`` (NumPy)."""
  model = registry.create_model(arch, **(options or {}))
  # The init input size only matters where parameter shapes depend on it
  # (the ViT position-embedding grid is fixed by its img_size).
  size = int(getattr(model, "img_size", 224))
  example = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(lambda key: model.init(key, example, train=False))(
      jax.random.PRNGKey(seed))
  return jax.tree_util.tree_map(np.asarray, dict(variables))


def write(arch: str, seed: int, out: str, options: dict[str, Any] | None = None
          ) -> dict[str, Any]:
  """Writes randomly initialised ``arch`` weights to ``out`` (npz + sidecar).

  Args:
    arch: one of ``registry.ARCHS``.
    seed: the ``jax.random.PRNGKey`` seed.
    out: the ``.npz`` path (its ``.json`` sidecar is written next to it).
    options: ``registry.create_model`` options.

  Returns:
    The sidecar metadata as written.
  """
  meta = provenance(arch, seed, options)
  weights.save_variables(out, init_variables(arch, seed, options), meta)
  _, written = weights.load_variables(out)
  return written


def is_current(meta: dict[str, Any], arch: str, seed: int,
               options: dict[str, Any] | None = None) -> bool:
  """Whether sidecar ``meta`` describes exactly ``write(arch, seed, options)``."""
  want = provenance(arch, seed, options)
  return all(meta.get(k) == v for k, v in want.items())
