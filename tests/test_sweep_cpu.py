"""A 2 x 2 tiny `ellama sweep` on CPU, end to end through the real CLI, NeMo-Run and llm.pretrain.

First run: the second point's training process is SIGKILLed after its step-2 checkpoint; the sweep carries on
with the other points and exits 1 naming the unfinished one. Second run of the same command: the base pass and the
three finished points are skipped (their files untouched), the killed point resumes from its last complete
checkpoint and finishes; sweep.json / sweep.png cover all four. Runtime: ~3 minutes on 2 CPU cores (six short
training / validation processes of ~20 s each, mostly NeMo start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from ellama_recipes.workflows import sweep as S
from ellama_recipes.model.sizes import get_size

STEPS = 8
VICTIM = "lr0.1_r1-4"
POINTS = ["lr0.1_r4-1", "lr0.1_r1-4", "lr0.2_r4-1", "lr0.2_r1-4"]


def _cmd(inputs, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "ellama_recipes", "sweep", "--size", "tiny", "--from", str(inputs.base),
        "--data", str(inputs.manifest), "--out", str(out), "--lr-fraction", "0.1,0.2", "--ratio", "4:1,1:4",
        "--steps", str(STEPS),
        "checkpoint.save_every=2", "schedule.val_check_interval=4", "schedule.limit_val_batches=2",
    ]


def _kill_victim_after_step_2(proc: subprocess.Popen, run: Path, timeout: float = 400) -> int:
    """SIGKILL the victim's training process (pid from its sweep_point.json) once step 3 is logged, i.e. after the
    synchronous step-2 checkpoint; returns the last step it logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        recs = S.read_metrics(run)
        if any(r["step"] >= 3 for r in recs):
            pid = json.loads((run / "sweep_point.json").read_text())["pid"]
            os.killpg(pid, signal.SIGKILL)  # NeMo-Run starts each task in its own session
            return max(r["step"] for r in S.read_metrics(run))
        time.sleep(0.05)
    raise AssertionError(f"the victim never reached step 3 (sweep exit {proc.poll()})")


def _snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_2x2_sweep_finishes_resumes_the_interrupted_point_and_skips_finished_ones(tiny_inputs, tmp_path):
    out = tmp_path / "sweep"
    cmd = _cmd(tiny_inputs, out)
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
        try:
            killed_at = _kill_victim_after_step_2(proc, out / "runs" / VICTIM)
            code1 = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text1 = log1.read_text()
    assert code1 == 1, text1[-4000:]
    assert 3 <= killed_at < STEPS
    first = json.loads((out / "sweep.json").read_text())
    assert first["unfinished"] == [VICTIM], text1[-4000:]
    assert first["launched"]["jobs"] == ["base", *POINTS]
    assert f"did not finish: {VICTIM}" in " ".join(text1.split())
    finished = {n: _snapshot(out / "runs" / n) for n in POINTS if n != VICTIM}
    base_before = _snapshot(out / "base")

    # second run: skip what is done, resume the killed point
    proc2 = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    text2 = proc2.stdout + proc2.stderr
    assert proc2.returncode == 0, text2[-4000:]
    result = json.loads((out / "sweep.json").read_text())
    assert result["launched"]["jobs"] == [VICTIM]
    for name in finished:
        assert f"{name}: finished (step {STEPS}), skipped" in text2
        assert _snapshot(out / "runs" / name) == finished[name]  # not touched
    assert _snapshot(out / "base") == base_before
    victim = out / "runs" / VICTIM
    resumed = json.loads((victim / "resume.json").read_text())["resumed_from"]
    assert resumed is not None and 2 <= resumed <= killed_at
    assert [r["step"] for r in S.read_metrics(victim)] == list(range(1, STEPS + 1))  # no gap, no duplicate

    # sweep.json: every point, real values, the knobs really reached the runs
    assert result["unfinished"] == [] and [e["name"] for e in result["points"]] == POINTS
    base = result["base"]
    assert base["val_loss_domain"] > 0 and base["val_loss_general"] > 0
    tiny = get_size("tiny")
    for e in result["points"]:
        recs = S.read_metrics(Path(e["run_dir"]))
        val = [r for r in recs if "val_loss_domain" in r]
        assert [r["step"] for r in val] == [4, 8]
        assert e["val_loss_domain"]["final"] == val[-1]["val_loss_domain"]
        assert e["val_loss_domain"]["best"] == min(r["val_loss_domain"] for r in val)
        assert e["val_loss_domain"]["change"] == pytest.approx(val[-1]["val_loss_domain"] - base["val_loss_domain"])
        assert e["val_loss_general"]["change"] == pytest.approx(val[-1]["val_loss_general"] - base["val_loss_general"])
        assert e["val_loss_domain"]["final"] < base["val_loss_domain"]  # training on more domain text helps it
        assert e["tokens_seen"] == STEPS * tiny.global_batch_size * tiny.seq_length
        assert e["wall_time_s"] and e["wall_time_s"] > 0
        assert max(r["lr"] for r in recs) == pytest.approx(e["knobs"]["lr_fraction"] * tiny.base_max_lr, rel=1e-3)
        manifest = json.loads(Path(e["manifest"]).read_text())
        target = e["knobs"]["general_to_domain"]
        assert abs(manifest["realized"]["general_to_domain_token_ratio"] - target) / target <= 0.02
        # the run's serialized NeMo-Run task trained on this point's blend
        configs = list((out / "nemo_run").rglob(f"{e['name']}_config.yaml"))
        assert configs
        for c in configs:
            task = yaml.safe_load(c.read_text())
            assert task["_target_"] == "ellama_recipes.workflows.sweep.runner.train_point"
            cfg = json.loads(task["config"])
            assert cfg["data"]["manifest"] == e["manifest"] and cfg["schedule"]["lr_fraction"] == e["knobs"]["lr_fraction"]
    rec, _ = S.recommend(result["points"], result["max_regression_pct"])
    assert result["recommended"] == rec
    assert result["pareto_front"] == S.pareto_front(result["points"])
    assert "recommended:" in text2 or "no recommendation:" in text2
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from test_sweep import _markers

    assert _markers(png, S.POINT_COLOR) == len(POINTS) + 1  # one per run, plus the legend's
