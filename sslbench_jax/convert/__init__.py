"""Checkpoint conversion: PyTorch/safetensors/npz files -> Flax variables.

Public surface: ``convert_checkpoint``, ``ConversionError`` (bad input, exit
2) and ``OutputError`` (output not writable, exit 1). Family key
maps implement the protocol documented in ``convert/_family.py``.
"""

from sslbench_jax.convert.converter import convert_checkpoint
from sslbench_jax.convert.errors import ConversionError
from sslbench_jax.convert.errors import OutputError

__all__ = ["convert_checkpoint", "ConversionError", "OutputError"]
