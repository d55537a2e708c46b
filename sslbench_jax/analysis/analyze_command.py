"""``sslbench-jax analyze --results FILE.csv --out DIR``.

Writes ``aggregates.csv`` (column ``suite``: ``benchmark`` = ImageNet val +
transfer datasets, ``imagenet_variants`` = val + every ImageNet variant
present), ``correlations.csv`` (val vs each variant included), ``correlations_grouped.csv``,
``correlation_matrix_{pearson,spearman,kendall}.csv``, ``predictors.csv``, ``bn_effect.csv``,
``rank_changes.csv``, ``published_comparison.csv``, ``plots/*.png`` and
``report.md`` into DIR. FILE is the CSV export or the ``.jsonl`` results store.

``--metric`` picks the metric compared across test sets. ``--metric primary``
uses each test set's main metric (as ``results.store.primary_mask`` selects
it): ``real_top1`` for ImageNet-ReaL, ``subset_top1`` for ImageNet-R / -A
(their ``top1`` is over all 1000 classes), ``top1`` for ImageNet val and the
other datasets; so the rank changes on the ImageNet variants use the numbers
each variant's protocol defines. It is the default when the results contain
``real_top1`` or ``subset_top1`` rows; otherwise the default is ``top1``.
"""

from __future__ import annotations

from sslbench_jax.analysis import _command_common

define_flags = _command_common.define_flags
main = _command_common.make_main("analyze", html_too=False)
