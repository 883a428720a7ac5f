"""`ellama align` (SFT, then DPO from SFT's checkpoint) across CPU ranks: DP2 (2 processes) and TP2 x PP2
(4 processes; TP2 and PP2 alone were separate cases until Dec 2026), each launched by the real CLI (``ellama align --gpus-per-node N parallel.X=2`` -> NeMo-Run
LocalExecutor -> torchrun, gloo), against the same chain run in one process.

Same inputs everywhere: the tiny base (``tiny_base``), the bundled SFT and preference samples (prepared once by the
single-process run; the parallel runs get a copy, which `ellama align` reuses because its inputs are unchanged),
global batch 8 (SFT rows / DPO pairs), data order, seed, 6 steps per stage, validation at steps 3 and 6.

Tolerance: every metric of every step of both stages (SFT ``loss``, ``val_loss``; DPO ``loss``, ``dpo_loss``,
``nll_loss``, rewards, ``margin``, their ``val_`` forms, ``lr``) within ``TOL`` = 1e-4 absolute of the single
process (as the pretraining equivalence test); reward accuracies and held-out pair counts exactly equal; the DPO
reference log-prob table (sums of ~100 response-token log-probs, |value| up to ~430, fp32 ulp there 3e-5) within
``TABLE_TOL`` = 5e-4. Measured on 2 CPU cores (Nov 2026, two runs each), max |parallel - single| over all metrics
and steps: SFT <= 9.6e-7 (DP2, TP2, PP2: 0 to 1 fp32 ulp of the loss), DPO DP2 <= 8.1e-7, TP2 <= 3.0e-6, PP2
<= 9.5e-7, TP2 x PP2 SFT 0 / DPO 1.8e-6 (one run); reference table DP2 3.1e-5, TP2 6.1e-5, PP2 3.1e-5, TP2 x PP2
3.1e-5 (1-2 ulp: the SFT weights it is computed from differ in the last bit).

What proves the DPO split across data-parallel ranks (pairs, not rows; each pair on exactly one rank): the first DPO
step is exactly ln 2 with zero rewards (policy == reference: the all-reduced reference table matches the policy
pair by pair, nothing double-counted or missing), reward accuracies (multiples of 1/8) and ``val_pairs`` equal the
single process's, and under DP2 rank 0 ran half of the reference pass's micro batches. Checked against two broken
engines (Nov 2026, DP2): every DP rank computing every pair in the reference pass (table doubled by the all-reduce)
-> step-1 dpo_loss 0.187 instead of ln 2, table off by 428; DPOLossReduction without its DP all-reduce -> val_pairs
8 instead of 16, losses off by 0.11. Both launches still "succeeded"; this test fails on both.

Runtime (2 cores): 4 min 20-50 s for the module (`pytest tests/test_align_parallel.py`: 50-54 s setup incl. the shared
tiny base and the single-process chain, then 69-83 s per 2-process chain of two launches; the 4-process TP2 x PP2
chain about 100 s).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_DATA, run_console

pytestmark = [pytest.mark.slow, pytest.mark.engine]

STEPS, VAL_EVERY = 6, 3
TOL = 1e-4
TABLE_TOL = 5e-4
TIMEOUT = 900
STAGES = ("sft", "dpo")
ARGS = ["--sft-steps", str(STEPS), "--dpo-steps", str(STEPS), "--save-every", str(STEPS),
        f"sft.schedule.val_check_interval={VAL_EVERY}", f"dpo.schedule.val_check_interval={VAL_EVERY}"]
EXACT = ("reward_accuracy", "val_reward_accuracy", "val_pairs")
# the gradient norm (issue 22's new metrics key) is a sum of squares over every parameter, reduced across ranks in
# another order: it is compared relative to its size (a norm of ~3.5 differs by ~1e-4 at TP2, 3.5e-5 relative)
RELATIVE = ("grad_norm",)


def _align(base: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ellama_recipes", "align", "--size", "tiny", "--from", str(base),
           "--sft", str(SAMPLE_DATA / "sft"), "--dpo", str(SAMPLE_DATA / "preference"), "--out", str(out),
           *ARGS, *args]
    return run_console(cmd, out.parent / f"{out.name}.console.txt", TIMEOUT)


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x)}


def _reference_micro_batches(console: str) -> int:
    """Micro batches rank 0 ran in DPO's reference pass (its last progress line)."""
    return int(re.findall(r"reference log-probs: (\d+)/\1 micro batches", console)[-1])


@pytest.fixture(scope="module")
def single(tiny_base, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("align_par") / "single"
    proc = _align(tiny_base, out)
    assert proc.returncode == 0, proc.console[-5000:]
    for stage in STAGES:
        assert sorted(_metrics(out / stage)) == list(range(1, STEPS + 1)), stage
    return {"out": out, "console": proc.console}


@pytest.mark.parametrize(
    "name,overrides,dp,ranks",
    [
        ("dp2", [], 2, 2),
        # TP and PP in one 4-process launch: separate TP2 and PP2 chains (both passed at <= 3e-6, Nov 2026) cost two
        # more chains of two launches (~150 s of the suite) for no property TP2 x PP2 does not exercise
        ("tp2pp2", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 1, 4),
    ],
)
def test_align_across_ranks_matches_the_single_process_run(single, tiny_base, tmp_path, name, overrides, dp, ranks):
    import torch

    ref_out = single["out"]
    out = tmp_path / name
    for stage in STAGES:  # the prepared rows of the single run (align reuses them: same inputs, same tokenizer)
        shutil.copytree(ref_out / stage / "data", out / stage / "data")
    proc = _align(tiny_base, out, "--gpus-per-node", str(ranks), *overrides)
    assert proc.returncode == 0, proc.console[-5000:]
    # both stages went through the torchrun launch (not the in-process path), one after the other
    assert proc.console.count("launched (SUCCEEDED), job folder") == 2, proc.console[-3000:]
    # the result box shows each stage's own summary (SFT losses, DPO metrics), not pretraining's launch summary
    assert "sft: done, checkpoint" in proc.console and "dpo: done, checkpoint" in proc.console
    assert "final_train_loss" not in proc.console and "loss " in proc.console

    worst = {}
    for stage in STAGES:
        got, ref = _metrics(out / stage), _metrics(ref_out / stage)
        assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), stage
        worst[stage] = 0.0
        for s in ref:
            for key, want in ref[s].items():
                if key in ("stage", "step", "step_time_s"):
                    continue
                assert key in got[s], f"{name} {stage} step {s}: no {key} (single process: {want})"
                if key in EXACT:
                    assert got[s][key] == want, f"{name} {stage} step {s} {key}: {got[s][key]} vs {want}"
                    continue
                diff = abs(got[s][key] - want)
                if key in RELATIVE:
                    diff /= max(1.0, abs(want))
                assert diff <= TOL, f"{name} {stage} step {s} {key}: {got[s][key]} vs single-process {want}"
                worst[stage] = max(worst[stage], diff)
        # the run folder of each stage: its checkpoint named by the metrics' step, rank 1's output in its own file
        assert list((out / stage / "checkpoints").glob(f"{stage}--step={STEPS}-consumed_samples={8.0 * STEPS}*"))
        for r in range(1, ranks):
            log = out / stage / "logs" / "ranks" / f"rank-{r}.log"
            assert log.is_file() and log.stat().st_size > 0, log
        # the completion record `ellama align` chains from, with the stage's own summary (written by rank 0)
        done = json.loads((out / stage / "complete.json").read_text())
        want = json.loads((ref_out / stage / "complete.json").read_text())
        assert done["stage"] == stage and done["train_steps"] == STEPS and Path(done["checkpoint"]).is_dir()
        assert done["summary"]["final_step"] == STEPS, done
        assert abs(done["summary"]["final_loss"] - want["summary"]["final_loss"]) <= TOL, (done, want)
    assert "[default0]" in proc.console  # only rank 0 on the console
    assert not any(f"[default{r}]" in proc.console for r in range(1, ranks)), proc.console[-3000:]

    # DPO: policy == reference at step 1 in every layout: exactly ln 2, zero rewards
    first = _metrics(out / "dpo")[1]
    assert abs(first["dpo_loss"] - math.log(2)) < 1e-6, first
    assert max(abs(first[k]) for k in ("rewards_chosen", "rewards_rejected", "margin")) < 1e-6, first
    assert first["reward_accuracy"] == 0, first
    # the reference table: every pair (train + held out) once, computed from THIS run's SFT checkpoint
    table = torch.load(out / "dpo" / "reference_logps.pt", weights_only=True)
    ref_table = torch.load(ref_out / "dpo" / "reference_logps.pt", weights_only=True)
    sft_ckpt = json.loads((out / "sft" / "complete.json").read_text())["checkpoint"]
    assert Path(table["reference"]).resolve() == Path(sft_ckpt).resolve()
    assert table["logps"].shape == ref_table["logps"].shape and table["pairs"] == ref_table["pairs"]
    table_diff = (table["logps"] - ref_table["logps"]).abs().max().item()
    assert table_diff <= TABLE_TOL, table_diff
    # data parallel: each rank computed its own share of the pairs (rank 0 ran 1/dp of the micro batches)
    assert _reference_micro_batches(proc.console) * dp == _reference_micro_batches(single["console"])
    print(f"{name}: max |metric - single-process metric| over {STEPS} steps: sft {worst['sft']:.2e}, "
          f"dpo {worst['dpo']:.2e}; reference table {table_diff:.2e}")
