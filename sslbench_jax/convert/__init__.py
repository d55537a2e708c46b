"""Checkpoint conversion: PyTorch/safetensors/npz files -> Flax variables.

Public surface: ``convert_checkpoint`` and ``ConversionError``. Family key
maps implement the protocol documented in ``convert/_family.py``.
"""

from sslbench_jax.convert.converter import convert_checkpoint
from sslbench_jax.convert.errors import ConversionError

__all__ = ["convert_checkpoint", "ConversionError"]
