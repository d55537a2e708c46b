"""Datasets, torchvision-exact preprocessing, label spaces and sharded input.

Public surface (batches are made by their consumers: ``features/_pipeline.py``
for extraction, ``finetune/input.py`` for training with ``augment.py``)::

  from sslbench_jax import data
  ds = data.open_dataset("cifar100", "test", data_dir=...)   # registry.py
  fn = data.get_preset("imagenet_bicubic")                    # preprocess.py
  plan = data.shard_plan(len(ds), global_batch=256)           # sharding.py
"""

from sslbench_jax.data.augment import make_train_augment
from sslbench_jax.data.dataset import Dataset
from sslbench_jax.data.label_spaces import LabelSpace
from sslbench_jax.data.preprocess import PRESETS
from sslbench_jax.data.preprocess import describe
from sslbench_jax.data.preprocess import get_preset
from sslbench_jax.data.preprocess import make_preset
from sslbench_jax.data.registry import DATASETS
from sslbench_jax.data.registry import get_spec
from sslbench_jax.data.registry import open_dataset
from sslbench_jax.data.sharding import shard_plan
