"""One jitted train step: weighted next-token cross-entropy, gradient accumulation in a `lax.scan`, AdamW.

A batch is a dict of (B, T) int arrays:
  inputs, targets     token ids; targets[t] is the token that should follow inputs[..t]
  positions           rotary positions, restarting at 0 for each packed document
  segment_ids         1, 2, ... per packed document, 0 for padding
  loss_weights        per target token (0 masks prompts, padding and document boundaries)
The loss is sum(weights * nll) / sum(weights) over the whole global batch, so accumulating N microbatches
gives exactly the update of one step on the N-times larger batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mellama_jax import sharding
from mellama_jax.config import Config, ConfigError, Mode
from mellama_jax.model import Llama, attention
from mellama_jax.saved_params import abstract_like
from mellama_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_weights")


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State  # the trainable parameters (all of them, or LoRA adapters)
    opt_state: optax.OptState


def _token_losses(logits, targets, weights):
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (jnp.sum((log_z - target_logit) * weights), jnp.sum(jnp.square(log_z) * weights)), log_z


@jax.custom_vjp
def _losses(logits, targets, weights):
    return _token_losses(logits, targets, weights)[0]


def _losses_fwd(logits, targets, weights):
    losses, log_z = _token_losses(logits, targets, weights)
    return losses, (logits, targets, weights, log_z)


def _losses_bwd(residuals, grads):
    """d/dlogits = w * softmax * (g_ce + 2 g_z log Z) - w * g_ce * onehot(target): one pass over the logits, the
    one-hot an iota comparison inside it. Autodiff's own backward also scattered the target gradient into a
    zero-filled copy of the logits and added the two."""
    logits, targets, weights, log_z = residuals
    g_ce, g_z = grads
    probs = jnp.exp(logits - log_z[..., None])
    target = targets[..., None] == jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    d_logits = probs * (weights * (g_ce + 2 * g_z * log_z))[..., None] - jnp.where(
        target, (weights * g_ce)[..., None], 0.0
    )
    return d_logits.astype(logits.dtype), None, None


_losses.defvjp(_losses_fwd, _losses_bwd)


def token_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted sums of cross-entropy and of log(Z)^2 over the tokens of a (micro)batch."""
    return _losses(logits, targets, weights.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The pieces of a run that do not change between steps: model structure, optimizer, mesh, shardings."""

    cfg: Config
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding

    def model(self, params, frozen) -> Llama:
        return nnx.merge(self.graphdef, params, frozen)

    def shard_batch(self, batch: dict, extra: tuple[str, ...] = ()) -> dict:
        """This process's rows of the global batch (numpy) -> global arrays on the mesh; `extra`: more (B, T)
        keys to take along (the evaluation's `source_ids`)."""
        out = {}
        for k in BATCH_KEYS + extra:
            local = np.asarray(batch[k], np.float32 if k == "loss_weights" else np.int32)
            shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, local, shape)
        return out


def trainable_filter(cfg: Config):
    """What the optimizer updates: every parameter, or (lora) only the adapters."""
    return nnx.LoRAParam if cfg.train.mode == Mode.LORA else nnx.Param


def new_model(cfg: Config) -> Llama:
    return Llama(cfg.model, rngs=nnx.Rngs(cfg.seed), lora=cfg.adapters)


def plan_trainer(cfg: Config, mesh: Mesh | None = None) -> tuple[Trainer, Callable]:
    """The Trainer and a jitted `init() -> (TrainState, frozen)`, from abstract shapes only (nothing allocated).

    The init is jitted with `out_shardings`, so every device computes only its own shards: a 70B init never
    materialises a full parameter on one host. In lora mode the frozen base is stored in `lora.base_dtype`.
    """
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    batch_sh = sharding.batch_sharding(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    ways = batch_sh.mesh.size // batch_sh.shard_shape((batch_sh.mesh.size, 1))[0]
    if micro % ways:
        raise ConfigError(
            f"train: each microbatch has {micro} sequences (batch_size {cfg.train.batch_size} / "
            f"grad_accum {cfg.train.grad_accum}), which does not divide over the {ways} batch shards "
            f"of mesh {dict(mesh.shape)}"
        )
    trainable = trainable_filter(cfg)
    tx, schedule = make_optimizer(cfg.optimizer, max(cfg.train.steps, 1))
    frozen_dtype = jnp.dtype(cfg.lora.base_dtype) if cfg.train.mode == Mode.LORA else None

    def init():
        _, params, frozen = nnx.split(new_model(cfg), trainable, ...)
        if frozen_dtype is not None:
            frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), frozen

    graphdef = nnx.split(nnx.eval_shape(lambda: new_model(cfg)), trainable, ...)[0]
    abstract_state, abstract_frozen = jax.eval_shape(init)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    frozen_sh = sharding.state_shardings(abstract_frozen, mesh, rules)
    trainer = Trainer(cfg, mesh, graphdef, tx, schedule, state_sh, frozen_sh, batch_sh)
    return trainer, jax.jit(init, out_shardings=(state_sh, frozen_sh))


def abstract_batch(trainer: Trainer) -> dict:
    """The global batch as shapes, dtypes and the trainer's batch sharding: what the step is compiled for."""
    shape = (trainer.cfg.train.batch_size, trainer.cfg.train.seq_len)
    return {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32 if k == "loss_weights" else jnp.int32, sharding=trainer.batch_sharding
        )
        for k in BATCH_KEYS
    }


def compile_ahead(trainer: Trainer, init: Callable) -> jax.stages.Compiled:
    """The train step compiled ahead of time from shapes alone (nothing allocated: a 70B step compiles on a
    laptop), for the layout `trainer` gives the state and batch; the executable then runs real arrays so laid
    out. `plan`, `plan --search`, `bench memory` and `bench mesh` all compile the step this one way."""
    abs_state, abs_frozen = jax.eval_shape(init)
    with jax.set_mesh(trainer.mesh):
        return (
            make_train_step(trainer)
            .jitted.lower(
                abstract_like(abs_state, trainer.state_shardings),
                abstract_like(abs_frozen, trainer.frozen_shardings),
                abstract_batch(trainer),
            )
            .compile()
        )


def build_trainer(cfg: Config, mesh: Mesh | None = None) -> tuple[Trainer, TrainState, Any]:
    """Trainer, initial TrainState and frozen state, created directly in their sharded layout."""
    trainer, init = plan_trainer(cfg, mesh)
    with jax.set_mesh(trainer.mesh):
        state, frozen = init()
    return trainer, state, frozen


def _split_microbatches(batch: dict, n: int, batch_spec: PartitionSpec) -> dict:
    """(B, T) -> (n, B/n, T) with microbatch i = rows i, i+n, ...: each device keeps its own rows."""

    def split(x):
        b, t = x.shape
        x = x.reshape(b // n, n, t).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(None, *batch_spec))

    return {k: split(v) for k, v in batch.items()}


def _gradients(trainer: Trainer, state: TrainState, frozen, batch: dict, total_weight) -> tuple:
    """(gradients, summed cross-entropy, summed z-loss) of the batch, over `grad_accum` microbatches in a scan."""
    cfg = trainer.cfg
    n_micro, z_weight = cfg.train.grad_accum, cfg.train.z_loss
    use_dropout = cfg.train.mode == Mode.LORA and cfg.lora.dropout > 0
    # Dropout keys depend only on (seed, step, microbatch): a resumed run draws the same masks.
    step_key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)

    def micro_grads(params, mb, index=0):
        def loss_fn(params):
            model = trainer.model(params, frozen)
            rng = jax.random.fold_in(step_key, index) if use_dropout else None
            logits = model(mb["inputs"], mb["positions"], mb["segment_ids"], rng)
            ce, z = token_losses(logits, mb["targets"], mb["loss_weights"])
            return (ce + z_weight * z) / total_weight, (ce, z)

        return jax.grad(loss_fn, has_aux=True)(params)

    if n_micro == 1:
        grads, (ce, z) = micro_grads(state.params, batch)
        return grads, ce, z

    def body(carry, xs):
        acc, ce_acc, z_acc = carry
        mb, index = xs
        g, (ce, z) = micro_grads(state.params, mb, index)
        acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, acc, g), trainer.state_shardings.params)
        return (acc, ce_acc + ce, z_acc + z), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    microbatches = _split_microbatches(batch, n_micro, trainer.batch_sharding.spec)
    (grads, ce, z), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), (microbatches, jnp.arange(n_micro)))
    return grads, ce, z


def make_train_step(trainer: Trainer) -> Callable:
    """`step(state, frozen, batch) -> (state, metrics)`, jitted with the run's shardings; `state` is donated."""
    cfg, mesh = trainer.cfg, trainer.mesh
    skip_nonfinite = cfg.skips_nonfinite

    def step(state: TrainState, frozen, batch: dict):
        with nn.logical_axis_rules(cfg.mesh.rules):
            total_weight = jnp.maximum(jnp.sum(batch["loss_weights"]), 1.0)
            grads, ce, z = _gradients(trainer, state, frozen, batch, total_weight)
            updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = optax.global_norm(grads)
            finite = jnp.isfinite(ce) & jnp.isfinite(z) & jnp.isfinite(grad_norm)
            if skip_nonfinite:  # a non-finite step changes nothing but the step count (and the data position)
                params, opt_state = (
                    jax.tree.map(lambda new, old: jnp.where(finite, new, old), new, old)
                    for new, old in ((params, state.params), (opt_state, state.opt_state))
                )
            metrics = {
                "loss": ce / total_weight,
                "z_loss": z / total_weight,
                "tokens": jnp.sum(batch["loss_weights"]),
                "grad_norm": grad_norm,
                "skipped": jnp.logical_and(skip_nonfinite, ~finite).astype(jnp.int32),
                "learning_rate": trainer.schedule(state.step),
                # above model.max_segments, cudnn attention takes its slower masked kernel (the loop says so)
                "documents_per_row_max": jnp.max(attention.documents_per_row(batch["segment_ids"])),
            }
            return TrainState(state.step + 1, params, opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = {k: trainer.batch_sharding for k in BATCH_KEYS}
    jitted = jax.jit(
        step,
        in_shardings=(trainer.state_shardings, trainer.frozen_shardings, batch_sh),
        out_shardings=(trainer.state_shardings, replicated),
        donate_argnums=(0,),
    )

    def run(state, frozen, batch):
        with jax.set_mesh(mesh):
            return jitted(state, frozen, batch)

    run.jitted = jitted
    return run


def make_eval_step(trainer: Trainer, sources: int = 1) -> Callable:
    """`eval(params, frozen, batch) -> (weighted cross-entropy sums, weight sums)`, each of shape (sources,):
    per source, by the batch's `source_ids` (a row's source index on each token) when there are several; no
    dropout."""
    cfg, mesh = trainer.cfg, trainer.mesh
    keys = BATCH_KEYS + (("source_ids",) if sources > 1 else ())

    def evaluate(params, frozen, batch):
        with nn.logical_axis_rules(cfg.mesh.rules):
            logits = trainer.model(params, frozen)(batch["inputs"], batch["positions"], batch["segment_ids"])
            weights = batch["loss_weights"][None]
            if sources > 1:
                weights = weights * (batch["source_ids"][None] == jnp.arange(sources)[:, None, None])
            ce = jax.vmap(lambda w: token_losses(logits, batch["targets"], w)[0])(weights)
            return ce, jnp.sum(weights, axis=(1, 2))

    batch_sh = {k: trainer.batch_sharding for k in keys}
    jitted = jax.jit(
        evaluate,
        in_shardings=(trainer.state_shardings.params, trainer.frozen_shardings, batch_sh),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )

    def run(params, frozen, batch):
        with jax.set_mesh(mesh):
            return jitted(params, frozen, batch)

    return run
