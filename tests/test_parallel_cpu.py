"""3D parallelism that has actually run: TP / PP / VPP / DP as CPU processes over gloo, launched by the real
`ellama pretrain` -> NeMo-Run LocalExecutor -> torchrun path, against the single-process run; checkpoints
resharded both ways (TP1 -> TP2 x PP2 -> TP1 and TP1 x PP2).

Same inputs (tiny base checkpoint, data manifest), global batch (8), data order and seed everywhere; the LR is held
constant (``schedule.min_lr_ratio=1.0``, no warmup at 5 steps) so a run resumed from a step-2 or step-4 checkpoint
sees the same schedule as an uninterrupted one.

Tolerance: train / validation loss per step within ``TOL`` = 1e-4 absolute (loss ~8: ~1e-5 relative) of the
single-process run. Measured on 2 CPU cores (Nov 26 2026, `pytest -s tests/test_parallel_cpu.py` prints them):
TP2 0, PP2 9.5e-7, PP2 x VPP2 0, DP2 9.5e-7, TP2 x PP2 9.5e-7 (5 steps); resumed TP1 -> TP2 x PP2 (steps 3-5) 4.8e-7,
TP2 x PP2 -> TP1 (step 5) 9.5e-7, TP2 x PP2 -> TP1 x PP2 (step 5) 1.4e-6 (reduction order).
PP2 x VPP2 used to miss by 4.7e-3 at step 1 (8.36056 vs 8.36531): megatron-core's batched P2P swaps activation
and gradient at pipeline size 2; engine.blocks.p2p_fields turns it off there (see the probe test below).

Runtime: about 7 min on 2 cores incl. the shared tiny fixtures (one 1-process run, four 2-process runs, a
4-process run, a 1-process checkpoint resumed in 4 processes, its checkpoint resumed in 1 and in 2 processes,
export / import / export of the tiny model, a 2-rank megatron P2P probe, a failing 2-process launch).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_console, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.engine]

STEPS = 5
TOL = 1e-4
TIMEOUT = 600
COMMON = ["schedule.min_lr_ratio=1.0", "schedule.limit_val_batches=1"]


def _pretrain(inputs, out: Path, nproc: int, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "ellama_recipes", "pretrain", "--size", "tiny", "--gpus-per-node", str(nproc),
        "--from", str(inputs.base), "--data", str(inputs.manifest), "--out", str(out), "--steps", str(steps),
        *COMMON, *overrides,
    ]
    return run_console(cmd, out.parent / f"{out.name}.console.txt", TIMEOUT)


def _metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x)}


def _assert_same_losses(got: dict[int, dict], ref: dict[int, dict], steps) -> float:
    worst = 0.0
    for s in steps:
        for key in ("train_loss", "val_loss_domain", "val_loss_general"):
            if key in ref[s] and (key == "train_loss" or key in got[s]):
                diff = abs(got[s][key] - ref[s][key])
                assert diff <= TOL, f"step {s} {key}: {got[s][key]} vs single-process {ref[s][key]}"
                worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def single(tiny_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("par") / "single"
    # checkpoints at steps 2 and 4 (and the final 5), all kept: the resharding test resumes from step 2
    proc = _pretrain(tiny_inputs, out, 1, STEPS, "checkpoint.save_every=2", "checkpoint.keep_last=3")
    assert proc.returncode == 0, proc.console[-4000:]
    recs = _metrics(out)
    assert sorted(recs) == list(range(1, STEPS + 1))
    assert recs[STEPS]["train_loss"] < recs[1]["train_loss"]  # it learns
    return out


@pytest.mark.parametrize(
    "name,nproc,overrides",
    [
        ("tp2", 2, ["parallel.tensor_parallel=2"]),
        ("pp2", 2, ["parallel.pipeline_parallel=2"]),
        # interleaved schedule; needs unbatched P2P at PP=2 (engine.blocks.p2p_fields)
        ("pp2vpp2", 2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2"]),
        ("dp2", 2, []),
        # 4 processes, fresh from the base for all 5 steps (the resharding test below resumes this layout mid-run)
        ("tp2pp2", 4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    ],
)
def test_parallel_run_matches_single_process(single, tiny_inputs, tmp_path, name, nproc, overrides):
    out = tmp_path / name
    proc = _pretrain(tiny_inputs, out, nproc, STEPS, *overrides)
    assert proc.returncode == 0, proc.console[-4000:]
    got, ref = _metrics(out), _metrics(single)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = _assert_same_losses(got, ref, range(1, STEPS + 1))
    print(f"{name}: max |loss - single-process loss| over {STEPS} steps = {worst:.2e}")
    # the same run folder as the single process; the checkpoint is named by the step metrics.jsonl uses
    assert list((out / "checkpoints").glob(f"cpt--step={STEPS}-consumed_samples={8.0 * STEPS}*"))
    # rank 0 on the console, rank 1 in its own file (not interleaved)
    rank1 = out / "logs" / "ranks" / "rank-1.log"
    assert rank1.is_file() and rank1.stat().st_size > 0
    assert "[default1]" not in proc.console and "[default0]" in proc.console
    assert "state: SUCCEEDED" in proc.console
    # the printed job folder exists
    job_dir = next(line.split("job_dir:", 1)[1].strip() for line in proc.console.splitlines() if " job_dir: " in line)
    assert Path(job_dir).is_dir() and str(job_dir).startswith(str(out / "launch"))


def _copy_until(run: Path, dst: Path, step: int) -> Path:
    """``run`` as it was after ``step``: a copy without the later checkpoints and without the launch folder (the
    resumed run truncates metrics.jsonl after the step it resumes from)."""
    shutil.copytree(run, dst, symlinks=True)
    shutil.rmtree(dst / "launch", ignore_errors=True)
    for c in (dst / "checkpoints").iterdir():
        m = re.search(r"--step=(\d+)-", c.name)
        if m and int(m.group(1)) > step:
            c.unlink() if c.is_symlink() else shutil.rmtree(c)
    assert [c.name for c in (dst / "checkpoints").iterdir() if f"--step={step}-" in c.name]
    return dst


def _resume(inputs, run: Path, nproc: int, *overrides: str) -> dict[int, dict]:
    proc = _pretrain(inputs, run, nproc, STEPS, *overrides)
    assert proc.returncode == 0, proc.console[-4000:]
    assert "resuming from checkpoint" in proc.console
    got = _metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert "val_loss_domain" in got[STEPS] and "val_loss_general" in got[STEPS]  # validated after the last step
    return got


def test_resharded_resume_tp1_to_tp2pp2_to_tp1_and_tp1pp2_and_export(single, tiny_inputs, tmp_path):
    """Resharding both ways, each checked against the single-process run (train and validation losses):

    - the 1-process run's step-2 checkpoint (TP1 x PP1) resumed at TP2 x PP2 (4 processes) for steps 3..5;
    - that run's step-4 checkpoint (written by 4 ranks at TP2 x PP2) resumed at TP1 x PP1 (1 process) and at
      TP1 x PP2 (2 processes) for step 5.

    `ellama export-hf` of the TP2 x PP2 checkpoint is bit-identical to the export of the same weights written at
    TP1 (export -> import-hf -> export)."""
    ref = _metrics(single)
    tp2pp2 = ("parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    run = _copy_until(single, tmp_path / "tp1_to_tp2pp2", 2)
    worst = _assert_same_losses(_resume(tiny_inputs, run, 4, *tp2pp2, "checkpoint.save_every=2"), ref, [3, 4, 5])
    print(f"tp1 -> tp2pp2 (steps 3-5): max |loss - single-process loss| = {worst:.2e}")
    ckpt = next((run / "checkpoints").glob("cpt--step=4-consumed_samples=32.0*"))

    for name, nproc, overrides in (("tp1", 1, ()), ("tp1pp2", 2, ("parallel.pipeline_parallel=2",))):
        resumed = _copy_until(run, tmp_path / f"tp2pp2_to_{name}", 4)
        diff = _assert_same_losses(_resume(tiny_inputs, resumed, nproc, *overrides), ref, [5])
        print(f"tp2pp2 -> {name} (step 5): max |loss - single-process loss| = {diff:.2e}")

    def cli(*args: str) -> None:
        p = subprocess.run([sys.executable, "-m", "ellama_recipes", *args, "--no-progress"], capture_output=True,
                           text=True, env=subprocess_env(), timeout=TIMEOUT)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    hf_a, base_tp1, hf_b = tmp_path / "hf_a", tmp_path / "base_tp1", tmp_path / "hf_b"
    cli("export-hf", "--from", str(ckpt), "--out", str(hf_a))
    cli("import-hf", "--from", str(hf_a), "--out", str(base_tp1))
    cli("export-hf", "--from", str(base_tp1), "--out", str(hf_b))
    from safetensors.torch import load_file

    a, b = load_file(hf_a / "model.safetensors"), load_file(hf_b / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].equal(b[k]), k


_P2P_PROBE = """
import json, sys
import torch
import torch.distributed as dist
from ellama_recipes.engine import cpu_compat
cpu_compat.apply_conversion_redirects()  # torch.cuda.current_device / synchronize -> CPU
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
got = {}
for batched in (True, False):
    cfg = ModelParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                              pipeline_dtype=torch.float32, batch_p2p_comm=batched)
    comm = P2PCommunicator(dist.new_group([0, 1]), cfg)
    # the interleaved schedule's steady state: activation to next, gradient to prev, both received back
    act, grad = comm.send_forward_backward_recv_forward_backward(
        torch.full((4,), 10.0 * rank + 1), torch.full((4,), 10.0 * rank + 2), recv_prev=True, recv_next=True,
        tensor_shape=(4,))
    got["batched" if batched else "unbatched"] = [act[0].item(), grad[0].item()]
json.dump(got, open(out, "w"))
dist.destroy_process_group()
"""


def test_megatron_batched_p2p_crosses_activation_and_gradient_at_pipeline_size_2(tmp_path):
    """Why engine.blocks.p2p_fields turns megatron-core's batched P2P off for VPP at PP = 2 (what made PP2 x VPP2
    miss the single-process losses): two ranks exchange an activation (10*rank+1, to next) and a gradient (10*rank+2,
    to prev) with megatron-core's own P2PCommunicator. Batched, each rank receives the peer's gradient as its
    activation and vice versa; unbatched, the right ones. When megatron-core stops crossing them, this fails: then
    p2p_fields can go."""
    from ellama_recipes.engine.blocks import p2p_fields
    from ellama_recipes.recipes.pretrain import build_config

    def cfg(*o: str):
        return build_config("tiny", manifest="/m.json", restore_from="/ckpt", overrides=[*o, "cluster.gpus_per_node=4"])

    assert p2p_fields(cfg("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2")) == {
        "batch_p2p_comm": False, "overlap_p2p_comm": False}
    assert p2p_fields(cfg("parallel.pipeline_parallel=2")) == {}  # no interleaving: one message each way

    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, "-c", _P2P_PROBE, str(r), init, str(tmp_path / f"r{r}.json")],
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
    got = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1)]
    for rank, peer in ((0, 1), (1, 0)):
        right = [10.0 * peer + 1, 10.0 * peer + 2]  # [activation, gradient] the peer sent
        assert got[rank]["unbatched"] == right
        assert got[rank]["batched"] == right[::-1], "megatron-core's batched P2P no longer crosses: drop p2p_fields"


def test_failing_rank_fails_the_launch(tiny_inputs, tmp_path):
    """A rank that raises ends the whole launch: exit 2, that rank's error first, no process left behind."""
    out = tmp_path / "fail"
    cmd = [
        sys.executable, "-m", "ellama_recipes", "pretrain", "--size", "tiny", "--gpus-per-node", "2",
        "--from", str(tiny_inputs.base), "--data", str(tiny_inputs.manifest), "--out", str(out), "--steps", "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(ELLAMA_FAIL_RANK="1"),
                          timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert "launch failed" in err
    after = err[err.index("launch failed"):].splitlines()
    assert "RuntimeError: ELLAMA_FAIL_RANK=1: rank 1 fails on purpose" in after[1]  # that rank's error, first
    assert "pretrain finished" not in proc.stdout
