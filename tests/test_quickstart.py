"""`ellama quickstart` end to end on CPU: trained tiny base -> import -> data -> CPT -> (SFT -> DPO) -> export -> eval.

One slow test (~3-4 minutes on 2 cores) with shortened stages (--base-steps, --steps, --align-steps, --eval-limit);
the full-length run is `make quickstart`, timed by benchmarks/bench_quickstart.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from ellama_recipes.cli.main import main
from ellama_recipes.workflows.quickstart import align_available


@pytest.mark.slow
@pytest.mark.engine
def test_quickstart_end_to_end_and_resume(tmp_path):
    # The CLI in a child process, as users run it (in-process training leaves DataLoader workers to the process's
    # exit). ELLAMA_CACHE: build and pretrain the tiny base here, for real.
    env = {**os.environ, "ELLAMA_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "qs"
    args = [sys.executable, "-m", "ellama_recipes", "quickstart", "--out", str(out), "--base-steps", "20",
            "--steps", "10", "--align-steps", "2", "--eval-limit", "24"]

    def run() -> str:
        p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    printed = run()
    report = json.loads((out / "report.json").read_text())

    aligned = align_available()
    names = ["tiny base (pretrained on general text)", "import-hf", "data build", "pretrain (CPT)", "export-hf (CPT)"]
    names += ["align (SFT -> DPO)", "export-hf (aligned)"] if aligned else []
    names += ["eval"]
    assert list(report["stages"]) == names
    assert all(report["stages"][n] > 0 for n in names), report["stages"]
    for key in ("domain_gain_pct", "general_regression_pct"):
        assert isinstance(report[key], float) and math.isfinite(report[key])
        assert f"{report[key]:+.2f}" in printed  # the final line prints the two numbers
    final = out / ("hf" if aligned else "cpt_hf")
    assert report["hf_dir"] == str(final) and report["final_model"] == ("aligned" if aligned else "cpt")
    assert [r["model"] for r in report["eval"]] == (["base", "cpt", "aligned"] if aligned else ["base", "cpt"])
    assert report["eval"][0]["domain_gain_pct"] is None and report["eval"][-1]["domain_gain_pct"] == report["domain_gain_pct"]

    # the base learned general text before import (a random-init base makes "regression" meaningless)
    base_rec = json.loads((out / "base_hf" / "ellama_base_pretrain.json").read_text())
    assert base_rec["steps"] == 20 and base_rec["last_loss"] < base_rec["first_loss"] - 1.0
    # CPT made the domain text more likely than the base found it (perplexity on the manifest's validation split)
    base_row, cpt_row = report["eval"][0], report["eval"][1]
    assert cpt_row["ppl_domain"] < base_row["ppl_domain"]
    assert set(report["eval"][0]["tasks"]) >= {"ecom_product_classification", "general_en_continuation"}
    assert (out / "cpt" / "forgetting.png").read_bytes()[:4] == b"\x89PNG"  # written by pretraining's callback
    assert (out / "eval" / "eval.png").is_file() and (out / "eval" / "eval.json").is_file()

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 4

    # re-running reuses every finished stage (pretraining re-enters the trainer, which has nothing left to do)
    run()
    again = json.loads((out / "report.json").read_text())
    reused = [d["name"] for d in again["stage_details"] if d["reused"]]
    assert reused == [n for n in names if n not in ("pretrain (CPT)", "align (SFT -> DPO)")]
    assert again["domain_gain_pct"] == report["domain_gain_pct"]


def test_dryrun_lists_every_stage_with_its_command(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--dryrun", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    names = [s["stage"] for s in stages]
    assert names[0] == "tiny base (pretrained on general text)" and names[-1] == "eval"
    assert "ellama eval --model" in stages[-1]["command"] and "--data" in stages[-1]["command"]
    assert ("align (SFT -> DPO)" in names) == align_available()
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--dryrun", "--json", "--no-align"]) == 0
    assert "align (SFT -> DPO)" not in [s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert not (tmp_path / "q").exists()
