"""`ellama align` surface: the dry run of both stages (JSON keys, sbatch script per stage), --from resolution,
override routing, and bad data (table, rejects with file:line, exit 2) -- no training here (see test_sft.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLE_DATA

KEYS = {"lr", "min_lr", "global_batch_size", "micro_batch_size", "seq_length", "train_steps", "tensor_parallel",
        "pipeline_parallel", "context_parallel", "data_parallel", "precision"}


def _args(frm, out, *extra, sft=SAMPLE_DATA / "sft", dpo=SAMPLE_DATA / "preference", size="tiny"):
    return ["align", "--size", size, "--from", str(frm), "--sft", str(sft), "--dpo", str(dpo), "--out", str(out),
            *map(str, extra)]


@pytest.fixture(scope="module")
def cpt_run(tiny_base, tmp_path_factory) -> Path:
    """A pretraining-like run folder: a complete checkpoint at step 5 and a half-written one at step 9."""
    run = tmp_path_factory.mktemp("cpt") / "cpt"
    ck = run / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copytree(tiny_base, ck / "cpt--step=5-consumed_samples=40.0")
    shutil.copytree(tiny_base, ck / "cpt--step=9-consumed_samples=72.0")
    (ck / "cpt--step=9-consumed_samples=72.0-unfinished").write_text("")
    return run


def test_dryrun_json_has_both_stages_and_resolves_a_run_folder(cli, cpt_run, tmp_path):
    r = cli(*_args(cpt_run, tmp_path / "run2", "--sft-steps", 7, "--dpo-steps", 5, "--dryrun", "--json",
                   "dpo.loss.beta=0.25", "sft.optimizer.weight_decay=0.01", "checkpoint.keep_last=3"))
    assert r.code == 0, r.err
    plan = r.json()
    assert set(plan) == {"sft", "dpo"}
    for stage in plan:
        assert KEYS <= set(plan[stage]), KEYS - set(plan[stage])
    assert {"beta", "sft_loss_weight"} <= set(plan["dpo"])
    assert plan["sft"]["train_steps"] == 7 and plan["dpo"]["train_steps"] == 5
    # --from RUN: its latest COMPLETE checkpoint (step 9 is half-written), as export-hf picks it
    assert plan["sft"]["restore_from"].endswith("cpt--step=5-consumed_samples=40.0")
    assert plan["sft"]["run_dir"] == str(tmp_path / "run2" / "sft")
    assert plan["dpo"]["run_dir"] == str(tmp_path / "run2" / "dpo")
    # overrides: sft.* only to SFT, dpo.* only to DPO, unprefixed to both
    assert plan["dpo"]["beta"] == 0.25
    assert plan["sft"]["config"]["optimizer"]["weight_decay"] == 0.01
    assert plan["dpo"]["config"]["optimizer"]["weight_decay"] != 0.01
    assert plan["sft"]["config"]["checkpoint"]["keep_last"] == plan["dpo"]["config"]["checkpoint"]["keep_last"] == 3
    assert not (tmp_path / "run2").exists()  # a dry run prepares and trains nothing


def test_default_sft_steps_follow_the_data(cli, cpt_run, tmp_path):
    plan = cli(*_args(cpt_run, tmp_path / "r", "--dryrun", "--json")).json()
    rows = sum(1 for f in (SAMPLE_DATA / "sft").glob("*.jsonl") for line in f.open() if line.strip())
    s = plan["sft"]
    expected = -(-2 * round(rows * 0.95) // s["global_batch_size"])  # 2 epochs (Tulu 3) over the training rows
    assert s["train_steps"] == expected and s["epochs"] == 2


def test_real_size_defaults_cite_their_source(cli, tmp_path):
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--dryrun", "--json", size="8b"))
    assert r.code == 0, r.err
    sft, dpo = r.json()["sft"], r.json()["dpo"]
    assert (sft["lr"], sft["global_batch_size"], sft["seq_length"]) == (5e-6, 128, 4096)
    assert "Tulu 3" in sft["lr_source"]
    assert (dpo["lr"], dpo["beta"], dpo["sft_loss_weight"]) == (1e-5, 0.1, 0.2)
    assert sft["precision"] == dpo["precision"] == "bf16-mixed"


def test_slurm_dryrun_shows_an_sbatch_script_per_stage(cli, tmp_path):
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--executor", "slurm", "--dryrun", "--json",
                   "cluster.slurm_account=llm", size="8b"))
    assert r.code == 0, r.err
    plan = r.json()
    for stage in ("sft", "dpo"):
        script = plan[stage]["launch"]["script"]
        assert script and "#SBATCH --account=llm" in script and f"-n {stage}" in script, script[:2000]
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--executor", "slurm", "--dryrun", size="8b"))
    assert r.code == 0 and r.out.count("sbatch script") == 2


def test_validate_rules_apply_to_both_stages(cli, tmp_path):
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--dryrun", "sft.parallel.tensor_parallel=3", size="8b"))
    assert r.code == 2 and "SFT config" in r.err and "tensor_parallel=3" in r.err
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--dryrun", "dpo.loss.beta=-1", size="8b"))
    assert r.code == 2 and "DPO config" in r.err and "beta" in r.err
    r = cli(*_args("/cluster/runs/cpt", tmp_path / "r", "--dryrun", "sft.schedule.no_such_key=1", size="8b"))
    assert r.code == 2 and "no_such_key" in r.err


def test_nothing_valid_exits_2_with_table_and_rejects(cli, tiny_base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": ""}\n{"messages": [{"role": "wizard", "content": "x"}]}\n{oops\n')
    r = cli(*_args(tiny_base, tmp_path / "run2", sft=bad))
    assert r.code == 2, r.out + r.err
    assert "No valid sft rows: 3 read, 0 kept" in r.err and "Traceback" not in r.err
    rejects = tmp_path / "run2" / "sft" / "data" / "rejects.jsonl"
    assert str(rejects) in " ".join(r.err.split())
    got = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [g["source"] for g in got] == [f"{bad}:{i}" for i in (1, 2, 3)]
    assert [g["reason"] for g in got] == ["empty_response", "unknown_role", "malformed_json"]
    assert "ellama align: data rows" in r.out  # the table is printed before the error
    assert not (tmp_path / "run2" / "sft" / "checkpoints").exists()


def test_missing_from_is_exit_2(cli, tmp_path):
    r = cli(*_args(tmp_path / "nope", tmp_path / "r"))
    assert r.code == 2 and "does not exist" in r.err
    assert not (tmp_path / "r").exists()
