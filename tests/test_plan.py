"""`ellama plan`: the e-Llama GPU-hours figure, memory estimates and bad input."""

from __future__ import annotations

import pytest

from ellama_recipes.plan import compute_plan, parse_tokens
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


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_default_parallelism_fits_h100(size):
    d = compute_plan(build_pretrain_config(size))
    mem = d["memory_per_gpu_gib"]
    assert d["fits_h100_80gb"], mem
    parts = sum(v for k, v in mem.items() if k != "total")
    assert mem["total"] == pytest.approx(parts, abs=0.05)


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
