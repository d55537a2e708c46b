"""Analysis of results across models: aggregates, correlations, ranks, report.

Data flow: results CSV/JSONL -> ``table.load_results`` -> ``summary.analyze``
-> ``summary.write_tables`` / ``report.write_report``. Maths lives in
``stats`` (NumPy), name matching in ``names``, published numbers in
``baselines``.
"""

from sslbench_jax.analysis.aggregates import aggregate_matrix
from sslbench_jax.analysis.aggregates import rank_changes
from sslbench_jax.analysis.baselines import compare as compare_with_published
from sslbench_jax.analysis.baselines import load_baselines
from sslbench_jax.analysis.names import canonical_dataset
from sslbench_jax.analysis.names import parse_model_name
from sslbench_jax.analysis.summary import analyze
from sslbench_jax.analysis.summary import write_tables
from sslbench_jax.analysis.table import load_results
from sslbench_jax.analysis.table import ResultsTable

__all__ = ["ResultsTable", "aggregate_matrix", "analyze",
           "canonical_dataset", "compare_with_published", "load_baselines",
           "load_results", "parse_model_name", "rank_changes", "write_tables"]
