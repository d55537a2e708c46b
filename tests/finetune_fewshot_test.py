"""Few-shot fine-tuning subsets: the study's rule, seeded, the probe's subsets."""

import numpy as np

from sslbench_jax.finetune import recipes
from sslbench_jax.finetune import train
from sslbench_jax.probes import fewshot


def _labels():
  rs = np.random.RandomState(0)
  return rs.permutation(np.repeat(np.arange(7), [130, 200, 150, 400, 131, 160, 140]))


def test_subset_is_class_balanced_by_the_studys_rule_and_seeded():
  y = _labels()
  for f in (0.01, 0.1):
    r = recipes.recipe("fewshot", label_fraction=f)
    idx = train.train_indices(y, 7, r)
    per_class = int(f * len(y) / 7)  # the study: int(fraction * N_train / n_classes)
    assert len(np.unique(idx)) == len(idx) == per_class * 7
    np.testing.assert_array_equal(np.bincount(y[idx], minlength=7), [per_class] * 7)
    np.testing.assert_array_equal(idx, train.train_indices(y, 7, r))
    other = train.train_indices(y, 7, recipes.recipe("fewshot", label_fraction=f,
                                                     subset_seed=43))
    assert not np.array_equal(idx, other)
    # The cached few-shot probe's subset of the same setup and seed.
    np.testing.assert_array_equal(
        idx, fewshot.sample_subset(y, 7, fraction=f, seed=r.subset_seed, trial=0))
  assert len(train.train_indices(y, 7, recipes.recipe("full"))) == len(y)


def test_fewshot_recipes_are_the_setups_of_the_csv():
  r = recipes.recipe("fewshot", "vit", label_fraction=0.01)
  assert (r.fewshot_setup, r.lr, r.head_lr, r.epochs, r.warmup_epochs) == ("byol2", 0.1, 0.1, 30, 0)
  assert (r.layer_decay, r.label_smoothing, r.drop_path) == (0.65, 0.1, 0.2)
  s = recipes.recipe("fewshot", label_fraction=0.01, fewshot_setup="swav")
  assert (s.lr, s.head_lr, s.epochs) == (0.02, 5.0, 20)
  s = recipes.recipe("fewshot", label_fraction=0.1, fewshot_setup="swav")
  assert (s.lr, s.head_lr, s.epochs) == (0.01, 0.2, 20)
  # Cosine without warm-up over the epochs (torch's CosineAnnealingLR).
  assert [round(s.lr_factor(e), 12) for e in (0, 10)] == [1.0, 0.5]
  lin = recipes.recipe("linear_aug")
  assert (lin.batch_size, lin.abs_lr(), lin.clip_norm, lin.epochs) == (1024, 0.4, 0.5, 100)
  # The study's warm-up: (e + 1) / 6 for the first 5 epochs, then cosine from 1.
  assert [lin.lr_factor(e) for e in range(6)] == [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0]
  assert 0 < lin.lr_factor(99) < 0.01


def test_backbone_batchnorm_modes():
  assert recipes.recipe("full").backbone_bn_train  # the study: train mode
  assert not recipes.recipe("full", backbone_bn="running").backbone_bn_train
  assert not recipes.recipe("linear_aug").backbone_bn_train  # frozen, eval mode
  assert recipes.recipe("linear_aug", frozen_bn="update").backbone_bn_train
