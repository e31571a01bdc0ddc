"""Train the MoE decoder with a low-precision recipe: `python -m lowbit.train --recipe nvfp4`.

The loop in `train()` reads top to bottom: build mesh, model, state and jitted step (`build_step`) and
the data; restore the latest checkpoint of WORKDIR if there is one; then step, log, evaluate, checkpoint.
The machinery (sharding rules, the jitted step, checkpoint I/O, metrics, signals) lives in the helpers below.

Objective: mean token cross-entropy (float32 logits) + the MoE auxiliary loss. Optimizer: AdamW
(Loshchilov & Hutter 2019) after global-norm clipping, lr = linear warmup then cosine decay.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lowbit
from lowbit.config import Config, TrainConfig, dump_yaml, list_configs, load_config
from lowbit.data import make_train_iter, make_val_batches
from lowbit.model import Decoder
from lowbit.model.attention import config_attention_impl
from lowbit.model.sharding import BATCH_AXES
from lowbit.nn import AmaxHistory
from lowbit.scaling import next_history

MESH_AXES = ("data", "fsdp", "expert")
EXIT_USAGE, EXIT_NONFINITE, EXIT_SIGINT = 2, 3, 130


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the run stopped."""


class ResumeError(ValueError):
    """WORKDIR holds a checkpoint that does not fit this run's model or recipe."""


# the training loop -----------------------------------------------------------------------------


def train(config: Config, recipe: str | Any, workdir: str | Path, *,
          nan_steps: Collection[int] = (), deadline: float | None = None,
          device_turn: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Any]:
    """Train (or resume) a run in `workdir`; returns a summary (final losses, steps, tokens).

    `deadline` (a time.monotonic() value) stops the run like SIGTERM: finish the step, save.
    `device_turn`: compile and run the first step, then enter `device_turn()` and hold it for the rest
    of the run, so that runs started together compile at once but take turns on the GPU (lowbit.study's
    --take-turns passes turns in recipe order).
    `nan_steps` poisons the loss of those steps with NaN, to exercise the non-finite guard.
    Raises NonFiniteError after `max_consecutive_nonfinite` bad steps in a row.
    """
    tc = config.train
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(tc.compilation_cache_dir)

    parts = build_step(config, recipe)
    recipe, mesh, state, train_step, eval_step, schedule = (
        parts.recipe, parts.mesh, parts.state, parts.train_step, parts.eval_step, parts.schedule)
    del parts  # holds the initial state: a resumed run must not keep it alive beside the restored one
    zero, nan = jnp.float32(0.0), jnp.float32(jnp.nan)  # loss offsets (NaN poisons a step)

    processes = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data_iter = make_train_iter(config.data, **processes)
    val_batches = [shard_batch(b, mesh) for b in make_val_batches(config.data, tc.eval_batches, **processes)]
    checkpoints = make_checkpoint_manager(workdir / "checkpoints", tc)
    state, start_step = restore_latest(checkpoints, state, data_iter)
    metrics_log = MetricsLog(workdir / "metrics.jsonl", keep_through_step=start_step)
    # what attention_impl "auto" resolved to on this machine (cuDNN on an NVIDIA GPU, else XLA)
    attention = config_attention_impl(config.model)
    if jax.process_index() == 0:
        (workdir / "config.yaml").write_text(
            f"# lowbit run: recipe={recipe.name} config={config.name} attention={attention} "
            "(load with --config this file)\n" + dump_yaml(config))
        (workdir / "recipe.yaml").write_text(recipe.to_yaml())

    tokens_per_step = config.data.global_batch_size * config.model.max_target_length
    summary = {"recipe": recipe.name, "config": config.name, "attention": attention,
               "workdir": str(workdir),
               "start_step": start_step, "stopped": "completed"}
    last_loss = last_val = None
    step = start_step
    timer = StepTimer()
    with StopOnSignal(deadline) as stop, progress_bar(tc.steps, start_step) as bar, \
            contextlib.ExitStack() as turn:
        for step in range(start_step + 1, tc.steps + 1):
            batch = shard_batch(next(data_iter), mesh)
            state, metrics = train_step(state, batch, schedule, nan if step in nan_steps else zero)
            if device_turn is not None and step == start_step + 1:
                if tc.eval_every:  # compile the eval step too before queueing for the device
                    evaluate(eval_step, state, val_batches[:1])
                jax.block_until_ready(metrics)
                turn.enter_context(device_turn())
            stopping = stop.requested

            if step % tc.log_every == 0 or step == tc.steps or stopping:
                row = host_metrics(metrics, timer.lap(step), tokens_per_step)
                last_loss = row["loss"]
                metrics_log.write({"step": step, **row})
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                if row["nonfinite_run"] >= tc.max_consecutive_nonfinite:
                    checkpoints.close()  # waits for pending saves; nothing new is saved
                    raise NonFiniteError(
                        f"{row['nonfinite_run']} consecutive steps with a non-finite loss or gradient "
                        f"(at step {step}); the last good checkpoint is step {checkpoints.latest_step()} "
                        f"in {workdir / 'checkpoints'}. Lower learning_rate or try another recipe.")
            bar.update(1)

            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                last_val = evaluate(eval_step, state, val_batches)
                metrics_log.write({"step": step, "split": "val", "val_loss": last_val})
            if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or stopping:
                save_checkpoint(checkpoints, step, state, data_iter)
            if stopping:
                summary["stopped"] = stop.signal_name
                break

    if checkpoints.latest_step() != step and step > start_step:
        save_checkpoint(checkpoints, step, state, data_iter)
    checkpoints.close()
    summary.update(step=step, final_loss=last_loss, final_val_loss=last_val,
                   nonfinite_count=int(state["nonfinite_count"]), tokens_seen=step * tokens_per_step)
    return summary


# model, optimizer, state -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What `build_step` made: the backend-resolved recipe, the mesh, the model's graph, the initial
    train state on the mesh (donated by `train_step`: rebind it to the step's output), the jitted steps
    (`OnMesh` wrappers of make_train_step / make_eval_step) and the schedule's values."""

    recipe: Any
    mesh: Mesh
    graphdef: Any
    state: dict[str, Any]
    train_step: Callable
    eval_step: Callable
    schedule: dict[str, jax.Array]


def build_step(config: Config, recipe: str | Any, backend: str | None = None) -> StepParts:
    """recipe (+ backend, default config.train.backend) -> mesh -> model (seed config.train.seed)
    -> nnx.split -> init_train_state -> make_train_step / make_eval_step: the train loop's set-up."""
    tc = config.train
    recipe = with_backend(lowbit.get_recipe(recipe), tc.backend if backend is None else backend)
    mesh = make_mesh(tc)
    check_batch_fits(config.data.global_batch_size, tc.grad_accum_steps, mesh)
    graphdef, params, amax, rng_state = split_model(build_model(config, recipe))
    state = init_train_state(params, rng_state, make_optimizer(tc), mesh, config, amax=amax)
    return StepParts(recipe=recipe, mesh=mesh, graphdef=graphdef, state=state,
                     train_step=make_train_step(graphdef, tc, state, mesh),
                     eval_step=make_eval_step(graphdef, mesh), schedule=schedule_values(tc))


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State, nnx.State]:
    """(graphdef, parameters, amax histories (delayed scaling; else empty), RNG streams and the rest)."""
    return nnx.split(model, nnx.Param, AmaxHistory, ...)


def build_model(config: Config, recipe: Any) -> nnx.Module:
    """Decoder with float32 master weights, its GEMMs swapped for the recipe's quantized ones."""
    seed = config.train.seed
    rngs = nnx.Rngs(params=seed, quant=seed + 1)
    model = Decoder(config.model, rngs=rngs)
    return lowbit.quantize_model(model, recipe, rngs=rngs) or model


def with_backend(recipe: Any, backend: str) -> Any:
    """The recipe with its GEMM backend overridden, unless `backend` is "auto"."""
    if backend == "auto":
        return recipe
    return recipe.replace(backend=backend)


def schedule_values(tc: TrainConfig) -> dict[str, jax.Array]:
    """The schedule's constants as arrays: a step function compiled once serves any length or lr."""
    return {"peak": jnp.float32(tc.learning_rate), "end": jnp.float32(tc.learning_rate * tc.lr_end_ratio),
            "warmup": jnp.float32(tc.warmup_steps), "total": jnp.float32(max(tc.steps, tc.warmup_steps + 1))}


def learning_rate(count: jax.Array, schedule: dict[str, jax.Array]) -> jax.Array:
    """Linear warmup 0 -> peak over `warmup` updates, then cosine decay to `end` at `total`.

    lr(n) = peak n / warmup for n < warmup, else end + (peak - end)(1 + cos(pi p)) / 2 with
    p = min((n - warmup) / (total - warmup), 1); as optax.warmup_cosine_decay_schedule(0, ...).
    """
    count = jnp.asarray(count, jnp.float32)
    warm = schedule["peak"] * count / jnp.maximum(schedule["warmup"], 1.0)
    progress = jnp.clip((count - schedule["warmup"]) / (schedule["total"] - schedule["warmup"]), 0.0, 1.0)
    cosine = schedule["end"] + (schedule["peak"] - schedule["end"]) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < schedule["warmup"], warm, cosine)


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: rank >= 2 (kernels, experts, embedding)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW at unit learning rate (the step multiplies by `learning_rate`).

    adamw(1.0) * lr == adamw(lr): the learning rate is the last factor of optax's AdamW chain.
    """
    adamw = optax.adamw(1.0, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                        weight_decay=tc.weight_decay, mask=decay_mask)
    if tc.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip_norm), adamw)
    return adamw


def init_train_state(params: Any, rng_state: Any, optimizer: optax.GradientTransformation,
                     mesh: Mesh, config: Config, amax: Any = None) -> dict[str, Any]:
    """{step, params, opt_state, rng, nonfinite_count, nonfinite_run} (+ amax: the amax histories of a
    delayed-scaling recipe), placed on the mesh.

    Only `params` reach the optimizer: the quantization RNG streams (`rng`) and amax histories are
    never clipped, decayed or updated by it.
    """
    param_shardings = param_sharding_tree(params, mesh, config.model.num_experts)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, param_shardings)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda _: replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    counter = lambda: jax.device_put(jnp.zeros((), jnp.int32), replicated)
    state = {"step": counter(), "params": params, "opt_state": opt_state,
             "rng": jax.device_put(rng_state, replicated),
             "nonfinite_count": counter(), "nonfinite_run": counter()}
    if amax is not None and jax.tree.leaves(amax):
        state["amax"] = jax.device_put(amax, replicated)
    return state


# sharding ------------------------------------------------------------------------------------------


def mesh_shape(tc: TrainConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, expert) sizes; a -1 axis takes the devices the others leave."""
    sizes = [tc.ici_data, tc.ici_fsdp, tc.ici_expert]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh axes {sizes} "
                             "(data, fsdp, expert); pick sizes whose product divides the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise ValueError(f"mesh (data, fsdp, expert) = {sizes} needs {math.prod(sizes)} devices, "
                         f"only {num_devices} exist")
    return tuple(sizes)


def make_mesh(tc: TrainConfig) -> Mesh:
    """A (data, fsdp, expert) mesh over all devices (the first prod(sizes) when none is -1)."""
    devices = jax.devices()
    shape = mesh_shape(tc, len(devices))
    return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), MESH_AXES)


def check_batch_fits(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """The batch splits evenly into microbatches and over the batch axes of the mesh."""
    shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if global_batch_size % (shards * grad_accum_steps):
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a multiple of grad_accum_steps "
            f"({grad_accum_steps}) x the devices that split the batch (data*fsdp*expert = {shards})")


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, num_experts: int) -> P:
    """Expert axis of stacked expert weights over `expert`; the largest divisible dim over `fsdp`."""
    spec: list[Any] = [None] * len(shape)
    expert_size, fsdp_size = mesh.shape["expert"], mesh.shape["fsdp"]
    if "experts" in path and len(shape) == 3 and shape[0] == num_experts and num_experts % expert_size == 0:
        spec[0] = "expert"
    if fsdp_size > 1:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp_size == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def param_sharding_tree(params: Any, mesh: Mesh, num_experts: int) -> Any:
    """NamedSharding per parameter following `param_spec`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: NamedSharding(mesh, param_spec(jax.tree_util.keystr(path), p.shape, mesh,
                                                       num_experts)), params)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over (data, fsdp, expert)."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(rows))
            for name, rows in local_batch.items()}


# the jitted step -------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """mean_t -log softmax(logits_t)[target_t], in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def expert_balance(expert_load: jax.Array) -> dict[str, jax.Array]:
    """Load statistics over experts, averaged over MoE layers: max/mean (1 = balanced) and CV."""
    if expert_load.size == 0:
        return {"expert_load_max_over_mean": jnp.float32(1.0), "expert_load_cv": jnp.float32(0.0)}
    mean = jnp.mean(expert_load, axis=-1)
    return {"expert_load_max_over_mean": jnp.mean(jnp.max(expert_load, axis=-1) / mean),
            "expert_load_cv": jnp.mean(jnp.std(expert_load, axis=-1) / mean)}


def microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
    """[B, T] -> [count, B/count, T], microbatch m = rows m, m+count, ... (no cross-device moves)."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def global_norm(tree: Any) -> jax.Array:
    """sqrt(sum of squares of every leaf), in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# Compiled steps by (graph, static settings, shardings): runs in one process with the same model
# and mesh (tests, lowbit.study) compile once; lengths and learning rates are runtime values.
_COMPILED: dict[Any, Callable] = {}


def _tree_key(tree: Any) -> tuple:
    return jax.tree.structure(tree), tuple(jax.tree.leaves(tree))


def make_train_step(graphdef: Any, tc: TrainConfig, state: dict[str, Any], mesh: Mesh) -> Callable:
    """jit(state, batch, schedule, loss_offset) -> (state, metrics): one guarded AdamW update.

    The gradient is the mean over `grad_accum_steps` microbatches (a lax.scan). A non-finite loss
    or gradient norm keeps params and optimizer state (the RNG streams still advance) and bumps
    `nonfinite_count` / `nonfinite_run`; a finite step resets the run. `loss_offset` is added
    to the reported loss (0; NaN in tests of the guard).
    Delayed scaling (state["amax"]): the histories' gradients are their next values, combined over
    microbatches by max; while every history is empty (the first step) the step only fills them
    (its casts ran at scale 1), leaving params and optimizer state as they were.
    """
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    static = (tc.adam_b1, tc.adam_b2, tc.adam_eps, tc.weight_decay, tc.grad_clip_norm, tc.grad_accum_steps)
    key = ("train", graphdef, static, _tree_key(state_shardings), mesh)
    if key not in _COMPILED:
        _COMPILED[key] = OnMesh(mesh, jax.jit(
            _train_step_fn(graphdef, make_optimizer(tc), tc.grad_accum_steps),
            in_shardings=(state_shardings, NamedSharding(mesh, P(BATCH_AXES)), None, None),
            out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0))
    return _COMPILED[key]


def _train_step_fn(graphdef: Any, optimizer: optax.GradientTransformation, accum_steps: int) -> Callable:
    def loss_fn(params, amax, rng_state, batch):
        # Fresh Variables at this trace level: NNX only lets a trace mutate (the RNG counts of)
        # Variables created under it, and rng_state arrives from the enclosing scan.
        model = nnx.merge(graphdef, params, amax, jax.tree.map(lambda x: x, rng_state))
        logits, aux = model(batch["inputs"])
        ce = cross_entropy(logits, batch["targets"])
        rng_state = split_model(model)[3]
        return ce + aux["aux_loss"], (ce, aux, rng_state)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def step(state, batch, schedule, loss_offset):
        amax = state.get("amax", nnx.State({}))

        def accumulate(carry, microbatch):
            grads_sum, amax_max, rng_state = carry
            (loss, (ce, aux, rng_state)), (grads, amax_grads) = grad_fn(
                state["params"], amax, rng_state, microbatch)
            return (jax.tree.map(jnp.add, grads_sum, grads), jax.tree.map(jnp.maximum, amax_max, amax_grads),
                    rng_state), {
                "loss": loss, "ce_loss": ce, "aux_loss": aux["aux_loss"],
                "dropped_fraction": aux["dropped_fraction"], **expert_balance(aux["expert_load"])}

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, amax_new, rng_state), stats = jax.lax.scan(
            accumulate, (zeros, jax.tree.map(jnp.zeros_like, amax), state["rng"]),
            microbatches(batch, accum_steps))
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        metrics = jax.tree.map(jnp.mean, stats)
        metrics["loss"] = metrics["loss"] + loss_offset
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        calibrating = _histories_empty(amax)
        update = finite & ~calibrating
        lr = learning_rate(state["step"] - state["nonfinite_count"], schedule)  # skipped steps don't count
        direction, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], jax.tree.map(lambda u: lr * u, direction))
        keep_unless = lambda ok, new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        bad = (~finite).astype(jnp.int32)
        new_state = {
            "step": state["step"] + 1,
            "params": keep_unless(update, params, state["params"]),
            "opt_state": keep_unless(update, opt_state, state["opt_state"]),
            "rng": rng_state,
            "nonfinite_count": state["nonfinite_count"] + bad,
            "nonfinite_run": (state["nonfinite_run"] + bad) * bad,
        }
        metrics.update(grad_norm=grad_norm, lr=lr, nonfinite_count=new_state["nonfinite_count"],
                       nonfinite_run=new_state["nonfinite_run"])
        if "amax" in state:
            new_state["amax"] = keep_unless(finite, _stored_histories(amax_new, amax), amax)
            metrics["amax_calibration"] = calibrating.astype(jnp.int32)
        return new_state, metrics

    return step


def _histories_empty(amax: Any) -> jax.Array:
    """True while no amax history holds a value (delayed scaling's first step), False without any."""
    leaves = jax.tree.leaves(amax)
    if not leaves:
        return jnp.bool_(False)
    return jnp.all(jnp.stack([jnp.all(h == 0) for h in leaves]))


def _stored_histories(gradients: Any, old: Any) -> Any:
    """Each history after the step (lowbit.scaling.next_history: this step's amaxes from the gradient,
    older ones from the history; unchanged where its hook did not run)."""
    return jax.tree.map(next_history, old, gradients)


def make_eval_step(graphdef: Any, mesh: Mesh) -> Callable:
    """jit(state, batch) -> mean cross-entropy; the RNG state it advances is discarded."""
    def eval_loss(state, batch):
        model = nnx.merge(graphdef, state["params"], state.get("amax", nnx.State({})), state["rng"])
        logits, _ = model(batch["inputs"])
        return cross_entropy(logits, batch["targets"])
    key = ("eval", graphdef, mesh)
    if key not in _COMPILED:
        _COMPILED[key] = OnMesh(mesh, jax.jit(eval_loss))
    return _COMPILED[key]


class OnMesh:
    """A jitted function traced, lowered and run with `mesh` as the context mesh (jax.set_mesh), so
    the model's activation sharding hints (lowbit.model.sharding) split activations over it."""

    def __init__(self, mesh: Mesh, jitted: Callable):
        self.mesh, self.jitted = mesh, jitted

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def evaluate(eval_step: Callable, state: dict[str, Any], batches: Sequence[dict[str, jax.Array]]) -> float:
    """Mean validation cross-entropy over the fixed validation batches."""
    return float(np.mean([float(eval_step(state, b)) for b in batches]))


# checkpoints -----------------------------------------------------------------------------------------


def make_checkpoint_manager(directory: Path, tc: TrainConfig) -> ocp.CheckpointManager:
    """Async orbax manager keeping the newest `keep_checkpoints` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def storable(state: dict[str, Any]) -> dict[str, Any]:
    """Typed PRNG keys -> their uint32 key data (what orbax can write)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def save_checkpoint(checkpoints: ocp.CheckpointManager, step: int, state: dict[str, Any],
                    data_iter: grain.DatasetIterator) -> None:
    """Train state (params, optimizer, RNG streams, counters) + the data iterator's position."""
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(storable(state)),
        data=grain.checkpoint.CheckpointSave(data_iter)))


def restore_latest(checkpoints: ocp.CheckpointManager, state: dict[str, Any],
                   data_iter: grain.DatasetIterator) -> tuple[dict[str, Any], int]:
    """(state, step) from the newest checkpoint, restored onto `state`'s shardings; else (state, 0)."""
    step = checkpoints.latest_step()
    if step is None:
        return state, 0
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), storable(state))
    stored = sorted(tuple(m.shape) for m in jax.tree.leaves(checkpoints.item_metadata(step)["state"]))
    expected = sorted(x.shape for x in jax.tree.leaves(target))
    if stored != expected:
        checkpoints.close()
        raise ResumeError(
            f"the checkpoint of step {step} in {checkpoints.directory} does not fit this run: it holds "
            f"{len(stored)} arrays of {sum(map(math.prod, stored)):,} elements, this model and recipe "
            f"need {len(expected)} of {sum(map(math.prod, expected)):,}; resume with the run's own "
            "settings (its config.yaml and recipe.yaml) or use a new --workdir")
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iter)))["state"]
    state = jax.tree.map(
        lambda live, saved: jax.random.wrap_key_data(saved, impl=jax.random.key_impl(live))
        if _is_key(live) else saved, state, restored)
    return state, step


# metrics, progress, signals -------------------------------------------------------------------------


class StepTimer:
    """Wall time and step count since the previous lap."""

    def __init__(self) -> None:
        self.last_time, self.last_step = time.perf_counter(), None

    def lap(self, step: int) -> tuple[float, int]:
        now = time.perf_counter()
        steps = 1 if self.last_step is None else step - self.last_step
        elapsed, self.last_time, self.last_step = now - self.last_time, now, step
        return elapsed, max(steps, 1)


def host_metrics(metrics: dict[str, jax.Array], lap: tuple[float, int], tokens_per_step: int) -> dict:
    """Device metrics -> plain floats/ints plus step time and throughput (forces a device sync)."""
    values = jax.device_get(metrics)
    row = {name: int(v) if np.issubdtype(np.asarray(v).dtype, np.integer) else float(v)
           for name, v in values.items()}
    elapsed, steps = lap
    row["step_time_s"] = elapsed / steps
    row["tokens_per_s"] = tokens_per_step * steps / elapsed if elapsed > 0 else 0.0
    return row


class MetricsLog:
    """Appends JSON rows to metrics.jsonl; on resume drops rows past the restored step."""

    def __init__(self, path: Path, keep_through_step: int) -> None:
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and path.exists():
            rows = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            path.write_text("".join(row + "\n" for row in rows))

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def progress_bar(total: int, initial: int) -> Iterator[Any]:
    """tqdm on stderr when it is a terminal (quiet in logs and tests), process 0 only."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
               disable=None if jax.process_index() == 0 else True)
    try:
        yield bar
    finally:
        bar.close()


class StopOnSignal:
    """SIGTERM/SIGINT (or passing `deadline`) make `requested` true: the loop finishes its step,
    saves and stops. A second SIGINT while stopping raises KeyboardInterrupt at once (no save).
    """

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        if not self.signal_name and self.deadline is not None and time.monotonic() >= self.deadline:
            self.signal_name = "deadline"
        return bool(self.signal_name)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignal:
        if _in_main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# process set-up ------------------------------------------------------------------------------------


def enable_compilation_cache(directory: str) -> None:
    """Persistent XLA compilation cache (FP8 GEMM autotuning takes minutes); "" leaves it off."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def maybe_initialize_distributed() -> None:
    """jax.distributed.initialize() when the environment describes several processes.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port) + JAX_NUM_PROCESSES + JAX_PROCESS_ID.
    Auto-detected by JAX: SLURM (SLURM_NTASKS > 1) and Open MPI (OMPI_COMM_WORLD_SIZE > 1).
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()


# command line ----------------------------------------------------------------------------------------


def _choices_text() -> str:
    from lowbit.recipes import get_recipe, list_recipes
    recipes = "\n".join(f"  {name:<14} {get_recipe(name).headline}" for name in list_recipes())
    configs = "\n".join(f"  {name:<14} {line}" for name, line in list_configs().items())
    return f"recipes:\n{recipes}\n\nconfigs (--config; default: tiny, which runs on a CPU):\n{configs}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowbit.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the lowbit MoE decoder with a low-precision recipe; resumes from WORKDIR.",
        epilog=_choices_text() + "\n\nAny config key can be overridden as key=value, e.g. "
        "learning_rate=1e-3 num_experts=8.\nExit codes: 0 done or stopped by SIGTERM after saving; "
        "2 bad arguments;\n3 too many non-finite steps; 130 stopped by Ctrl-C after saving.")
    parser.add_argument("--recipe", required=True, help="quantization recipe name or recipe YAML path")
    parser.add_argument("--config", default="tiny", help="config name or YAML path (default: tiny)")
    parser.add_argument("--steps", type=int, help="total steps (overrides the config's `steps`)")
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<config>-<recipe>)")
    parser.add_argument("--data", default=None,
                        help="training data: a glob of text files or of .npy token arrays (quote it; "
                             "default: the Python standard library's source files)")
    parser.add_argument("--backend", default=None, choices=("auto", "emulate", "fp8", "native"),
                        help="how quantized GEMMs execute (default: auto from the device)")
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_run(args: argparse.Namespace) -> tuple[Config, Any, Path]:
    """Config (with flag and key=value overrides), recipe and workdir from parsed arguments."""
    from lowbit.recipes import get_recipe
    overrides = list(args.overrides)
    flags = {"steps": args.steps, "data": args.data, "backend": args.backend,
             "compilation_cache_dir": args.compilation_cache}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    config = load_config(args.config, overrides)
    recipe = get_recipe(args.recipe)
    workdir = Path(args.workdir or Path("runs") / f"{config.name}-{recipe.name}")
    return config, recipe, workdir


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, recipe, workdir = resolve_run(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.print_usage(sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    maybe_initialize_distributed()
    try:
        summary = train(config, recipe, workdir)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except ResumeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary))
    return EXIT_SIGINT if summary["stopped"] == "SIGINT" else 0


if __name__ == "__main__":
    sys.exit(main())
