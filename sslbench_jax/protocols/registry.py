"""The protocol table: every evaluation protocol, by name, once.

Adding a protocol = one module (a frozen ``Options`` dataclass with the
recipe's defaults, ``run(train, test, options, *, mesh, context)``, and a
``PROTOCOL = base.Protocol(...)``) + one line in ``_MODULES`` below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Iterable, Mapping

from sslbench_jax.protocols import _fields
from sslbench_jax.protocols.base import Protocol

# module path, attribute holding its ``Protocol`` -- the table, in order.
_MODULES = (
    ("sslbench_jax.probes.heads", "CLASSIFY"),
    ("sslbench_jax.probes.heads", "RELEASED_HEAD"),
    ("sslbench_jax.probes.knn", "PROTOCOL"),
    ("sslbench_jax.probes.linear", "PROTOCOL"),
    ("sslbench_jax.probes.logreg", "PROTOCOL"),
    ("sslbench_jax.probes.leastsquares", "PROTOCOL"),
    ("sslbench_jax.probes.fewshot", "PROTOCOL"),
    ("sslbench_jax.finetune.protocol", "LINEAR_AUG"),
    ("sslbench_jax.finetune.protocol", "FULL"),
    ("sslbench_jax.finetune.protocol", "FEWSHOT"),
)


def _load() -> dict[str, Protocol]:
  table = {}
  for module, attr in _MODULES:
    p = getattr(importlib.import_module(module), attr)
    if p.name in table:
      raise RuntimeError(f"protocol {p.name!r} registered twice")
    table[p.name] = p
  return table


PROTOCOLS: dict[str, Protocol] = _load()


def names(consumes: str | Iterable[str] | None = None) -> tuple[str, ...]:
  """Protocol names in table order (only those consuming ``consumes``)."""
  if isinstance(consumes, str):
    consumes = (consumes,)
  return tuple(n for n, p in PROTOCOLS.items()
               if consumes is None or p.consumes in consumes)


def get(name: str) -> Protocol:
  """The protocol called ``name``; ValueError listing the valid names."""
  try:
    return PROTOCOLS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}"
                     ) from None


def fields(name_or_options: Any) -> tuple[_fields.FieldSpec, ...]:
  """The option fields (name, kind, default, help, rules) of a protocol
  (by name), an options type or an options object."""
  if isinstance(name_or_options, str):
    cls = get(name_or_options).options
  elif isinstance(name_or_options, type):
    cls = name_or_options
  else:
    cls = type(name_or_options)
  return _fields.specs(cls)


def options_from_mapping(name: str, mapping: Mapping[str, Any] | None,
                         where: str = "options") -> Any:
  """Typed options of protocol ``name`` from a mapping (a config entry).

  Missing keys take the recipe's defaults. Values must be typed (numbers,
  booleans, strings, lists of them; integers are accepted for floats);
  command-line strings are not parsed here (``_fields.parse`` does that).

  Raises:
    ValueError: one line naming ``where.key``: an unknown key (with the valid
      keys), a wrong type, a value out of range or not among the choices.
  """
  cls = get(name).options
  specs = {s.name: s for s in _fields.specs(cls)}
  mapping = dict(mapping or {})
  unknown = sorted(set(mapping) - set(specs))
  if unknown:
    raise ValueError(f"{where}.{unknown[0]}: unknown option of protocol {name} "
                     f"(valid: {', '.join(specs) or 'none'})")
  values = {k: _fields.coerce(specs[k], v, f"{where}.{k}") for k, v in mapping.items()}
  return cls(**values)


def options_to_hparams(options: Any) -> dict[str, Any]:
  """Every option's value, JSON-ready (tuples as lists), in field order.

  ``options_from_mapping(name, options_to_hparams(o)) == o``.
  """
  return {f.name: (list(v) if isinstance(v, tuple) else v)
          for f in dataclasses.fields(options)
          for v in (getattr(options, f.name),)}
