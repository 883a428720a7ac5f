"""The GPU proof kit (benchmarks/gpu/) in its CPU mode, so it cannot rot between GPU runs; and its wheel list.

The CPU mode runs the very code the GPU host runs (tiny chain: import-hf -> pretrain -> SIGKILL -> resume ->
export-hf with the logits check; the proxy throughput through the recipe path), on a small shape in fp32.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(KIT))
import proof  # noqa: E402  (benchmarks/gpu/proof.py)


def test_flop_formula_and_layer_fit():
    # Llama 3.1 8B itself: 8,030,261,248 parameters; the formula's N leaves the input embedding out
    p = proof.proxy_params(proof.PROXY, 32)
    assert p["total"] == 8_030_261_248
    assert p["non_embedding"] == p["total"] - 128256 * 4096
    fpt = proof.flops_per_token(proof.PROXY, 32)
    assert fpt == 6 * p["non_embedding"] + 12 * 32 * 4096 * 8192
    assert 57e9 < fpt < 59e9  # 6 x 7.5B (45.0 GFLOP) + 12.9 GFLOP of attention per token
    # more free memory never fits fewer layers; an 80 GB card fits a few 8B layers at seq 8192 without flash attention
    fits = [proof.auto_layers(proof.PROXY, gib * 2**30)["layers"] for gib in (40, 60, 78, 139)]
    assert fits == sorted(fits) and 1 <= fits[2] < 32


def test_wheel_list_pins_the_engine_and_stays_installable():
    specs = proof_wheels()
    names = {s.split("==")[0].lower().replace("_", "-") for s in specs}
    assert len(names) == len(specs), "one version per package"
    assert {"nemo-toolkit==2.7.3", "megatron-core==0.15.3"} <= {s.lower().replace("_", "-") for s in specs}
    from ellama_recipes.engine.cpu_compat import WRITTEN_FOR

    for dist, version in WRITTEN_FOR.items():
        assert f"{dist}=={version}".replace("_", "-") in {s.lower().replace("_", "-") for s in specs}
    # never shadow the GPU image's CUDA torch
    assert not names & {"torch", "triton", "numpy"} and not any(n.startswith("nvidia-cu") for n in names)


def proof_wheels() -> list[str]:
    sys.path.insert(0, str(KIT))
    import fetch_wheels

    return fetch_wheels.wheel_list(KIT / "wheels.txt")


def test_plan_defaults_name_their_sources():
    from ellama_recipes.workflows.plan import DEFAULT_TFLOPS, TFLOPS_SOURCES, compute_plan
    from ellama_recipes.recipes import get_recipe

    assert DEFAULT_TFLOPS["bf16"] == 343 and "e-Llama" in TFLOPS_SOURCES["bf16"]
    assert "Megatron-Bridge 25.11" in TFLOPS_SOURCES["fp8"] and "744" in TFLOPS_SOURCES["fp8"]
    assert DEFAULT_TFLOPS["fp8"] == pytest.approx(744 / 1.15, abs=1)
    cfg = get_recipe("pretrain").build_config("70b", num_nodes=60)
    res = compute_plan(cfg, tokens=10**12)
    assert res["tflops_source"].startswith("default for bf16: e-Llama")
    assert res["gpu_hours"] == pytest.approx(340_000, rel=0.02)  # e-Llama's ~340,000 H100 hours for 70B on 1T


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.timeout(600)
def test_cpu_mode_runs_every_check(tiny_hf, tiny_data, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "base_hf").symlink_to(tiny_hf)
    (inputs / "data").symlink_to(tiny_data)
    out = tmp_path / "proof.json"
    proc = subprocess.run(
        [sys.executable, str(KIT / "proof.py"), "--mode", "cpu", "--inputs", str(inputs), "--work", str(tmp_path / "w"),
         "--json", str(out), "--skip-align",
         # the kit's default budget (480 s) is sized for the GPU session; a loaded 2-core CI host gets more room
         "--budget-s", "560"],
        capture_output=True, text=True, env=subprocess_env(), timeout=580, cwd=REPO,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, (last[-4000:], proc.stderr[-3000:])
    res = json.loads(last)
    assert res == json.loads(out.read_text())
    assert res["ok"] is True and res["mode"] == "cpu"
    assert res["versions"]["nemo_toolkit"] == "2.7.3" and res["versions"]["megatron-core"] == "0.15.3"
    assert res["layer_spec"].startswith("local") and res["transformer_engine"]["importable"] is False
    chain = res["checks"]["chain"]
    spec = proof.CHAIN["cpu"]
    assert chain["import_hf"]["ok"] and chain["import_hf"]["tensors"] > 0
    assert chain["sigkill"]["exit"] == -signal.SIGKILL and chain["sigkill"]["steps_before_kill"] == spec["kill_after"]
    assert chain["resume"]["resumed_from"] == spec["save_every"]
    assert chain["export_hf"]["max_logit_diff"] < chain["export_hf"]["logit_tolerance"]
    assert chain["export_hf"]["tensors"] == chain["import_hf"]["tensors"]
    thr = res["checks"]["throughput"]["fp32"]
    assert thr["ok"] and thr["params_match_formula"] and thr["model_params_counted"] == thr["params"]
    assert thr["tokens_per_s_per_gpu"] == pytest.approx(thr["tokens_per_step"] / thr["step_time_s_median"], rel=1e-3)
    assert thr["tflops_per_gpu"] == pytest.approx(thr["flops_per_token"] * thr["tokens_per_s_per_gpu"] / 1e12, abs=0.1)
    assert res["checks"]["throughput"]["fp8"]["ran"] is False
    assert "transformer_engine" in res["checks"]["throughput"]["fp8"]["missing"]
    assert res["anchors"]["megatron_bridge_25.11_llama3_8b_fp8_tflops_per_gpu"] == 744
