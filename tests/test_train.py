"""lowbit.train / lowbit.plot: convergence per recipe, exact resume, non-finite guard, signals, CLI.

Runs use the tiny config shrunk further by overrides (T=32) so that every recipe trains in
seconds on two CPU cores; each run is in-process (`train(config, recipe, workdir)`) except the
SIGKILL test, which needs a process to kill.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lowbit import plot
from lowbit.config import load_config
from lowbit.model import Decoder
from lowbit.train import (
    NonFiniteError,
    ResumeError,
    build_model,
    build_step,
    check_batch_fits,
    init_train_state,
    learning_rate,
    main,
    make_mesh,
    make_optimizer,
    mesh_shape,
    microbatches,
    param_spec,
    schedule_values,
    shard_batch,
    train,
)

# One xdist worker runs this whole file (`--dist loadfile` in pyproject.toml): train() keeps its
# compiled step per (model, recipe, mesh) in-process, so runs of the same program compile once.
REPO = Path(__file__).resolve().parents[1]
FAST = ["max_target_length=32", "global_batch_size=8", "eval_every=0", "checkpoint_every=0", "warmup_steps=5"]


def tiny(*overrides: str):
    return load_config("tiny", [*FAST, *overrides])


def read_rows(workdir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "val"]


def saved_params(workdir: Path, step: int) -> list[np.ndarray]:
    """Parameters of checkpoint `step`, read back with orbax alone (no lowbit code)."""
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return [np.asarray(x) for x in jax.tree.leaves(restored["state"]["params"])]


# convergence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "mxfp8", "nvfp4", "mxfp4"])
def test_loss_falls_by_15_percent_within_60_steps(recipe, tmp_path):
    summary = train(tiny("steps=60", "learning_rate=1e-2"), recipe, tmp_path)
    rows, _ = read_rows(tmp_path)
    losses = [r["loss"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all(math.isfinite(x) for x in losses) and summary["nonfinite_count"] == 0
    assert summary["attention"] == "xla"  # attention_impl auto on a CPU
    assert "attention=xla" in (tmp_path / "config.yaml").read_text().splitlines()[0]
    first, last = losses[0], float(np.mean(losses[-5:]))
    assert first == pytest.approx(math.log(256), rel=0.1)  # untrained: about uniform over bytes
    assert last <= 0.85 * first, f"{recipe}: loss {first:.3f} -> {last:.3f}"


# optimizer pieces -----------------------------------------------------------------------------------


def test_learning_rate_matches_optax_warmup_cosine():
    config = tiny("steps=50", "warmup_steps=7", "learning_rate=2e-3", "lr_end_ratio=0.05")
    reference = optax.warmup_cosine_decay_schedule(0.0, 2e-3, 7, 50, end_value=1e-4)
    counts = np.arange(0, 60)
    ours = np.asarray(jax.vmap(lambda n: learning_rate(n, schedule_values(config.train)))(counts))
    np.testing.assert_allclose(ours, [float(reference(n)) for n in counts], rtol=1e-5, atol=1e-10)


def test_optimizer_state_holds_params_only_not_quantization_rng():
    config = tiny()
    model = build_model(config, "nvfp4")  # stochastic rounding: the model carries `quant` RNG streams
    _, params, rng_state = nnx.split(model, nnx.Param, ...)
    assert jax.tree.leaves(rng_state), "nvfp4 should hold RNG state for stochastic rounding"
    state = init_train_state(params, rng_state, make_optimizer(config.train), make_mesh(config.train), config)
    opt_leaves = jax.tree.leaves(state["opt_state"])
    assert not any(jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) for x in opt_leaves)
    param_leaves = jax.tree.leaves(params)
    moments = [x for x in opt_leaves if x.ndim > 0]
    assert len(moments) == 2 * len(param_leaves)  # Adam's mu and nu, one per parameter
    assert sorted(x.shape for x in moments) == sorted(2 * [p.shape for p in param_leaves])


def test_build_step_takes_one_step_from_the_seeded_init():
    config = tiny("backend=emulate", "seed=3", "ici_fsdp=2", "dtype=float32")  # f32: tight reference
    parts = build_step(config, "bf16")
    assert parts.recipe.backend == "emulate"  # the config's backend unless one is passed
    assert parts.mesh.size == 2 and parts.mesh.shape["fsdp"] == 2
    # Reference: the plain decoder from the config's seed (bf16 converts no GEMM), its loss in float64
    reference = Decoder(config.model, rngs=nnx.Rngs(params=3))
    initial = [np.asarray(x) for x in jax.tree.leaves(parts.state["params"])]
    for ours, want in zip(initial, jax.tree.leaves(nnx.state(reference, nnx.Param)), strict=True):
        np.testing.assert_array_equal(ours, np.asarray(want))
    for path, p in jax.tree_util.tree_leaves_with_path(parts.state["params"]):
        assert p.sharding.spec == param_spec(jax.tree_util.keystr(path), p.shape, parts.mesh,
                                             config.model.num_experts)
    ids = np.random.default_rng(0).integers(0, 256, (8, 33)).astype(np.int32)
    logits, aux = reference(jnp.asarray(ids[:, :-1]))
    shifted = np.asarray(logits, np.float64) - np.max(np.asarray(logits, np.float64), -1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.mean(np.take_along_axis(log_probs, ids[:, 1:, None], -1))

    batch = shard_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]}, parts.mesh)
    state, metrics = parts.train_step(parts.state, batch, parts.schedule, jnp.float32(0))
    assert int(state["step"]) == 1 and float(metrics["lr"]) == 0.0  # warmup starts at lr 0
    assert float(metrics["ce_loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(ce + float(aux["aux_loss"]), rel=1e-5)
    for ours, before in zip(jax.tree.leaves(state["params"]), initial, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), before)  # lr 0: AdamW moves nothing
    assert float(parts.eval_step(state, batch)) == pytest.approx(ce, rel=1e-5)
    assert build_step(config, "bf16", backend="native").recipe.backend == "native"


def test_microbatches_partition_the_rows():
    batch = {"inputs": np.arange(12 * 3).reshape(12, 3)}
    split = np.asarray(microbatches(batch, 4)["inputs"])
    assert split.shape == (4, 3, 3)
    np.testing.assert_array_equal(np.sort(split.reshape(-1, 3), axis=0), batch["inputs"])
    np.testing.assert_array_equal(split[1], batch["inputs"][[1, 5, 9]])


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    whole = train(tiny("steps=2"), "bf16", tmp_path / "whole")
    accumulated = train(tiny("steps=2", "grad_accum_steps=4"), "bf16", tmp_path / "accumulated")
    assert whole["step"] == accumulated["step"] == 2
    rows_whole, rows_accumulated = read_rows(tmp_path / "whole")[0], read_rows(tmp_path / "accumulated")[0]
    for a, b in zip(rows_whole, rows_accumulated, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)


def test_batch_must_split_over_the_mesh_and_microbatches():
    mesh = make_mesh(tiny("ici_data=2", "ici_fsdp=2").train)
    check_batch_fits(8, 2, mesh)
    with pytest.raises(ValueError, match=r"multiple of grad_accum_steps \(3\)"):
        check_batch_fits(8, 3, mesh)
    with pytest.raises(ValueError, match="data\\*fsdp\\*expert = 4"):
        check_batch_fits(6, 1, mesh)


# metrics, config record, resume --------------------------------------------------------------------


def test_metrics_rows_and_run_record(tmp_path):
    train(tiny("steps=4", "eval_every=2", "eval_batches=1"), "bf16", tmp_path)
    rows, val_rows = read_rows(tmp_path)
    expected = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "aux_loss",
                "expert_load_max_over_mean", "expert_load_cv", "dropped_fraction", "nonfinite_count"}
    assert expected <= set(rows[0])
    assert [r["step"] for r in val_rows] == [2, 4] and all(r["val_loss"] > 0 for r in val_rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(3e-3 / 5)  # warmup from 0 over 5 steps
    assert all(r["expert_load_max_over_mean"] >= 1.0 and r["expert_load_cv"] >= 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    recorded = load_config(str(tmp_path / "config.yaml"))
    assert recorded.train.steps == 4 and recorded.model.max_target_length == 32
    assert "name: bf16" in (tmp_path / "recipe.yaml").read_text()


def test_restart_with_more_steps_continues_without_repeating(tmp_path):
    first = train(tiny("steps=6", "checkpoint_every=3"), "bf16", tmp_path)
    assert first["step"] == 6
    second = train(tiny("steps=9", "checkpoint_every=3"), "bf16", tmp_path)
    assert second["start_step"] == 6 and second["step"] == 9
    rows, _ = read_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 10))


def test_resume_restores_the_stochastic_rounding_rng_exactly(tmp_path):
    config = tiny("steps=4")  # nvfp4: stochastic rounding of gradients, keys from the `quant` stream
    train(config, "nvfp4", tmp_path / "reference")
    stopped = train(config, "nvfp4", tmp_path / "resumed", deadline=time.monotonic() - 1)
    assert stopped["stopped"] == "deadline" and stopped["step"] == 1
    train(config, "nvfp4", tmp_path / "resumed")
    resumed, reference = read_rows(tmp_path / "resumed")[0], read_rows(tmp_path / "reference")[0]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]


def test_resume_with_another_model_or_recipe_is_a_clear_error(tmp_path):
    train(tiny("steps=1"), "bf16", tmp_path)
    # nvfp4 adds the RNG streams of stochastic rounding to the state: 2 more arrays than bf16
    with pytest.raises(ResumeError, match=r"checkpoint of step 1 .* does not fit this run: .*new --workdir"):
        train(tiny("steps=2"), "nvfp4", tmp_path)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps, overrides = 40, ["steps=40", "checkpoint_every=5", "keep_checkpoints=3"]
    reference = tmp_path / "reference"
    train(tiny(*overrides), "bf16", reference)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "lowbit.train", "--recipe", "bf16", "--workdir", str(killed),
               *FAST, *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "5" / "commit_success.txt").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    partial, _ = read_rows(killed)
    assert partial[-1]["step"] < steps, "the run finished before it could be killed"

    summary = train(tiny(*overrides), "bf16", killed)
    assert 5 <= summary["start_step"] < steps
    resumed, _ = read_rows(killed)
    expected, _ = read_rows(reference)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]


def test_sigterm_finishes_the_step_saves_and_stops(tmp_path):
    def send_sigterm_after_step_3():
        while not (tmp_path / "metrics.jsonl").exists() or len(read_rows(tmp_path)[0]) < 3:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=send_sigterm_after_step_3, daemon=True)
    killer.start()
    summary = train(tiny("steps=500"), "bf16", tmp_path)
    killer.join()
    assert summary["stopped"] == "SIGTERM" and 3 <= summary["step"] < 500
    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    assert manager.latest_step() == summary["step"]
    manager.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed afterwards


# non-finite guard -----------------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    poisoned, clean = tmp_path / "poisoned", tmp_path / "clean"
    summary = train(tiny("steps=3", "checkpoint_every=1"), "bf16", poisoned, nan_steps={3})
    train(tiny("steps=3", "checkpoint_every=1"), "bf16", clean)
    rows, _ = read_rows(poisoned)
    assert summary["nonfinite_count"] == 1
    assert [r["nonfinite_count"] for r in rows] == [0, 0, 1]
    assert math.isnan(rows[2]["loss"])
    # step 3 was skipped: its parameters are those after step 2, not those of a clean step 3
    for after_skip, after_two in zip(saved_params(poisoned, 3), saved_params(clean, 2), strict=True):
        np.testing.assert_array_equal(after_skip, after_two)
    assert any(not np.array_equal(a, b)
               for a, b in zip(saved_params(poisoned, 3), saved_params(clean, 3), strict=True))


def test_consecutive_nonfinite_steps_stop_the_run_keeping_the_last_good_checkpoint(tmp_path):
    config = tiny("steps=10", "checkpoint_every=2", "max_consecutive_nonfinite=2", "keep_checkpoints=5")
    with pytest.raises(NonFiniteError, match="2 consecutive steps.*last good checkpoint is step 4"):
        train(config, "bf16", tmp_path, nan_steps={5, 6})
    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    assert manager.all_steps() == [2, 4]
    manager.close()
    assert all(np.all(np.isfinite(p)) for p in saved_params(tmp_path, 4))


# sharding --------------------------------------------------------------------------------------------


def test_mesh_shape_fills_one_axis():
    config = tiny("ici_data=2", "ici_fsdp=-1", "ici_expert=2")
    assert mesh_shape(config.train, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        mesh_shape(tiny("ici_data=3", "ici_fsdp=-1").train, 8)
    with pytest.raises(ValueError, match="needs 16 devices"):
        mesh_shape(tiny("ici_data=16").train, 8)


def test_param_spec_rule():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "expert"))
    P = jax.sharding.PartitionSpec
    expert_path = "['layers'][0]['moe']['experts']['wi_0']"
    assert param_spec(expert_path, (4, 64, 128), mesh, 4) == P("expert", None, "fsdp")
    assert param_spec("['layers'][0]['attention']['query']['kernel']", (64, 48), mesh, 4) == P("fsdp", None)
    assert param_spec("['decoder_norm']['scale']", (6,), mesh, 4) == P(None)  # 6 % 4 != 0: replicated


def test_sharded_run_on_8_devices_matches_one_device(tmp_path):
    single = train(tiny("steps=2"), "bf16", tmp_path / "one")
    sharded = train(tiny("steps=2", "ici_data=2", "ici_fsdp=2", "ici_expert=2"), "bf16", tmp_path / "eight")
    rows_one, _ = read_rows(tmp_path / "one")
    rows_eight, _ = read_rows(tmp_path / "eight")
    assert single["step"] == sharded["step"] == 2
    for a, b in zip(rows_one, rows_eight, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


# command line ----------------------------------------------------------------------------------------


def test_help_lists_recipes_and_configs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("bf16", "fp8", "mxfp8", "nvfp4", "mxfp4", "tiny", "small", "mixtral-8x7b", "llama4-scout"):
        assert name in text


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "fp3"], "unknown recipe 'fp3'"),
    (["--recipe", "bf16", "learning_rat=1"], "did you mean learning_rate"),
    (["--recipe", "bf16", "steps=abc"], "steps expects int, got 'abc'"),
    (["--recipe", "bf16", "--config", "huge"], "unknown config 'huge'"),
])
def test_bad_arguments_exit_2_with_the_choices(argv, message, capsys, tmp_path):
    assert main([*argv, "--workdir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert message in error
    if "recipe" in message:
        assert "nvfp4" in error and "mxfp4" in error
    assert "Traceback" not in error
    assert not (tmp_path / "metrics.jsonl").exists()


# plot ------------------------------------------------------------------------------------------------


def test_plot_writes_a_png_for_two_runs(tmp_path):
    for name, scale in (("bf16-run", 1.0), ("nvfp4-run", 1.1)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": scale * 5.0 / s} for s in range(1, 21)]
        rows += [{"step": 10, "split": "val", "val_loss": scale * 0.6}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "config.yaml").write_text(f"# lowbit run: recipe={name.split('-')[0]} config=tiny\n")
    output = tmp_path / "curves.png"
    assert plot.main([str(tmp_path / "bf16-run"), str(tmp_path / "nvfp4-run"), "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and output.stat().st_size > 10_000
    assert plot.run_label(tmp_path / "nvfp4-run") == "nvfp4-run (nvfp4)"
    relative = tmp_path / "gap.png"
    assert plot.main([str(tmp_path / "nvfp4-run"), "--relative-to", str(tmp_path / "bf16-run"),
                      "-o", str(relative)]) == 0
    assert relative.stat().st_size > 10_000


def test_plot_smoothing_is_a_bias_corrected_ema():
    values = [1.0, 3.0, float("nan"), 5.0]
    weight = 0.5
    # by hand: s1 = 1; s2 = (0.5*0.5*1 + 0.5*3)/(0.75); NaN carries s2; s4 = (0.5*(0.25+1.5) + 2.5)/0.875
    expected = [1.0, 1.75 / 0.75, 1.75 / 0.75, (0.875 + 2.5) / 0.875]
    np.testing.assert_allclose(plot.smooth(values, weight), expected)


def test_plot_missing_run_is_a_clear_error(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


# study -------------------------------------------------------------------------------------------------


def test_study_resumes_a_stopped_recipe_and_summarizes(tmp_path):
    from lowbit.study import markdown_table, run_study

    config = tiny("steps=6", "eval_every=3", "eval_batches=1")
    stopped = train(config, "bf16", tmp_path / "bf16", deadline=time.monotonic() - 1)
    assert stopped["stopped"] == "deadline" and stopped["step"] == 1

    summary = run_study(config, ["bf16", "fp8"], tmp_path)
    for recipe in ("bf16", "fp8"):
        rows, _ = read_rows(tmp_path / recipe)
        assert [r["step"] for r in rows] == list(range(1, 7))
    bf16, fp8 = summary["recipes"]["bf16"], summary["recipes"]["fp8"]
    assert bf16["gap_to_bf16_val_loss"] == 0.0 and bf16["tokens_seen"] == 6 * 8 * 32
    assert fp8["gap_to_bf16_val_loss"] == pytest.approx(
        (fp8["final_val_loss"] - bf16["final_val_loss"]) / bf16["final_val_loss"])
    assert (tmp_path / "summary.md").read_text() == markdown_table(summary)
    assert json.loads((tmp_path / "summary.json").read_text())["recipes"]["fp8"]["steps"] == 6
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert run_study(config, ["bf16", "fp8"], tmp_path) == summary  # nothing left to train


def test_study_jobs_trains_recipes_in_child_processes_with_identical_results(tmp_path):
    """--jobs N runs each recipe in its own process: same losses as one after another in this one."""
    from lowbit.study import main as study_main
    from lowbit.study import run_study

    settings = (*FAST, "steps=4", "eval_every=2", "eval_batches=1")
    sequential = run_study(load_config("tiny", settings), ["bf16", "fp8"], tmp_path / "seq")
    assert study_main(["--config", "tiny", "--workdir", str(tmp_path / "par"), "--recipes", "bf16,fp8",
                       "--jobs", "2", "--take-turns", *settings]) == 0
    parallel = json.loads((tmp_path / "par" / "summary.json").read_text())
    assert parallel["recipes"] == sequential["recipes"]
    for recipe in ("bf16", "fp8"):
        losses = [[r["loss"] for r in read_rows(tmp_path / run / recipe)[0]] for run in ("par", "seq")]
        assert losses[0] == losses[1] and len(losses[0]) == 4
        assert (tmp_path / "par" / f"{recipe}.log").is_file()
    assert (tmp_path / "par" / "turn").read_text() == "fp8"  # turns went bf16 -> fp8, in recipe order
    assert study_main(["--config", "tiny", "--workdir", str(tmp_path), "--jobs", "0"]) == 2


def test_plot_relative_gap_matches_numpy_on_common_steps():
    run = [{"step": s, "loss": v} for s, v in [(10, 2.2), (20, 1.1), (30, 0.9), (40, 0.8)]]
    ref = [{"step": s, "loss": v} for s, v in [(10, 2.0), (30, 1.0), (40, 0.5), (50, 0.4)]]
    steps, gap = plot.relative_gap(run, ref, "loss", smoothing=0.0)  # no smoothing: pointwise ratios
    np.testing.assert_array_equal(steps, [10, 30, 40])
    np.testing.assert_allclose(gap, [0.1, -0.1, 0.6])
    _, smoothed = plot.relative_gap(run, ref, "loss", smoothing=0.5)  # EMAs over the common steps
    ema = lambda xs: plot.smooth(np.asarray(xs), 0.5)
    np.testing.assert_allclose(smoothed, (ema([2.2, 0.9, 0.8]) - ema([2.0, 1.0, 0.5])) / ema([2.0, 1.0, 0.5]))
    assert plot.relative_gap(run, [], "loss", 0.0)[0].size == 0


def test_study_summarize_compares_a_partial_run_at_its_own_last_step(tmp_path, capsys):
    """--summarize on a partial study: the early-stopped run's gap is taken at its last step."""
    from lowbit.study import main as study_main

    def write_run(name, losses, vals):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]
        rows += [{"step": s, "split": "val", "val_loss": v} for s, v in vals]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write_run("bf16", [4.0, 3.0, 2.0, 1.0], [(20, 3.0), (40, 1.0)])
    write_run("nvfp4", [4.4, 3.3], [(20, 3.3)])  # stopped at step 20 of 40
    assert study_main(["--config", "tiny", "--workdir", str(tmp_path), "--recipes", "bf16,nvfp4,mxfp4",
                       "--summarize", "steps=40"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    nvfp4 = summary["recipes"]["nvfp4"]
    assert nvfp4["complete"] is False and nvfp4["steps"] == nvfp4["gap_step"] == 20
    # at step 20: train means (4.4+3.3)/2 vs (4+3)/2 -> +10%; val 3.3 vs 3.0 -> +10% (not vs bf16's final 1.0)
    assert nvfp4["gap_to_bf16_train_loss"] == pytest.approx(0.1)
    assert nvfp4["gap_to_bf16_val_loss"] == pytest.approx(0.1)
    assert summary["recipes"]["bf16"]["complete"] is True and summary["missing"] == ["mxfp4"]
    table = (tmp_path / "summary.md").read_text()
    assert "20 (stopped early)" in table and "Not run: mxfp4." in table
    assert (tmp_path / "gap_to_bf16.png").stat().st_size > 10_000
    assert study_main(["--config", "tiny", "--workdir", str(tmp_path / "empty"), "--summarize"]) == 2
