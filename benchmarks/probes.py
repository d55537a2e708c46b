"""Probe cost on cached features: ours (JAX) vs faiss / PyTorch / scikit-learn.

Run (from the repo root, bench extras installed)::

  .venv/bin/python benchmarks/probes.py            # ~5 min on 2 busy CPU cores
  .venv/bin/python benchmarks/probes.py --only knn --bank 100000 --queries 10000

Every comparison runs on the same random data in the same process; each timing
is the median of ``--repeats`` runs after one warm-up run (which also compiles
the JAX functions). The machine may be shared, so read the ratios, not the
absolute times. Prints a Markdown table for ``BENCHMARKS.md`` (## Probes).

* kNN: ``knn.classify`` (cosine, T=0.07, k=20 and k=200 from one top-200)
  vs faiss ``IndexFlatIP`` search + the same voting in NumPy, vs a PyTorch
  port of DINO's ``knn_classifier`` (query chunks, ``torch.mm``, ``topk``,
  one-hot scatter, exp(sim/T) weights); predictions are checked to agree.
* logistic regression: a warm-started L-BFGS path over a grid of C vs
  scikit-learn ``LogisticRegression(lbfgs)`` fitted once per C.
* linear probe: 64 heads in one pass vs 1 head (same data, epochs), and vs a
  PyTorch loop that trains one head at a time (timed for 1 head, x64); at a
  large head (512 -> 100) and a small one (64 -> 10).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _median_time(fn, repeats):
  fn()  # warm-up (compilation, caches)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _clustered(n, dim, classes, rng, centres=None):
  if centres is None:
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
  y = rng.integers(0, classes, n)
  return (centres[y] + 2.0 * rng.normal(size=(n, dim)).astype(np.float32)), y


def bench_knn(args, rng):
  import faiss
  import torch
  from sslbench_jax.probes import knn

  classes, ks, temp = 100, (20, 200), 0.07
  # Queries come from the same classes (centres) as the bank, as test images
  # do; each class is a unit-variance centre plus noise of std 2 per dim.
  centres = rng.normal(size=(classes, args.dim)).astype(np.float32)
  xtr, ytr = _clustered(args.bank, args.dim, classes, rng, centres)
  xte, yte = _clustered(args.queries, args.dim, classes, rng, centres)
  ntr = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
  nte = xte / np.linalg.norm(xte, axis=1, keepdims=True)
  out = {}

  def ours():
    # default: bfloat16 screening + certified float32 re-rank when the bank is
    # large enough (knn.SCREEN_MIN_ROWS_PER_CANDIDATE), else the float32 search
    out["ours"] = knn.classify(xtr, ytr, xte, classes, ks=ks, temperature=temp)

  def ours_f32():
    out["ours_f32"] = knn.classify(xtr, ytr, xte, classes, ks=ks,
                                   temperature=temp, screen=False)

  def vote(sim, idx, k):
    w = np.exp(sim[:, :k] / temp)
    scores = np.zeros((len(sim), classes), np.float32)
    np.add.at(scores, (np.arange(len(sim))[:, None], ytr[idx[:, :k]]), w)
    return scores

  def with_faiss():
    index = faiss.IndexFlatIP(args.dim)
    index.add(ntr)
    sim, idx = index.search(nte, max(ks))
    out["faiss"] = {k: vote(sim, idx, k) for k in ks}

  train_t = torch.from_numpy(ntr).t().contiguous()
  labels_t = torch.from_numpy(ytr)
  test_t = torch.from_numpy(nte)

  @torch.no_grad()
  def dino_torch():
    res = {k: [] for k in ks}
    k_max = max(ks)
    chunk = max(1, len(test_t) // 100)   # DINO: 100 chunks
    for start in range(0, len(test_t), chunk):
      feats = test_t[start:start + chunk]
      sim = torch.mm(feats, train_t)
      dist, idx = sim.topk(k_max, largest=True, sorted=True)
      neigh = labels_t[idx]
      for k in ks:
        one_hot = torch.zeros(len(feats) * k, classes)
        one_hot.scatter_(1, neigh[:, :k].reshape(-1, 1), 1)
        w = dist[:, :k].div(temp).exp()
        res[k].append(torch.sum(one_hot.view(len(feats), k, classes)
                                * w.view(len(feats), k, 1), 1))
    out["torch"] = {k: torch.cat(v).numpy() for k, v in res.items()}

  t = {name: _median_time(fn, args.repeats)
       for name, fn in (("ours", ours), ("ours_f32", ours_f32),
                        ("faiss", with_faiss), ("torch", dino_torch))}
  agree = {name: float(np.mean(out[name][200].argmax(1) == out["ours"][200].argmax(1)))
           for name in ("faiss", "torch", "ours_f32")}
  agree["top1"] = float(np.mean(out["ours"][20].argmax(1) == yte))
  return t, agree


def bench_logreg(args, rng):
  from sklearn.linear_model import LogisticRegression
  from sslbench_jax.probes import logreg

  x, y = _clustered(args.logreg_n, args.logreg_dim, 10, rng)
  x /= np.sqrt(args.logreg_dim)
  cs = np.logspace(-4, 2, args.logreg_cs)
  out = {}

  def ours():
    out["ours"] = logreg.fit(x, y, 10, cs, max_iter=1000, tol=1e-6)

  def sklearn():
    out["sk"] = [LogisticRegression(C=c, max_iter=1000, tol=1e-6).fit(x, y)
                 for c in cs]

  t = {"ours": _median_time(ours, args.repeats),
       "sklearn": _median_time(sklearn, args.repeats)}
  w, b = out["ours"]
  # signed: > 0 when our objective is higher (worse) than sklearn's
  gaps = [(logreg.objective(w[i], b[i], x, y, c)
           - logreg.objective(m.coef_.T, m.intercept_, x, y, c))
          / logreg.objective(m.coef_.T, m.intercept_, x, y, c)
          for i, (c, m) in enumerate(zip(cs, out["sk"]))]
  return t, max(gaps, key=abs)


def bench_linear(args, rng, dim, classes):
  import torch
  from sslbench_jax.probes import linear

  x, y = _clustered(args.linear_n, dim, classes, rng)
  tc = linear.TrainConfig(epochs=args.linear_epochs, batch_size=1024,
                          warmup_epochs=1, seed=0)
  lrs = np.geomspace(0.01, 3.0, 8)
  many = linear.grid(["x"], lrs, [0.0, 1e-4, 1e-3, 1e-2], [False, True])
  assert len(many) == 64
  feats = {"x": x}

  def heads(configs):
    return lambda: linear.train(feats, y, classes, configs, tc)

  xt, yt = torch.from_numpy(x), torch.from_numpy(y)

  def torch_one_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, classes)
    opt = torch.optim.SGD(head.parameters(), lr=0.4, momentum=0.9)
    for epoch in range(tc.epochs):
      order = torch.randperm(len(xt))
      for start in range(0, len(xt), tc.batch_size):
        idx = order[start:start + tc.batch_size]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx]).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()

  return {"one": _median_time(heads(many[:1]), args.repeats),
          "64": _median_time(heads(many), args.repeats),
          "torch_one": _median_time(torch_one_head, args.repeats)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bank", type=int, default=20000)
  p.add_argument("--dim", type=int, default=2048)
  p.add_argument("--queries", type=int, default=2000)
  p.add_argument("--logreg-n", type=int, default=5000)
  p.add_argument("--logreg-dim", type=int, default=256)
  p.add_argument("--logreg-cs", type=int, default=12)
  p.add_argument("--linear-n", type=int, default=10000)
  p.add_argument("--linear-dim", type=int, default=512)
  p.add_argument("--linear-epochs", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--only", choices=("all", "knn", "logreg", "linear"),
                 default="all", help="run one comparison only")
  args = p.parse_args()
  rng = np.random.default_rng(0)

  import jax
  from absl import logging
  logging.set_verbosity(logging.INFO)   # kNN logs how many queries screening certified
  print(f"jax {jax.__version__}, devices {jax.devices()}, repeats {args.repeats}")
  start = time.perf_counter()
  if args.only in ("all", "knn"):
    t, agree = bench_knn(args, rng)
    print(f"| kNN {args.bank}x{args.dim} bank, {args.queries} queries, k=20+200 "
          f"| ours {t['ours']:.2f} s (float32 search, screen=False: "
          f"{t['ours_f32']:.2f} s) | faiss IndexFlatIP {t['faiss']:.2f} s "
          f"(ours/faiss {t['ours'] / t['faiss']:.2f}x) | PyTorch DINO "
          f"{t['torch']:.2f} s (ours/torch {t['ours'] / t['torch']:.2f}x) | "
          f"argmax agreement faiss {agree['faiss']:.4f}, torch {agree['torch']:.4f}, "
          f"screen=False {agree['ours_f32']:.4f}; ours top-1 (k=20) "
          f"{100 * agree['top1']:.1f} % |")
  if args.only in ("all", "logreg"):
    t, gap = bench_logreg(args, rng)
    print(f"| logreg {args.logreg_n}x{args.logreg_dim}, 10 classes, "
          f"{args.logreg_cs} C values | ours (warm-started L-BFGS path) {t['ours']:.2f} s | "
          f"sklearn lbfgs loop {t['sklearn']:.2f} s (ours/sklearn "
          f"{t['ours'] / t['sklearn']:.2f}x) | largest rel. objective gap (ours - "
          f"sklearn) / sklearn {gap:+.1e} |")
  for dim, classes in ((args.linear_dim, 100), (64, 10)):
    if args.only not in ("all", "linear"):
      break
    t = bench_linear(args, rng, dim, classes)
    print(f"| linear {args.linear_n}x{dim}, {classes} classes, "
          f"{args.linear_epochs} epochs, bs 1024 | 1 head {t['one']:.2f} s | 64 heads "
          f"{t['64']:.2f} s (64 heads / 1 head {t['64'] / t['one']:.1f}x, per head "
          f"{t['64'] / 64 / t['one']:.3f}x) | PyTorch 1 head {t['torch_one']:.2f} s, "
          f"64 heads one at a time ~{64 * t['torch_one']:.1f} s (ours 64 / torch 64 "
          f"{t['64'] / (64 * t['torch_one']):.3f}x) |")
  print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
