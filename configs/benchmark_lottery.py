"""The "SSL Benchmark Lottery on ImageNet" study: 12 ResNet-50 frameworks, val and variants.

Do ImageNet-val gains carry over to ReaL, v2, R, Sketch and A? The 12
frameworks' official ResNet-50 releases (``RELEASES``: the file each
framework's README links, its format, and the linear head it releases where
it does), each probed with the standard linear recipe (the "Closer Look"
study's: ``closer_look.protocols``' ``linear`` and ``linear_bn``, SGD
momentum 0.9, lr 0.4 = 0.1 x 1024/256, batch 1024, 100 epochs, 5 warm-up +
cosine, clip 0.5, without / with BatchNorm before the head) trained once on
ImageNet-1k train features, plus ``released_head`` (the framework's own
released ImageNet classifier on the same features) where one exists. Every
probe is tested on ImageNet val, ReaL, v2, R, Sketch and A, each in its own
label space (as configs/imagenet_variants.py). The report's benchmark-lottery
section gives models x test sets, ranks and rank changes from val, the rank
correlation of the val ranking with each variant's, and the rankings by
size-weighted mean and geometric mean (``report/aggregates.csv``, suite
``imagenet_variants``) next to the val ranking. Model names carry the
framework version and epochs (``names.parse_model_name``), so the report's
published-baseline comparison finds each framework's published number.

  sslbench-jax evaluate --workdir runs/benchmark_lottery \\
      --config configs/benchmark_lottery.py:checkpoints=/ckpt,data_dir=/data/tfds

Arguments: checkpoints=DIR (required; the files named in ``RELEASES``, under
their ``file`` names), data_dir=DIR (TFDS data dir holding imagenet2012 and
the variants, or the ImageNet folder root), models=a+b (subset of
``RELEASES``), variants=a+b (subset of imagenet_real, imagenet_v2,
imagenet_r, imagenet_sketch, imagenet_a; val is always tested), v2_dir,
r_dir, sketch_dir, a_dir (roots of variants kept as folders; default
data_dir), heads=false (leave the released heads out).

Formats (docs/convert.md has how each is read and which test proves it):
PyTorch zip for most; BYOL's ``pretrain_res50x1.pkl`` is a dill/Haiku pickle
(read inertly; its ``classifier`` is the released head, detected); SimCLR
v2's ``r50_1x_sk0`` is a TensorFlow bundle (pass the ``.index``; its
``head_supervised`` is the released head, detected) whose network takes
[0, 1] pixels: that model gets ``preprocessing="no_norm"`` (resize 256,
crop 224, no mean/std), every other model ImageNet's ``imagenet_bilinear``.

sha256: none of these releases publishes a checksum, so ``RELEASES`` has
``sha256=None`` everywhere; every result row carries the sha256 of the file
actually used (``checkpoint_sha256``, and ``hparams.head_sha256`` for a
released head), which is the provenance to compare runs by.

Not confirmed: which SimCLR version and which epochs of MoCo / SwAV /
DeepCluster-v2 the study used (the most-cited releases are listed); the
TensorFlow checkpoint step in SimCLR v2's file name; local file names that
differ from the release's (two frameworks name their file ``resnet50.pth``,
SimSiam's linear checkpoint is ``model_best.pth.tar``): ``release`` gives the
released path, ``file`` the name this config expects in checkpoints=DIR.
"""

import ml_collections

from sslbench_jax import studies
from sslbench_jax.config_utils import parse_arg
from sslbench_jax.config_utils import parse_bool


# model name -> dict(file, release, format, sha256, head, head_release, select, preprocessing)
# ``head``: a separate released linear-head file (convert --head), "detected"
# when the checkpoint carries its classifier itself, or None.
RELEASES = {
    "deepcluster_v2_800ep_rn50": dict(
        file="deepclusterv2_800ep_pretrain.pth.tar",
        release="facebookresearch/swav: deepclusterv2_800ep_pretrain.pth.tar",
        format="torch_zip", sha256=None, head=None),
    "sela_v2_400ep_rn50": dict(
        file="selav2_400ep_pretrain.pth.tar",
        release="facebookresearch/swav: selav2_400ep_pretrain.pth.tar",
        format="torch_zip", sha256=None, head=None),
    "swav_800ep_rn50": dict(
        file="swav_800ep_pretrain.pth.tar",
        release="facebookresearch/swav: swav_800ep_pretrain.pth.tar",
        format="torch_zip", sha256=None, head="swav_800ep_eval_linear.pth.tar",
        head_release="facebookresearch/swav: swav_800ep_eval_linear.pth.tar"),
    "simclr_v2_rn50": dict(
        file="r50_1x_sk0/model.ckpt-250228.index",
        release="google-research/simclr: simclrv2/pretrained/r50_1x_sk0/model.ckpt-250228",
        format="tf_bundle", sha256=None, head="detected", preprocessing="no_norm"),
    "moco_v2_800ep_rn50": dict(
        file="moco_v2_800ep_pretrain.pth.tar",
        release="facebookresearch/moco: moco_v2_800ep_pretrain.pth.tar",
        format="torch_zip", sha256=None, head=None),
    "pcl_v2_200ep_rn50": dict(
        file="PCL_v2_epoch200.pth.tar",
        release="salesforce/PCL: PCL_v2_epoch200.pth.tar",
        format="torch_zip", sha256=None, head=None),
    "byol_rn50": dict(
        file="pretrain_res50x1.pkl",
        release="deepmind-research/byol: pretrain_res50x1.pkl",
        format="haiku_pickle", sha256=None, head="detected"),
    "simsiam_100ep_rn50": dict(
        file="checkpoint_0099.pth.tar",
        release="facebookresearch/simsiam: 100ep/pretrain/checkpoint_0099.pth.tar",
        format="torch_zip", sha256=None, head="simsiam_100ep_linear_model_best.pth.tar",
        head_release="facebookresearch/simsiam: 100ep/linear/model_best.pth.tar "
                     "(main_lincls.py: whole ResNet-50 with module.fc)"),
    "obow_200ep_rn50": dict(
        file="tochvision_resnet50_student_K8192_epoch200.pth.tar",
        release="valeoai/obow: tochvision_resnet50_student_K8192_epoch200.pth.tar",
        format="torch_zip", sha256=None, head=None),
    "dino_rn50": dict(
        file="dino_resnet50_pretrain.pth",
        release="facebookresearch/dino: dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        format="torch_zip", sha256=None, head="dino_resnet50_linearweights.pth",
        head_release="facebookresearch/dino: dino_resnet50_pretrain/"
                     "dino_resnet50_linearweights.pth"),
    "barlowtwins_1000ep_rn50": dict(
        file="barlowtwins_resnet50.pth",
        release="facebookresearch/barlowtwins: ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/"
                "resnet50.pth",
        format="torch_zip", sha256=None, head=None),
    "vicreg_1000ep_rn50": dict(
        file="vicreg_resnet50.pth",
        release="facebookresearch/vicreg: resnet50.pth",
        format="torch_zip", sha256=None, head=None),
}

# The linear recipe's protocols of closer_look.protocols, plus the released heads.
LINEAR_PROTOCOLS = ("linear", "linear_bn")


def get_config(arg=None):
  arg = parse_arg(arg, checkpoints="", data_dir="", models="", variants="",
                  v2_dir="", r_dir="", sketch_dir="", a_dir="", heads="true")
  if not arg.checkpoints:
    raise ValueError("configs/benchmark_lottery.py needs checkpoints=DIR (the released "
                     "checkpoint files named in RELEASES)")
  heads = parse_bool(arg.heads, "heads")
  names = studies.subset(arg.models, RELEASES, "models")
  variants = studies.subset(arg.variants, studies.IMAGENET_VARIANTS, "variants")

  c = ml_collections.ConfigDict()
  c.seed = 0
  train = dict(dataset="imagenet1k", train_split="train", data_dir=arg.data_dir or None,
               preprocessing="imagenet_bilinear")
  c.datasets = {"imagenet": dict(train, test_split="validation", test_dataset=None,
                                 test_data_dir=None)}
  for name in variants:
    dataset, split, dir_arg = studies.IMAGENET_VARIANTS[name]
    c.datasets[name] = dict(train, test_dataset=dataset, test_split=split,
                            test_data_dir=(arg[dir_arg] if dir_arg else None) or None)
  every = list(c.datasets)
  study = studies.closer_look_protocols(every)
  protocols = {k: study[k] for k in LINEAR_PROTOCOLS}
  with_head = [n for n in names if heads and RELEASES[n]["head"]]
  if with_head:
    protocols["released_head"] = dict(type="released_head", datasets=every)
  c.protocols = protocols

  models = {}
  for name in names:
    r = RELEASES[name]
    head = r["head"] if heads and r["head"] not in (None, "detected") else None
    models[name] = dict(
        arch="resnet50", checkpoint=f"{arg.checkpoints}/{r['file']}",
        select=r.get("select"), allow_missing=None, options={},
        head=f"{arg.checkpoints}/{head}" if head else None,
        preprocessing=r.get("preprocessing"),
        protocols=None if name in with_head else list(LINEAR_PROTOCOLS))
  c.models = models
  c.extraction = dict(representation="pre_logits", dtype="float32",
                      batch_size_per_device=128, steps_per_shard=16)
  c.analysis = dict(n_boot=2000, n_perm=2000)
  return c
