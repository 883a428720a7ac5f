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


@pytest.mark.parametrize("size", ["tiny", "8b", "70b", "405b"])
def test_dryrun_json_has_contract_keys(cli, size):
    r = cli("pretrain", "--size", size, "--dryrun", "--json")
    assert r.code == 0, r.err
    d = r.json()  # stdout is exactly one JSON object
    assert JSON_KEYS <= set(d)
    assert d["size"] == size
    assert d["tensor_parallel"] * d["pipeline_parallel"] * d["context_parallel"] * d["data_parallel"] == (
        d["num_nodes"] * d["gpus_per_node"]
    )
    assert d["tokens_per_step"] == d["global_batch_size"] * d["seq_length"]
    assert d["total_tokens"] == d["tokens_per_step"] * d["train_steps"]


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
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_slurm_dryrun_table_shows_script(cli):
    r = cli("pretrain", "--size", "405b", "--executor", "slurm", "--dryrun")
    assert r.code == 0, r.err
    assert "sbatch script" in r.out and "#SBATCH" in r.out


def test_tiny_dryrun_runs_in_process(cli):
    d = cli("pretrain", "--size", "tiny", "--dryrun", "--json").json()
    assert d["launch"]["executor"] == "in-process"
    assert d["precision"] == "32" and d["world_size"] == 1
