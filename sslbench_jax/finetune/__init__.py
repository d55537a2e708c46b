"""Trained protocols: augmented linear probe, full and few-shot fine-tuning.

Public surface::

  from sslbench_jax import finetune
  params = finetune.init_params("vit_base_patch16", num_classes=100)
  scales = finetune.layer_lr_scales("vit_base_patch16", params, 0.65)
  r = finetune.recipe("full", "vit", epochs=10)
  result = finetune.run(finetune.RunConfig(weights=..., dataset=..., recipe=r, workdir=...))

In the protocol table (``protocols/registry.py``): ``finetune.protocol``'s
``finetune_linear_aug``, ``finetune_full`` and ``finetune_fewshot`` (images in,
typed options whose defaults are ``recipes``'); ``evaluate`` configs use them
like any protocol.

Docs: docs/finetune.md.
"""

from sslbench_jax.finetune.model import init_params
from sslbench_jax.finetune.model import layer_lr_scales
from sslbench_jax.finetune.recipes import PROTOCOLS
from sslbench_jax.finetune.recipes import Recipe
from sslbench_jax.finetune.recipes import recipe


def __getattr__(name):
  # The loop imports orbax / the data pipeline: only load it when used.
  if name in ("run", "RunConfig"):
    from sslbench_jax.finetune import train
    return getattr(train, name)
  raise AttributeError(name)
