"""`ellama plan`: the e-Llama GPU-hours figure, memory estimates and bad input."""

from __future__ import annotations

import pytest

from ellama_recipes.workflows.plan import compute_plan, parse_tokens
from ellama_recipes.recipes.pretrain import build_config as build_pretrain_config


def test_e_llama_gpu_hours_within_5_percent(cli):
    r = cli("plan", "--size", "70b", "--gpus", "480", "--tokens", "1T", "--tflops", "343", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert abs(d["gpu_hours"] - 340_000) / 340_000 < 0.05
    assert d["gpus"] == 480 and d["data_parallel"] == 15
    assert d["steps"] == 84_772  # ceil(1e12 / (1440 * 8192))
    assert d["tokens_per_step"] == 11_796_480
    assert d["wall_clock_hours"] == pytest.approx(d["gpu_hours"] / 480)


# Per-GPU totals of the default layouts, as sizes.py's docstring and the README state them (GiB, H100 80 GB).
STATED_TOTAL_GIB = {"8b": 49, "70b": 55, "405b": 60}


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_default_parallelism_fits_h100(size):
    d = compute_plan(build_pretrain_config(size))
    mem = d["memory_per_gpu_gib"]
    assert d["fits_h100_80gb"] and mem["total"] < 80, mem
    assert mem["total"] == pytest.approx(STATED_TOTAL_GIB[size], abs=1.0)


def test_8b_memory_terms_by_hand():
    """Llama 3.1 8B at TP2 PP1 CP1 SP, DP32, seq 8192, micro batch 1, BF16 weights, fp32 grads, distributed Adam:
    each term from the published architecture (8,030,261,248 parameters; hidden 4096, KV dim 8 x 128, FFN 14336,
    32 layers, vocab 128,256), written out here rather than taken from plan.py."""
    gib = 2**30
    d = compute_plan(build_pretrain_config("8b"))
    mem = d["memory_per_gpu_gib"]
    per_gpu = 8_030_261_248 // 2  # TP2, one pipeline stage
    assert d["params_per_gpu"] == per_gpu
    assert mem["weights"] == pytest.approx(2 * per_gpu / gib, abs=0.01)
    assert mem["gradients"] == pytest.approx(4 * per_gpu / gib, abs=0.01)
    assert mem["optimizer"] == pytest.approx(12 * per_gpu / 32 / gib, abs=0.01)  # sharded over DP32
    tokens = 8192 // 2  # sequence parallel: each TP rank keeps seq / TP tokens
    assert mem["activations"] == pytest.approx(2 * (5 * 4096 + 2 * 1024 + 3 * 14336) * tokens * 32 / gib, abs=0.01)
    assert mem["logits"] == pytest.approx(8 * tokens * 128_256 / gib, abs=0.01)
    assert mem["overhead"] == 5.0


def test_memory_estimate_reacts_to_parallelism():
    base = compute_plan(build_pretrain_config("8b"))["memory_per_gpu_gib"]
    tp1 = compute_plan(
        build_pretrain_config("8b", overrides=["parallel.tensor_parallel=1", "parallel.sequence_parallel=false",
                                               "schedule.global_batch_size=1472"])
    )
    assert not tp1["fits_h100_80gb"]  # why 8b defaults to TP2
    assert tp1["memory_per_gpu_gib"]["weights"] == pytest.approx(2 * base["weights"], rel=0.01)
    no_cp = compute_plan(build_pretrain_config("70b", overrides=["parallel.context_parallel=1"]))
    cp2 = compute_plan(build_pretrain_config("70b"))
    assert no_cp["memory_per_gpu_gib"]["activations"] == pytest.approx(2 * cp2["memory_per_gpu_gib"]["activations"], rel=0.01)


def test_gpu_hours_scale_with_tokens_and_tflops():
    cfg = build_pretrain_config("8b")
    a = compute_plan(cfg, tokens=10**12, tflops=400)["gpu_hours"]
    assert compute_plan(cfg, tokens=2 * 10**12, tflops=400)["gpu_hours"] == pytest.approx(2 * a)
    assert compute_plan(cfg, tokens=10**12, tflops=800)["gpu_hours"] == pytest.approx(a / 2)


@pytest.mark.parametrize("text,value", [("1T", 10**12), ("500B", 5 * 10**11), ("2.5e11", 25 * 10**10), ("85000", 85000)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--size", "70b", "--gpus", "100"], "not a multiple of --gpus-per-node"),
        (["--size", "13b"], "Valid sizes"),
        (["--size", "8b", "--tokens", "lots"], "not a token count"),
        (["--size", "70b", "--gpus", "24"], "world size 24"),
        (["--size", "8b", "--tflops", "-3"], "--tflops must be positive"),
    ],
)
def test_plan_bad_input_exit_2(cli, args, needle):
    r = cli("plan", *args)
    assert r.code == 2
    assert needle in r.err
    assert "Traceback" not in r.err + r.out


def test_plan_table_output(cli):
    r = cli("plan", "--size", "8b", "--gpus", "64", "--tokens", "200B")
    assert r.code == 0
    assert "GPU-hours" in r.out and "memory/GPU: total" in r.out
