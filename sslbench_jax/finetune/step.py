"""The jitted, data-parallel train and eval steps.

Arrays are laid out on ``parallel.make_mesh``'s mesh over every device of
every process: the state (float32 parameters, optimizer state, BatchNorm
statistics) is replicated, or with ``param_sharding="fsdp"`` split over
``parallel.MODEL_AXIS`` (``fsdp_spec``: each device of a model-axis group
holds a 1/k slice of every large leaf; XLA gathers what a layer needs), and
the global batch is sharded over ``parallel.DATA_AXIS``. Under
``jax.jit`` the model sees the *global* batch, so BatchNorm's batch mean and
variance are global-batch statistics (cross-replica / SyncBN) and the
gradient is the global-batch gradient: results do not depend on the device
count. Images cross to the device as uint8 and are normalised there; the
backbone computes in ``dtype`` (bfloat16 optional), the head's logits and the
loss in float32.

Gradient accumulation (``recipe.accum_steps = A``) splits the global batch
into A micro-batches (rows ``a, a + A, a + 2A, ...``, so each spans all
devices), averages their gradients and threads BatchNorm statistics through
them in order, as a PyTorch loop that calls ``backward`` A times would.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sslbench_jax import parallel
from sslbench_jax.finetune import model as model_lib
from sslbench_jax.finetune.recipes import Recipe
from sslbench_jax.metrics import accuracy

State = dict[str, Any]


PARAM_SHARDINGS = ("replicated", "fsdp")


def fsdp_spec(shape: tuple[int, ...], model_shards: int) -> P:
  """How a state leaf of ``shape`` is laid out over ``parallel.MODEL_AXIS``.

  FSDP-style: a leaf of >= 2 dimensions is split along its largest dimension
  that ``model_shards`` divides (the last such one on ties), so each device of
  a model-axis group holds ``1 / model_shards`` of it; scalars, vectors (biases,
  norms, BatchNorm statistics) and leaves with no divisible dimension stay
  replicated. ``model_shards == 1``: everything replicated.
  """
  if model_shards < 2 or len(shape) < 2:
    return P()
  best = None
  for i, n in enumerate(shape):
    if n % model_shards == 0 and (best is None or n >= shape[best]):
      best = i
  if best is None:
    return P()
  return P(*[parallel.MODEL_AXIS if i == best else None for i in range(len(shape))])


def split_trainable(recipe: Recipe, params: dict[str, Any]) -> tuple[dict, dict]:
  """(trainable, frozen) parameter trees of the protocol."""
  if recipe.trains_backbone:
    return dict(params), {}
  return ({k: v for k, v in params.items() if k != "backbone"},
          {"backbone": params["backbone"]})


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           smoothing: float) -> jax.Array:
  """Mean float32 CE against ``(1 - s) onehot + s / C`` (torch's label_smoothing)."""
  logits = logits.astype(jnp.float32)
  c = logits.shape[-1]
  target = optax.smooth_labels(jax.nn.one_hot(labels, c, dtype=jnp.float32), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, target))


class Steps:
  """The jitted steps of one (model, recipe, optimizer, mesh).

  Attributes:
    train: ``(state, images_u8, labels) -> (state, loss)``.
    eval_hits: ``(state, (images_u8, labels)) -> (B, 2) int32`` per-row top-1 /
      top-5 hits (``parallel.predict``'s apply_fn: pad + mask outside).
  """

  def __init__(self, model: model_lib.Classifier, recipe: Recipe,
               tx: optax.GradientTransformation, mesh: Mesh,
               mean: tuple[float, ...], std: tuple[float, ...],
               compute_dtype: Any = jnp.float32, param_sharding: str = "replicated"):
    if param_sharding not in PARAM_SHARDINGS:
      raise ValueError(f"param_sharding {param_sharding!r}; known: "
                       f"{', '.join(PARAM_SHARDINGS)}")
    self.model_shards = mesh.shape[parallel.MODEL_AXIS] if param_sharding == "fsdp" else 1
    if param_sharding == "fsdp" and self.model_shards < 2:
      raise ValueError("param_sharding=fsdp needs a mesh whose model axis has >= 2 "
                       f"devices (got {dict(mesh.shape)}; model_axis_size)")
    self.model, self.recipe, self.tx, self.mesh = model, recipe, tx, mesh
    self.param_sharding = param_sharding
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.dtype = compute_dtype
    self.replicated = NamedSharding(mesh, P())
    self.data = parallel.batch_sharding(mesh)
    self.state_sharding: Any = None  # set by init_state (it needs the shapes)
    self.train: Callable[..., Any] | None = None

  def _compile_train(self, state_sharding: Any) -> None:
    self.state_sharding = state_sharding
    self.train = jax.jit(self._train, in_shardings=(state_sharding, self.data, self.data),
                         out_shardings=(state_sharding, self.replicated),
                         donate_argnums=(0,))

  # -- state -----------------------------------------------------------------

  def init_state(self, variables: dict[str, Any]) -> State:
    """The train state from float32 ``variables``, placed on the mesh.

    Replicated, or (``param_sharding="fsdp"``) every leaf laid out by
    ``fsdp_spec`` over the model axis: parameters, frozen parameters and
    optimizer state alike. Also compiles ``train`` for that layout.
    """
    trainable, frozen = split_trainable(self.recipe, variables["params"])
    state = {"step": jnp.zeros([], jnp.int32), "params": trainable, "frozen": frozen,
             "batch_stats": variables.get("batch_stats", {}),
             "opt_state": self.tx.init(trainable)}
    # Through the host: the train step donates the state, which must never
    # alias the caller's arrays. Every process holds the whole host value.
    state = jax.device_get(state)
    shardings = jax.tree.map(
        lambda v: NamedSharding(self.mesh, fsdp_spec(np.shape(v), self.model_shards)),
        state)
    self._compile_train(shardings)
    return jax.tree.map(
        lambda v, sh: jax.make_array_from_callback(
            np.shape(v), sh, lambda idx, v=np.asarray(v): v[idx]), state, shardings)

  @staticmethod
  def variables(state: State) -> dict[str, Any]:
    out = {"params": {**state["frozen"], **state["params"]}}
    if state["batch_stats"]:
      out["batch_stats"] = state["batch_stats"]
    return out

  def _normalize(self, images: jax.Array) -> jax.Array:
    x = (images.astype(jnp.float32) / jnp.float32(255.0) - self.mean) / self.std
    return x.astype(self.dtype)

  # -- train -----------------------------------------------------------------

  def _loss(self, trainable, frozen, batch_stats, images, labels, rng):
    r = self.recipe
    variables = {"params": {**frozen, **trainable}}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    backbone_train = r.backbone_bn_train
    logits, new = self.model.apply(
        variables, self._normalize(images), train=True,
        backbone_train=backbone_train, freeze_backbone=not r.trains_backbone,
        rngs={"dropout": rng}, mutable=["batch_stats"] if batch_stats else [])
    loss = smoothed_cross_entropy(logits, labels, r.label_smoothing)
    return loss, new.get("batch_stats", batch_stats)

  def _train(self, state: State, images: jax.Array, labels: jax.Array):
    r = self.recipe
    rng = jax.random.fold_in(jax.random.PRNGKey(r.seed), state["step"])
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    if r.accum_steps == 1:
      (loss, stats), grads = grad_fn(state["params"], state["frozen"],
                                     state["batch_stats"], images, labels, rng)
    else:
      a = r.accum_steps
      def micro(x):
        x = x.reshape((x.shape[0] // a, a) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, P(None, parallel.DATA_AXIS)))
      def body(carry, inputs):
        stats, gsum, lsum = carry
        i, x, y = inputs
        (l, stats), g = grad_fn(state["params"], state["frozen"], stats, x, y,
                                jax.random.fold_in(rng, i))
        return (stats, jax.tree.map(jnp.add, gsum, g), lsum + l), None
      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      (stats, gsum, lsum), _ = jax.lax.scan(
          body, (state["batch_stats"], zeros, jnp.zeros([], jnp.float32)),
          (jnp.arange(a), micro(images), micro(labels)))
      grads = jax.tree.map(lambda g: g / a, gsum)
      loss = lsum / a
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return ({"step": state["step"] + 1, "params": params, "frozen": state["frozen"],
             "batch_stats": stats, "opt_state": opt_state}, loss)

  # -- eval ------------------------------------------------------------------

  def eval_hits(self, state: State, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """(B, 2) int32: whether each row's label is the top-1 / among the top-5 classes."""
    images, labels = batch
    logits = self.model.apply(self.variables(state), self._normalize(images),
                              train=False).astype(jnp.float32)
    hit = accuracy.ranked_hits(logits, labels, 5)
    return jnp.stack([hit[:, 0], jnp.any(hit, axis=1)], axis=1).astype(jnp.int32)
