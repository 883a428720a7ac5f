"""`ellama pretrain --dryrun`: the resolved plan and the launch, built through the real NeMo recipe, no GPU."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.engine

JSON_KEYS = {
    "size", "lr", "min_lr", "warmup_steps", "global_batch_size", "micro_batch_size", "seq_length", "train_steps",
    "tokens_per_step", "total_tokens", "tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
    "context_parallel", "sequence_parallel", "data_parallel", "num_nodes", "gpus_per_node", "precision",
    "data_manifest",
}


def test_70b_dryrun_table_and_torchrun(cli):
    r = cli("pretrain", "--size", "70b", "--dryrun")
    assert r.code == 0, r.err
    assert "resolved plan" in r.out and "1.5e-05" in r.out
    assert "torchrun" in r.out and "--nnodes 60" in r.out and "--nproc-per-node 8" in r.out
    assert "<unset: pass --data" in r.out  # the manifest placeholder
    assert "nothing was launched" in r.out


# Independent expectations (the e-Llama recipe and DESIGN.md), not recomputed from the summary itself:
# size: (data_parallel, tokens_per_step, total_tokens)
EXPECTED = {
    "tiny": (1, 8 * 256, 8 * 256 * 40),
    "8b": (32, 11_796_480, 1_002_700_800_000),  # 64 GPUs / TP2
    "70b": (15, 11_796_480, 1_002_700_800_000),  # 480 GPUs / (TP4 PP4 CP2)
    "405b": (4, 11_796_480, 1_002_700_800_000),  # 1152 GPUs / (TP8 PP18 CP2)
}


@pytest.mark.parametrize("size", ["tiny", "8b", "70b", "405b"])
def test_dryrun_json_has_contract_keys(cli, size):
    r = cli("pretrain", "--size", size, "--dryrun", "--json")
    assert r.code == 0, r.err
    d = r.json()  # stdout is exactly one JSON object
    assert JSON_KEYS <= set(d)
    assert d["size"] == size
    assert (d["data_parallel"], d["tokens_per_step"], d["total_tokens"]) == EXPECTED[size]
    # the launch shown is the one of this config: torchrun with one process per GPU on every node
    launch = d["launch"]
    if size == "tiny":
        assert launch["executor"] == "in-process" and launch["command"] is None
    else:
        cmd = launch["command"]
        assert f"--nnodes {d['num_nodes']}" in cmd and f"--nproc-per-node {d['gpus_per_node']}" in cmd
        assert "nemo_run.core.runners.fdl_runner" in cmd


def test_dryrun_json_flags_and_overrides(cli, tmp_path):
    manifest = tmp_path / "manifest.json"
    r = cli(
        "pretrain", "--size", "8b", "--nodes", "2", "--fp8", "--fp8-recipe", "current", "--data", manifest,
        "--dryrun", "--json", "schedule.lr_fraction=0.2", "schedule.global_batch_size=512",
    )
    assert r.code == 0, r.err
    d = r.json()
    assert d["precision"] == "fp8-current"
    assert d["num_nodes"] == 2 and d["data_parallel"] == 8
    assert d["lr"] == pytest.approx(0.2 * 3e-4)
    assert d["global_batch_size"] == 512
    assert d["data_manifest"] == str(manifest)


def test_slurm_dryrun_produces_sbatch_script(cli, tmp_path):
    r = cli(
        "pretrain", "--size", "70b", "--executor", "slurm", "--out", tmp_path / "run", "--dryrun", "--json",
        "cluster.slurm_account=llm", "cluster.slurm_partition=h100",
    )
    assert r.code == 0, r.err
    launch = r.json()["launch"]
    assert launch["executor"] == "slurm"
    script = launch["script"]
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --nodes=60", "#SBATCH --account=llm", "#SBATCH --partition=h100", "#SBATCH --gpus-per-node=8"):
        assert line in script
    assert "srun" in script and "torchrun" in script and "--nnodes 60" in script and "--nproc-per-node 8" in script
    assert "--container-image nvcr.io/nvidia/nemo" in script
    # a failed job is requeued by the script (cluster.slurm_retries) and the dry run says what the time limit does
    assert "export TORCHX_MAX_RETRIES=3" in script and "scontrol requeue" in script
    assert "#SBATCH --time=04:00:00" in script
    notes = " ".join(launch["notes"])
    assert "cluster.slurm_time=04:00:00" in notes and "not requeued" in notes and "ellama-cpt-70b.sbatch" in notes
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_slurm_dryrun_table_shows_script(cli):
    r = cli("pretrain", "--size", "405b", "--executor", "slurm", "--dryrun")
    assert r.code == 0, r.err
    assert "sbatch script" in r.out and "#SBATCH" in r.out


def test_tiny_dryrun_runs_in_process(cli):
    d = cli("pretrain", "--size", "tiny", "--dryrun", "--json").json()
    assert d["launch"]["executor"] == "in-process"
    assert d["precision"] == "32" and d["world_size"] == 1


def test_multi_process_dryrun_shows_the_venv_torchrun(cli, tmp_path):
    """The command is NeMo-Run's own materialization, with the torchrun of this interpreter (not PATH's)."""
    import sys
    from pathlib import Path

    r = cli("pretrain", "--size", "tiny", "--gpus-per-node", "2", "--out", tmp_path / "run", "--dryrun", "--json",
            "parallel.tensor_parallel=2")
    assert r.code == 0, r.err
    cmd = r.json()["launch"]["command"]
    assert cmd.split()[0] == str(Path(sys.executable).parent / "torchrun")
    assert "--nproc-per-node 2" in cmd and "--nnodes 1" in cmd
    assert "$${" not in cmd  # no unexpanded NeMo-Run macros
    assert not (tmp_path / "run").exists()
