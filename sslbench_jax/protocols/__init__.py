"""Evaluation protocols: one interface (``base``), one table (``registry``).

``from sslbench_jax.protocols import registry``; ``registry.get("knn").run(
train, test, options, mesh=None, context=base.RunContext(...))``. The
package imports only ``base`` eagerly, so protocol modules may import it.
"""

from sslbench_jax.protocols.base import (FeatureInputs, ImageInputs, Protocol,
                                         ProtocolResult, RunContext,
                                         load_features, option)

__all__ = ["FeatureInputs", "ImageInputs", "Protocol", "ProtocolResult",
           "RunContext", "load_features", "option"]
