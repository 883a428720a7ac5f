"""Continued pretraining of the tiny model on CPU through the real CLI and NeMo's llm.pretrain.

The shared session fixtures (tests/conftest.py) build the inputs once per test run (tiny HF base -> `ellama
import-hf` engine checkpoint; bundled sample data -> `data.pipeline.build` manifest). One uninterrupted 30-step run
is the reference; a second run of the same command SIGKILLs its whole process group right after step 25 (from
inside the run, so the step is exact on any host) and is re-run. Runtime: ~4-5 minutes on 2 CPU cores; the checks
on partial/corrupt checkpoints are plain file checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TinyInputs, leaked_processes, subprocess_env

pytestmark = pytest.mark.slow

STEPS = 30  # tiny defaults: save_every 20, val every 10 steps on 4 domain + 4 general batches
KILL_AFTER = 25
TIMEOUT = 600

# `python tools/kill_at_step.py N ARGS...` runs `ellama ARGS...` and SIGKILLs its own process group right after the
# metrics record of step N is written (exact on any host).
KILL_DRIVER = Path(__file__).resolve().parents[1] / "tools" / "kill_at_step.py"


def _args(inputs: TinyInputs, out: Path) -> list[str]:
    return ["pretrain", "--size", "tiny", "--from", str(inputs.base), "--data", str(inputs.manifest),
            "--out", str(out), "--steps", str(STEPS)]


def _cmd(inputs: TinyInputs, out: Path) -> list[str]:
    return [sys.executable, "-m", "ellama_recipes", *_args(inputs, out)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _run(cmd, log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=TIMEOUT)
    return proc


@pytest.fixture(scope="session")
def cpt_inputs(tiny_inputs) -> TinyInputs:
    return tiny_inputs


@pytest.fixture(scope="session")
def reference_run(cpt_inputs, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("cpt_ref") / "run"
    log = out.parent / "log.txt"
    proc = _run(_cmd(cpt_inputs, out), log)
    assert proc.returncode == 0, log.read_text()[-5000:]
    return out


def test_tiny_cpt_trains_and_domain_val_loss_falls(reference_run):
    recs = _metrics(reference_run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        assert r["train_loss"] is not None and r["lr"] is not None
    val = [r for r in recs if "val_loss_domain" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert all("val_loss_general" in r for r in val)
    dom = [r["val_loss_domain"] for r in val]
    assert dom[0] > dom[1] > dom[2], dom
    assert dom[0] - dom[2] > 0.1, dom
    # train loss falls too (mean of the last 5 steps vs the first 5)
    first = sum(r["train_loss"] for r in recs[:5]) / 5
    last = sum(r["train_loss"] for r in recs[-5:]) / 5
    assert last < first - 0.1, (first, last)
    # LR: linear warmup to the peak, then cosine decay towards min_lr (max = 0.10 x the tiny base LR; min = 10% of it)
    from ellama_recipes.model.sizes import get_size

    max_lr = 0.10 * get_size("tiny").base_max_lr
    lrs = [r["lr"] for r in recs]
    peak = max(lrs)
    assert peak == pytest.approx(max_lr, rel=1e-3)
    assert lrs[-1] < lrs[lrs.index(peak) + 1] and lrs[-1] >= 0.1 * max_lr * (1 - 1e-3)
    # checkpoints every 20 steps + the final one; TensorBoard events
    names = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    # identified by consumed samples (steps x global batch 8), whatever step number the name carries
    assert any(n.endswith("consumed_samples=160.0") for n in names), names
    assert any("consumed_samples=240.0" in n for n in names), names
    events = list((reference_run / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(events[0]))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"reduced_train_loss", "lr", "val_loss_domain", "val_loss_general"} <= tags, tags
    assert len(ea.Scalars("val_loss_domain")) == 3
    assert all(r.get("step_time_s", 0) > 0 for r in recs)
    assert json.loads((reference_run / "resume.json").read_text()) == {"resumed_from": None}


def test_sigkill_and_resume_matches_uninterrupted_run(cpt_inputs, reference_run, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(cpt_inputs, out)
    log1 = tmp_path / "log1.txt"
    with open(log1, "w") as f:
        # its own process group, so the SIGKILL takes the run's children and nothing of pytest's
        proc = subprocess.Popen([sys.executable, str(KILL_DRIVER), str(KILL_AFTER), *_args(cpt_inputs, out)], stdout=f,
                                stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a no-op when the run killed its group itself
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log1.read_text()[-3000:]
    assert [r["step"] for r in _metrics(out)] == list(range(1, KILL_AFTER + 1))
    # nothing of the killed run survives it (data-loader workers, resource tracker)
    survivors = {p: c for p, c in leaked_processes(grace_s=5.0).items() if str(out) in c or "multiprocessing" in c}
    assert not survivors, survivors

    # Plant a newer half-written checkpoint (NeMo's -unfinished marker) and a newer corrupt one (truncated
    # shard): resume must skip both, say so, and continue from the last complete checkpoint (step 20).
    ckpts = out / "checkpoints"
    good = next(p for p in ckpts.iterdir() if p.is_dir() and p.name.endswith("consumed_samples=160.0"))
    partial = ckpts / "cpt--step=22-consumed_samples=184.0"
    shutil.copytree(good, partial)
    Path(str(partial) + "-unfinished").touch()
    corrupt = ckpts / "cpt--step=23-consumed_samples=192.0-last"
    shutil.copytree(good, corrupt)
    shard = sorted((corrupt / "weights").glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)

    log2 = tmp_path / "log2.txt"
    proc2 = _run(cmd, log2)
    text = log2.read_text()
    assert proc2.returncode == 0, text[-5000:]
    assert f"skipping checkpoint {corrupt}: corrupt: weights/{shard.name} is truncated" in text
    assert f"skipping checkpoint {partial}: partial" in text
    assert "resumed from step 20" in text
    assert json.loads((out / "resume.json").read_text()) == {"resumed_from": 20}

    ref, got = _metrics(reference_run), _metrics(out)
    # appended, never duplicated: steps 1..30 exactly once
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    # Same seed, same data order, restored optimizer + LR schedule: on CPU (one process, fp32, deterministic
    # kernels) the resumed run reproduces the uninterrupted one bit for bit; the tolerance only absorbs printing.
    for a, b in zip(ref, got):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6, abs=1e-7), (a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-6), (a, b)
        for k in ("val_loss_domain", "val_loss_general"):
            assert (k in a) == (k in b), (a, b)
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-7), (a, b)
    assert got[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-6, abs=1e-7)


def test_partial_or_corrupt_checkpoints_are_detected_and_skipped(reference_run, tmp_path, capsys):
    from ellama_recipes.engine.resume import checkpoint_problem, find_resumable

    src = reference_run / "checkpoints"
    good = next(p for p in src.iterdir() if p.name.endswith("consumed_samples=160.0"))
    d = tmp_path / "checkpoints"
    d.mkdir()
    shutil.copytree(good, d / good.name)
    assert checkpoint_problem(d / good.name) is None

    def plant(step: int, damage) -> Path:
        p = d / f"cpt--step={step}-consumed_samples={8.0 * (step + 1)}"
        shutil.copytree(good, p)
        damage(p)
        return p

    cases = {
        plant(21, lambda p: Path(str(p) + "-unfinished").touch()): "partial",
        plant(22, lambda p: (p / "context" / "io.json").unlink()): "context/io.json is missing",
        plant(23, lambda p: (p / "weights" / ".metadata").unlink()): "weights/.metadata is missing",
        plant(24, lambda p: (p / "weights" / ".metadata").write_bytes(b"\x80garbage")): "cannot be read",
        plant(25, lambda p: sorted((p / "weights").glob("*.distcp"))[-1].unlink()): ".distcp is missing",
        plant(26, lambda p: shutil.rmtree(p / "weights")): "weights/metadata.json is missing",
    }
    (d / "cpt--step=27-consumed_samples=224.0").mkdir()  # an empty directory
    for path, why in cases.items():
        problem = checkpoint_problem(path)
        assert problem is not None and why in problem, (path.name, problem)

    lines: list[str] = []
    assert find_resumable(d, report=lines.append) == d / good.name
    assert len(lines) == len(cases) + 1 and all(line.startswith("[ellama] skipping checkpoint") for line in lines)
    assert find_resumable(tmp_path / "nothing-here") is None


def test_architecture_comes_from_the_from_checkpoint(cpt_inputs):
    """`--size` picks the recipe defaults; the model shape is the `--from` checkpoint's (here: tiny under 8b)."""
    from ellama_recipes.recipes import get_recipe
    from ellama_recipes.model.architecture import from_checkpoint
    from ellama_recipes.recipes.pretrain import build_config as build_pretrain_config
    from ellama_recipes.model.sizes import SIZES

    cfg = build_pretrain_config("8b", restore_from=str(cpt_inputs.base))
    mc = get_recipe("pretrain").build_partial(cfg).model.config
    tiny = SIZES["tiny"].arch
    assert (mc.num_layers, mc.hidden_size, mc.num_query_groups, mc.vocab_size) == (
        tiny.num_layers, tiny.hidden_size, tiny.num_query_groups, tiny.vocab_size)
    assert mc.old_context_len == tiny.original_max_position_embeddings
    assert mc.seq_length == SIZES["8b"].seq_length  # the recipe's, not the checkpoint's
    spec = from_checkpoint(cpt_inputs.base)
    assert spec["num_layers"] == tiny.num_layers and spec["rope_theta"] == tiny.rope_theta


def test_dangling_last_link_is_skipped(reference_run, tmp_path):
    from ellama_recipes.engine.resume import checkpoint_problem, find_resumable

    good = next(p for p in (reference_run / "checkpoints").iterdir() if p.name.endswith("consumed_samples=160.0"))
    d = tmp_path / "checkpoints"
    d.mkdir()
    shutil.copytree(good, d / good.name)
    link = d / "cpt--step=29-consumed_samples=240.0-last"
    link.symlink_to("cpt--step=29-consumed_samples=240.0")  # its target was never written
    assert "does not exist" in checkpoint_problem(link)
    ok_link = d / (good.name + "-last")
    ok_link.symlink_to(good.name)
    assert checkpoint_problem(ok_link) is None
    lines: list[str] = []
    assert find_resumable(d, report=lines.append) in (ok_link, d / good.name)
    assert len(lines) == 1 and str(link) in lines[0]


_VAL_PROBE = """
import json, sys
from collections import Counter
if __name__ == "__main__":
    base, manifest, out, per_side = sys.argv[1:5]
    from ellama_recipes.engine import pretrain_data
    seen = []
    get = pretrain_data.SideConcatDataset.__getitem__
    def counted(self, idx):
        seen.append("domain" if idx // self.per_side == 0 else "general")
        return get(self, idx)
    pretrain_data.SideConcatDataset.__getitem__ = counted
    from ellama_recipes.recipes.pretrain import build_config
    from ellama_recipes.workflows.launch import run_in_process
    cfg = build_config("tiny", restore_from=base, manifest=manifest, out_dir=out, train_steps=2,
                       overrides=["schedule.val_check_interval=2", f"schedule.limit_val_batches={per_side}",
                                  "schedule.micro_batch_size=1"])
    run_in_process(cfg)
    print("VAL " + json.dumps({"samples": dict(Counter(seen)), "global_batch": cfg.schedule.global_batch_size}))
"""


def test_per_source_validation_runs_limit_val_batches_global_batches_per_side(cpt_inputs, tmp_path):
    """`schedule.limit_val_batches` = N means N GLOBAL batches of domain text, then N of general text (what the
    docs say), counted in the samples the validation really reads, at 8 micro batches per step: the loader holds
    exactly those and the trainer runs all of it (not an integer limit in Lightning's own units)."""
    script = tmp_path / "probe.py"
    script.write_text(_VAL_PROBE)
    per_side = 3
    proc = subprocess.run([sys.executable, str(script), str(cpt_inputs.base), str(cpt_inputs.manifest),
                           str(tmp_path / "run"), str(per_side)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("VAL "))[4:])
    want = per_side * got["global_batch"]
    assert got["samples"] == {"domain": want, "general": want}, got
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "val_loss_domain" in rows[-1] and "val_loss_general" in rows[-1], rows[-1]
