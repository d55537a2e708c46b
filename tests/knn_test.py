"""kNN probe vs DINO's formula (NumPy, written here) and scikit-learn."""

import sys
import textwrap

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from sslbench_jax.metrics import scoring
from sslbench_jax.probes import knn
import multiprocess_util


def _random(seed, n_train=600, n_test=157, dim=24, classes=9):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n_train, dim)).astype(np.float32),
          rng.integers(0, classes, n_train),
          rng.normal(size=(n_test, dim)).astype(np.float32), classes)


def _clustered(seed, n_train=700, n_test=211, dim=12, classes=6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=3.0, size=(classes, dim))
  ytr = rng.integers(0, classes, n_train)
  yte = rng.integers(0, classes, n_test)
  xtr = centres[ytr] + rng.normal(size=(n_train, dim))
  xte = centres[yte] + rng.normal(size=(n_test, dim))
  return xtr.astype(np.float32), ytr, xte.astype(np.float32), classes, yte


def _dino_reference(xtr, ytr, xte, k, classes, temperature=0.07):
  """DINO eval_knn.knn_classifier in NumPy (float64), stable top-k."""
  xtr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
  xte = xte / np.linalg.norm(xte, axis=1, keepdims=True)
  sim = xte.astype(np.float64) @ xtr.astype(np.float64).T
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  w = np.exp(np.take_along_axis(sim, idx, axis=1) / temperature)
  scores = np.zeros((len(xte), classes))
  for c in range(classes):
    scores[:, c] = np.sum(w * (ytr[idx] == c), axis=1)
  return scores


@pytest.mark.parametrize("data", ["random", "clustered"])
@pytest.mark.parametrize("screen", [False, True])
def test_cosine_matches_dino_formula(data, screen):
  xtr, ytr, xte, classes = (_random(0) if data == "random" else _clustered(1)[:4])
  ks = (1, 10, 20, 100)
  # chunk sizes that divide neither N_test nor N_train
  out = knn.classify(xtr, ytr, xte, classes, ks=ks, query_chunk=37, bank_shard=71,
                     screen=screen)
  for k in ks:
    ref = _dino_reference(xtr, ytr, xte, k, classes)
    np.testing.assert_allclose(out[k], ref, rtol=1e-4, atol=1e-6 * ref.max())
    np.testing.assert_array_equal(out[k].argmax(1), ref.argmax(1))


@pytest.mark.parametrize("data,zscore", [("random", False), ("clustered", False),
                                         ("clustered", True)])
@pytest.mark.parametrize("screen", [False, True])
def test_euclidean_matches_sklearn(data, zscore, screen):
  xtr, ytr, xte, classes = (_random(2) if data == "random" else _clustered(3)[:4])
  if zscore:  # make the dimensions' scales very different
    scale = np.geomspace(0.01, 100, xtr.shape[1]).astype(np.float32)
    xtr, xte = xtr * scale, xte * scale
  out = knn.classify(xtr, ytr, xte, classes, ks=(20, 5), metric="euclidean",
                     zscore=zscore, query_chunk=64, bank_shard=100, screen=screen)
  rtr, rte = xtr.astype(np.float64), xte.astype(np.float64)
  if zscore:
    mean, std = rtr.mean(0), rtr.std(0)
    rtr, rte = (rtr - mean) / std, (rte - mean) / std
  for k in (20, 5):
    clf = KNeighborsClassifier(n_neighbors=k, weights="distance",
                               algorithm="brute").fit(rtr, ytr)
    np.testing.assert_array_equal(out[k].argmax(1), clf.predict(rte))
    proba = out[k] / out[k].sum(1, keepdims=True)
    np.testing.assert_allclose(proba, clf.predict_proba(rte), atol=1e-4)


@pytest.mark.parametrize("screen", [False, True])
def test_zero_distance_follows_sklearn_rule(screen):
  rng = np.random.default_rng(4)
  xtr = rng.normal(size=(300, 8)).astype(np.float32)
  ytr = rng.integers(0, 5, 300)
  # train rows 10, 11 and 12 are the same point with labels 1, 2, 2
  xtr[11] = xtr[12] = xtr[10]
  ytr[10], ytr[11], ytr[12] = 1, 2, 2
  xte = np.concatenate([xtr[[10, 50, 60]], rng.normal(size=(20, 8))]).astype(np.float32)
  out = knn.classify(xtr, ytr, xte, 5, ks=(20,), metric="euclidean",
                     screen=screen, screen_candidates=24 if screen else None)[20]
  clf = KNeighborsClassifier(20, weights="distance", algorithm="brute").fit(xtr, ytr)
  np.testing.assert_array_equal(out.argmax(1), clf.predict(xte))
  np.testing.assert_allclose(out / out.sum(1, keepdims=True), clf.predict_proba(xte),
                             atol=1e-5)
  # only the exact matches vote, weight 1 each
  np.testing.assert_array_equal(out[0], [0, 1, 2, 0, 0])
  assert out[1].sum() == 1 and out[1, ytr[50]] == 1


def test_neighbour_ties_take_lower_index_first():
  rng = np.random.default_rng(5)
  xtr = rng.normal(size=(50, 6)).astype(np.float32)
  # five identical rows at indices spread over several bank shards
  for i in (3, 17, 18, 33, 49):
    xtr[i] = xtr[3]
  for metric in ("cosine", "euclidean"):
    for screen in (False, True):
      for shard in (7, 50):
        _, idx = knn.neighbours(xtr, xtr[[3]], 5, metric=metric, bank_shard=shard,
                                screen=screen,
                                screen_candidates=5 if screen else None)
        np.testing.assert_array_equal(idx[0], [3, 17, 18, 33, 49])


def test_default_shards_from_memory_budget(monkeypatch):
  # A tiny budget forces the automatic shard size to split the bank into
  # several uneven shards (600 rows, 23-query chunks -> 5 shards of 120).
  monkeypatch.setattr(knn, "SIMILARITY_BUDGET_BYTES", 4 * 23 * 130)
  xtr, ytr, xte, classes = _random(11)
  xtr[400] = xtr[7]  # a tie across shards
  xte[0] = xtr[7]
  out = knn.classify(xtr, ytr, xte, classes, ks=(1, 50), query_chunk=23)
  for k in (1, 50):
    ref = _dino_reference(xtr, ytr, xte, k, classes)
    np.testing.assert_allclose(out[k], ref, rtol=1e-4, atol=1e-6 * ref.max())
  _, idx = knn.neighbours(xtr, xte[:23], 2, query_chunk=23)
  np.testing.assert_array_equal(idx[0], [7, 400])


@pytest.mark.parametrize("screen", [False, True])
def test_k_larger_than_train_set_uses_all(screen):
  xtr, ytr, xte, classes = _random(6, n_train=30, n_test=9)
  out = knn.classify(xtr, ytr, xte, classes, ks=(30, 200), bank_shard=8,
                     screen=screen)
  np.testing.assert_allclose(out[200], out[30], rtol=1e-6)
  np.testing.assert_allclose(out[200], _dino_reference(xtr, ytr, xte, 30, classes),
                             rtol=1e-4)


def _top5(scores, labels, k=5):
  """kNN's top-k: the package's rule with classes without votes never counted."""
  return scoring.topk_correct(scores, labels, k, positive_only=True)


def test_topk_correct_ignores_unvoted_classes():
  scores = np.array([[0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # one voted class
                     [1.0, 2.0, 2.0, 0.5, 0.1, 0.2, 0.0]])
  labels = np.array([0, 6])
  # row 0: class 0 has no vote -> not a top-5 hit although only 1 class voted
  np.testing.assert_array_equal(_top5(scores, labels), [False, False])
  np.testing.assert_array_equal(_top5(scores, np.array([1, 0])), [True, True])
  # ties by lower class index: classes 1 and 2 tie, 1 ranks first
  np.testing.assert_array_equal(_top5(scores, np.array([1, 1]), k=1),
                                [True, True])
  np.testing.assert_array_equal(_top5(scores, np.array([1, 2]), k=1),
                                [True, False])
  # end to end: k=1 neighbour -> top-5 hit iff top-1 hit
  xtr, ytr, xte, classes, yte = _clustered(7)
  s = knn.classify(xtr, ytr, xte, classes, ks=(1,))[1]
  np.testing.assert_array_equal(_top5(s, yte, 5), s.argmax(1) == yte)


def test_bfloat16_bank_close_to_float32():
  xtr, ytr, xte, classes, _ = _clustered(8)
  f32 = knn.classify(xtr, ytr, xte, classes, ks=(20,))[20]
  bf16 = knn.classify(xtr, ytr, xte, classes, ks=(20,), bank_dtype="bfloat16")[20]
  assert (f32.argmax(1) == bf16.argmax(1)).mean() >= 0.97


def _exact_order(xtr, xte):
  """float64 cosine similarities and the stable descending order."""
  a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
  b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
  sim = b.astype(np.float64) @ a.astype(np.float64).T
  return sim, np.argsort(-sim, axis=1, kind="stable")


def _exact_neighbours(xtr, xte, metric):
  """float64 keys (-cosine similarity or distance) and their stable order."""
  if metric == "cosine":
    sim, order = _exact_order(xtr, xte)
    return -sim, order
  d = np.sqrt(((xte.astype(np.float64)[:, None] - xtr.astype(np.float64)[None]) ** 2).sum(-1))
  return d, np.argsort(d, axis=1, kind="stable")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_screened_search_certificate_and_fallback(caplog, metric):
  # Dense similarities (three clusters in 64-d) put many rows within the
  # bfloat16 error of the k-th neighbour, so with 3 spare candidates most
  # queries cannot be certified and are recomputed by the float32 search; with
  # 33 spare candidates all are certified.
  rng = np.random.default_rng(21)
  centres = rng.normal(size=(3, 64))
  xtr = (centres[rng.integers(0, 3, 900)] + 0.6 * rng.normal(size=(900, 64))).astype(np.float32)
  xte = (centres[rng.integers(0, 3, 120)] + 0.6 * rng.normal(size=(120, 64))).astype(np.float32)
  ref, order = _exact_neighbours(xtr, xte, metric)
  k = 15
  tol = 1e-6 * np.abs(ref).max()
  for m, shard in ((18, 128), (18, None), (48, 100)):
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
      values, idx = knn.neighbours(xtr, xte, k, metric=metric, screen=True,
                                   screen_candidates=m, bank_shard=shard,
                                   query_chunk=50)
    recomputed = int(caplog.text.split("queries; ")[1].split()[0])
    assert (recomputed > 0) == (m == 18), caplog.text
    # neighbours: the float64 order except where two keys are within float32
    # rounding of each other
    gap = np.abs(np.take_along_axis(ref, idx, 1) - np.take_along_axis(ref, order[:, :k], 1))
    assert np.all((idx == order[:, :k]) | (gap < tol))
    np.testing.assert_allclose(values if metric == "euclidean" else -values,
                               np.take_along_axis(ref, order[:, :k], 1),
                               rtol=1e-5, atol=tol)
  # the certificate itself: certified queries are the exact top-k
  from sslbench_jax.probes import _knn_screen
  xtr_n, xte_n = knn.preprocess(xtr, xte, metric=metric, zscore=False)
  mesh, bank, rows, shard = knn._place_bank(xtr_n, 128, "float32", None, 120)
  fn = _knn_screen.screened_search(mesh, 900, rows, shard, 18, k, 64, metric)
  keys, idx, certified = (np.asarray(a) for a in fn(
      bank, bank.astype("bfloat16"), _knn_screen.bank_stats(mesh)(bank),
      _knn_screen.bank_sqnorms(mesh)(bank), xte_n))
  assert 0 < certified.sum() < len(certified)
  gap = np.abs(np.take_along_axis(ref, idx, 1) - np.take_along_axis(ref, order[:, :k], 1))
  assert np.all(((idx == order[:, :k]) | (gap < tol))[certified])


def test_automatic_screening_falls_back_when_it_does_not_pay(monkeypatch, caplog):
  # screen=None screens any bank here. A bank whose rows nearly coincide puts
  # every similarity within the bfloat16 error of the k-th: the first chunk is
  # not certified, so the float32 search does the rest; a clustered bank keeps
  # the screening. The neighbours are the exact ones in both cases.
  monkeypatch.setattr(knn, "SCREEN_MIN_ROWS_PER_CANDIDATE", 1)
  rng = np.random.default_rng(22)
  centres = rng.normal(size=(4, 64))
  clustered = centres[rng.integers(0, 4, 800)] + 0.3 * rng.normal(size=(800, 64))
  crowded = centres[0] + 1e-3 * rng.normal(size=(800, 64))
  xte = (centres[rng.integers(0, 4, 90)] + 0.3 * rng.normal(size=(90, 64))).astype(np.float32)
  for xtr, switched in ((crowded, True), (clustered, False)):
    xtr = xtr.astype(np.float32)
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
      _, idx = knn.neighbours(xtr, xte, 20, query_chunk=30, screen_candidates=48)
    assert ("using the float32 search" in caplog.text) == switched, caplog.text
    assert "bfloat16 screening" in caplog.text
    sim, order = _exact_order(xtr, xte)
    gap = np.abs(np.take_along_axis(sim, idx, 1) - np.take_along_axis(sim, order[:, :20], 1))
    assert np.all((idx == order[:, :20]) | (gap < 1e-6))


@pytest.mark.parametrize("screen", [None, True])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_similarity_blocks_stay_within_the_budget_on_every_path(
    monkeypatch, caplog, screen, metric):
  # Issue 10: with a large query_chunk, the float32 search that answers the
  # queries the screen could not certify used the user's query chunk against
  # the bank split for the screen's (smaller) chunk: a (chunk, shard) block
  # far over the budget (2.8 GB peak vs 1.06 GB at 50k x 768). Every jitted
  # search call is recorded; each block must fit a small budget.
  budget = 4 * 64 * 100                  # 100 queries x 64 rows of float32
  monkeypatch.setattr(knn, "SIMILARITY_BUDGET_BYTES", budget)
  monkeypatch.setattr(knn, "SCREEN_MIN_ROWS_PER_CANDIDATE", 1)
  blocks = []

  def spy(factory, shard_arg):
    def make(*args):
      fn, shard = factory(*args), args[shard_arg]
      def call(*inputs):
        blocks.append((factory.__name__, inputs[-1].shape[0], shard))
        return fn(*inputs)
      return call
    return make

  from sslbench_jax.probes import _knn_screen
  monkeypatch.setattr(knn, "_search", spy(knn._search, 3))
  monkeypatch.setattr(_knn_screen, "screened_search",
                      spy(_knn_screen.screened_search, 3))
  # Rows that nearly coincide: no query is certified, all go to the fallback.
  rng = np.random.default_rng(5)
  xtr = (rng.normal(size=16) + 1e-3 * rng.normal(size=(400, 16))).astype(np.float32)
  xte = rng.normal(size=(300, 16)).astype(np.float32)
  with caplog.at_level("INFO", logger="absl"):
    _, idx = knn.neighbours(xtr, xte, 5, metric=metric, screen=screen,
                            query_chunk=4096, screen_candidates=8, progress=False)
  assert "_search" in {b[0] for b in blocks}, blocks  # the fallback ran
  assert "screened_search" in {b[0] for b in blocks}, blocks
  for name, queries, shard in blocks:
    assert 4 * queries * shard <= budget, (name, queries, shard)
  ref, order = _exact_neighbours(xtr, xte, metric)
  gap = np.abs(np.take_along_axis(ref, idx, 1) - np.take_along_axis(ref, order[:, :5], 1))
  assert np.all((idx == order[:, :5]) | (gap < 1e-6 * np.abs(ref).max()))


def test_query_chunk_alone_is_capped_by_the_budget(monkeypatch):
  # A budget smaller than one query chunk x one bank row: chunks shrink.
  monkeypatch.setattr(knn, "SIMILARITY_BUDGET_BYTES", 4 * 10)
  shapes = []
  search = knn._search
  monkeypatch.setattr(knn, "_search", lambda *a: (lambda bank, q: (
      shapes.append((q.shape[0], a[3])), search(*a)(bank, q))[1]))
  xtr, ytr, xte, classes = _random(3, n_train=40, n_test=35)
  out = knn.classify(xtr, ytr, xte, classes, ks=(3,), screen=False, query_chunk=64)
  assert shapes and all(4 * q * s <= 40 for q, s in shapes), shapes
  np.testing.assert_allclose(out[3], _dino_reference(xtr, ytr, xte, 3, classes),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dim", [64, 2048])
def test_screening_error_bound_holds(dim):
  # |fl32(q.x) - fl32(bf16(q).bf16(x))| <= error_bound, on random vectors and
  # on vectors whose bfloat16 rounding errors all point the same way (the
  # worst case of the Cauchy-Schwarz step), with magnitudes over many binades.
  import jax
  import jax.numpy as jnp
  from sslbench_jax.probes import _knn_screen
  rng = np.random.default_rng(dim)
  worst = np.float32(1 + 0.99 * 2.0 ** -8) * np.ones((4, dim), np.float32)
  worst *= np.float32(2.0) ** rng.integers(-20, 20, size=(4, dim)).astype(np.float32)
  rand = rng.normal(size=(60, dim)).astype(np.float32)
  rand *= np.exp(rng.normal(scale=3, size=(60, dim))).astype(np.float32)
  x = np.concatenate([worst, rand])
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  xj = jnp.asarray(x)
  s_f32 = np.asarray(jnp.dot(xj, xj.T, precision=jax.lax.Precision.HIGHEST))
  xh = xj.astype(jnp.bfloat16)
  s_b = np.asarray(jnp.einsum("qd,sd->qs", xh, xh, preferred_element_type=jnp.float32))
  mesh, bank, _, _ = knn._place_bank(x, None, "float32", None, len(x))
  stats = np.asarray(_knn_screen.bank_stats(mesh)(bank)).max(0)
  eps = np.asarray(_knn_screen.error_bound(xj, jnp.asarray(stats)))
  err = np.abs(s_f32 - s_b)
  assert np.all(err <= eps[:, None]), (err / eps[:, None]).max()
  # aligned rounding errors come close to the bound: it is not vacuous
  assert (err / eps[:, None])[:4, :4].max() > 0.3


def test_bad_inputs_raise_clear_errors():
  xtr, ytr, xte, classes = _random(9, n_train=20, n_test=3)
  with pytest.raises(ValueError, match="screen=True needs"):
    knn.classify(xtr, ytr, xte, classes, bank_dtype="bfloat16", screen=True)
  with pytest.raises(ValueError, match="screen_candidates"):
    knn.classify(xtr, ytr, xte, classes, ks=(5,), screen=True, screen_candidates=3)
  with pytest.raises(ValueError, match="metric"):
    knn.classify(xtr, ytr, xte, classes, metric="manhattan")
  with pytest.raises(ValueError, match="same D"):
    knn.classify(xtr, ytr, xte[:, :5], classes)
  with pytest.raises(ValueError, match="labels must lie"):
    knn.classify(xtr, ytr, xte, 2)


_EIGHT_DEVICES = textwrap.dedent("""
    import numpy as np, jax
    from sslbench_jax.probes import knn
    assert jax.device_count() == 8, jax.device_count()
    rng = np.random.default_rng(10)
    xtr = rng.normal(size=(203, 10)).astype(np.float32)
    xtr[150] = xtr[5]  # a cross-device tie
    ytr = rng.integers(0, 4, 203)
    xte = np.concatenate([xtr[:1], xtr[5:6], rng.normal(size=(40, 10))]).astype(np.float32)
    out = {}
    for metric in ("cosine", "euclidean"):
      for n in (1, 8):
        s = knn.classify(xtr, ytr, xte, 4, ks=(1, 20, 100), metric=metric,
                         query_chunk=13, bank_shard=9, devices=jax.devices()[:n])
        _, idx = knn.neighbours(xtr, xte, 100, metric=metric, bank_shard=9,
                                devices=jax.devices()[:n])
        out[f"{metric}{n}"] = (s, idx)
      (s1, i1), (s8, i8) = out[f"{metric}1"], out[f"{metric}8"]
      np.testing.assert_array_equal(i1, i8)
      for k in s1:
        np.testing.assert_allclose(s1[k], s8[k], rtol=1e-6)
    # bfloat16 screening: candidates from several shards and devices, the
    # certificate's bound is the max over devices
    for metric in ("cosine", "euclidean"):
      for n in (1, 8):
        v, i = knn.neighbours(xtr, xte, 5, metric=metric, bank_shard=9,
                              screen=True, screen_candidates=6,
                              devices=jax.devices()[:n])
        np.testing.assert_array_equal(i, out[f"{metric}1"][1][:, :5])
    print("OK")
""")


def test_eight_devices_equal_one_device():
  multiprocess_util.run_on_devices(_EIGHT_DEVICES, 8)


_TWO_PROCESSES = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from sslbench_jax.probes import knn
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    rng = np.random.default_rng(13)
    xtr = rng.normal(size=(203, 10)).astype(np.float32)
    xtr[150] = xtr[5]  # a tie across the two processes' halves of the bank
    ytr = rng.integers(0, 4, 203)
    xte = np.concatenate([xtr[5:6], rng.normal(size=(30, 10))]).astype(np.float32)
    for metric in ("cosine", "euclidean"):
      both = knn.classify(xtr, ytr, xte, 4, ks=(1, 20), metric=metric,
                          bank_shard=9)
      local = knn.classify(xtr, ytr, xte, 4, ks=(1, 20), metric=metric,
                           bank_shard=9, devices=jax.local_devices())
      for k in both:
        np.testing.assert_allclose(both[k], local[k], rtol=1e-6)
      _, i2 = knn.neighbours(xtr, xte, 20, metric=metric, bank_shard=9)
      _, i1 = knn.neighbours(xtr, xte, 20, metric=metric, bank_shard=9,
                             devices=jax.local_devices())
      np.testing.assert_array_equal(i2, i1)
    # bfloat16 screening across the two processes' halves of the bank
    for metric in ("cosine", "euclidean"):
      _, s2 = knn.neighbours(xtr, xte, 5, metric=metric, bank_shard=9,
                             screen=True, screen_candidates=6)
      _, s1 = knn.neighbours(xtr, xte, 5, metric=metric, bank_shard=9,
                             screen=False, devices=jax.local_devices())
      np.testing.assert_array_equal(s2, s1)
    print("OK")
""")


def test_two_processes_equal_one_process():
  multiprocess_util.run_two_processes(_TWO_PROCESSES)
