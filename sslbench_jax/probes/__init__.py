"""Protocols on cached features, each a module of the protocol table
(``protocols/registry.py``): a frozen ``Options`` dataclass with the paper's
defaults and ``run(train, test, options, *, mesh, context) -> ProtocolResult``.

* ``knn``: DINO's weighted cosine kNN and the Closer Look Euclidean kNN,
  memory-bounded, sharded over devices, large banks searched through a
  certified bfloat16 screen (``_knn_screen``);
* ``linear``: many linear heads (lr x wd x BN x source x optimizer) trained in
  one jitted pass, selected on held-out train;
* ``logreg``: L2 multinomial logistic regression, a C grid solved as a
  warm-started L-BFGS regularisation path (scikit-learn's objective);
* ``leastsquares``: big_vision's closed-form ridge classifier, one
  eigendecomposition for a whole l2 grid;
* ``fewshot``: class-balanced k-shot / percent-of-labels subsets, several
  tries, with the table's probes at fixed settings;
* ``heads``: ``classify`` (the backbone's logits) and ``released_head``;
* ``command``: the ``sslbench-jax probe`` subcommand (flags from the table).

Shared: ``_rows`` (input checks, result rows), ``_selection`` (held-out
splits, grid selection, ``GridResult``).
"""
