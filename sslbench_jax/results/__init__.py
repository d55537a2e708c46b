"""The results store (JSON lines, atomic appends) and its exports."""

from sslbench_jax.results.store import append_results
from sslbench_jax.results.store import COLUMNS
from sslbench_jax.results.store import export_csv
from sslbench_jax.results.store import export_parquet
from sslbench_jax.results.store import find_duplicates
from sslbench_jax.results.store import read_results
from sslbench_jax.results.store import ResultsStoreWarning

__all__ = ["COLUMNS", "ResultsStoreWarning", "append_results", "export_csv",
           "export_parquet", "find_duplicates", "read_results"]
