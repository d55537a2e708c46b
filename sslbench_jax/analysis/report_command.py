"""``sslbench-jax report --results FILE --out DIR``: Markdown + HTML report.

Same analysis as ``analyze`` (all its CSV files too), plus ``report.html``.
FILE is the CSV export or the ``.jsonl`` results store. ``--metric`` as for
``analyze`` (default ``primary`` -- each test set's main metric, ReaL's
real_top1 and R / A's subset_top1 -- when such rows are present, else
``top1``).
"""

from __future__ import annotations

from sslbench_jax.analysis import _command_common

define_flags = _command_common.define_flags
main = _command_common.make_main("report", html_too=True)
