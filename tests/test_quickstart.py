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
    names = ["tiny base (pretrained on general text)", "import-hf", "data build", "pretrain (CPT)",
             "pretrain (CPT, no replay)", "export-hf (CPT)", "export-hf (CPT, no replay)"]
    names += ["align (SFT -> DPO)", "export-hf (aligned)"] if aligned else []
    names += ["eval"]
    assert list(report["stages"]) == names
    assert all(report["stages"][n] > 0 for n in names), report["stages"]
    for key in ("domain_gain_pct", "general_regression_pct"):
        assert isinstance(report[key], float) and math.isfinite(report[key])
        assert f"{report[key]:+.2f}" in printed  # the final line prints the two numbers
    final = out / ("hf" if aligned else "cpt_hf")
    assert report["hf_dir"] == str(final) and report["final_model"] == ("aligned" if aligned else "cpt")
    assert [r["model"] for r in report["eval"]] == ["base", "cpt", "cpt_noreplay"] + (["aligned"] if aligned else [])
    assert report["eval"][0]["domain_gain_pct"] is None and report["eval"][-1]["domain_gain_pct"] == report["domain_gain_pct"]

    # the base learned general text before import (a random-init base makes "regression" meaningless)
    base_rec = json.loads((out / "base_hf" / "ellama_base_pretrain.json").read_text())
    assert base_rec["steps"] == 20 and base_rec["last_loss"] < base_rec["first_loss"] - 1.0

    # held-out evaluation: the general documents evaluated are none of those the base trained on (ids and texts),
    # nor any the CPT blend draws from
    trained_ids = set(base_rec["document_ids"])
    eval_rows = [json.loads(x) for x in (out / "splits" / "eval" / "general_heldout.jsonl").read_text().splitlines()]
    assert eval_rows and trained_ids and not trained_ids & {r["id"] for r in eval_rows}
    assert set(report["splits"]["general_eval"]["ids"]) == {r["id"] for r in eval_rows}
    from ellama_recipes.model.tiny import general_documents

    text_of = {d["id"]: d["text"] for d in general_documents()}
    assert len(trained_ids) + len(eval_rows) == len(text_of)
    assert not {text_of[i] for i in trained_ids} & {r["text"] for r in eval_rows}
    blend_texts = {json.loads(x)["text"] for f in (out / "splits" / "general").glob("*.jsonl")
                   for x in f.read_text().splitlines()}
    assert blend_texts and not blend_texts & {r["text"] for r in eval_rows}
    ev = json.loads((out / "eval" / "eval.json").read_text())
    general_sources = ev["models"][0]["perplexity"]["sources"]
    assert sum(s["documents"] for s in general_sources.values() if s["side"] == "general") == len(eval_rows)
    assert "held-out" in report["eval_documents"]["general"]

    # the replay arm: same CPT without general replay, reported side by side
    rep = report["replay"]
    for arm in ("with_replay", "without_replay"):
        for key in ("domain_gain_pct", "general_regression_pct", "ppl_general_regression_pct"):
            assert isinstance(rep[arm][key], float) and math.isfinite(rep[arm][key]), (arm, key)
    noreplay = json.loads((out / "data" / "manifest_noreplay.json").read_text())
    side = {s["prefix"]: s["side"] for s in noreplay["sources"]}
    assert all(w == 0 for w, pre in zip(noreplay["blend"][0::2], noreplay["blend"][1::2]) if side[pre] == "general")
    assert (out / "cpt_noreplay" / "complete.json").is_file()
    flat = " ".join(printed.split())  # rich wraps long lines at the screen width
    assert "1:1 replay" in printed and "no replay" in printed and " ".join(rep["verdict"].split()) in flat
    # CPT made the domain text more likely than the base found it (perplexity on the manifest's validation split)
    base_row, cpt_row = report["eval"][0], report["eval"][1]
    assert cpt_row["ppl_domain"] < base_row["ppl_domain"]
    assert set(report["eval"][0]["tasks"]) >= {"ecom_product_classification", "general_en_continuation"}
    assert (out / "cpt" / "forgetting.png").read_bytes()[:4] == b"\x89PNG"  # written by pretraining's callback
    assert (out / "eval" / "eval.png").is_file() and (out / "eval" / "eval.json").is_file()

    # the aligned model answered a held-out instruction through its chat template; the base continued raw text
    gens = report["generation"]
    assert gens and all(set(g) >= {"model", "prompt", "text", "chat_template"} for g in gens)
    assert any(g["model"] == "base" and g["chat_template"] is False for g in gens)
    if aligned:
        answers = [g for g in gens if g["model"] == "aligned"]
        assert answers and all(g["chat_template"] is True for g in answers)
        held = {json.loads(x)["id"] for x in (out / "splits" / "eval" / "sft_heldout.jsonl").read_text().splitlines()}
        assert all(g["id"] in held for g in answers)
        trained = "\n".join(json.dumps(json.loads(x), ensure_ascii=False) for f in (out / "splits" / "sft").glob("*.jsonl")
                            for x in f.read_text().splitlines() if x.strip())
        assert trained and not any(json.dumps(g["prompt"], ensure_ascii=False)[1:-1] in trained for g in answers)
        # the aligned model's answers to held-out one-word questions, scored against their references
        acc = report["generation_accuracy"]
        cls = [json.loads(x) for x in (out / "splits" / "eval" / "classify_heldout.jsonl").read_text().splitlines()]
        assert acc["questions"] == len(cls) == len(acc["answers"]) > 0 and acc["chance"] == pytest.approx(1 / 6)
        assert [a["id"] for a in acc["answers"]] == [r["id"] for r in cls]
        assert all(a["correct"] == (a["answer"].lower().rstrip(".") == a["reference"] == r["messages"][-1]["content"])
                   for a, r in zip(acc["answers"], cls))
        assert acc["correct"] == sum(a["correct"] for a in acc["answers"])
        assert acc["exact_match"] == pytest.approx(acc["correct"] / acc["questions"])
        assert 0.0 <= acc["cpt"]["exact_match"] <= 1.0
        titles = [r["messages"][0]["content"].splitlines()[1].split(": ", 1)[1] for r in cls]
        assert not any(t in trained for t in titles)  # no held-out product is asked about in the SFT data
        assert (out / "splits" / "sft" / "ecommerce_classify.jsonl").is_file()
        assert f"exact match {acc['correct']}/{acc['questions']}" in flat
        d = report["dpo"]
        assert 0.0 <= report["val_reward_accuracy"] <= 1.0 and math.isfinite(report["val_margin"])
        assert d["val_pairs"] > 0 and math.isfinite(report["alignment"]["ppl_general_regression_vs_cpt_pct"])

    # a readable screen: engine log lines go to OUT/logs, the console keeps ellama's lines
    assert "[NeMo" not in printed and "GPU available" not in printed
    logs = "".join(f.read_text(errors="replace") for f in (out / "logs").glob("*.log"))
    assert "GPU available" in logs or "megatron" in logs.lower()
    assert all(len(line) <= 100 for line in printed.splitlines() if "│" in line or "┃" in line)

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 4

    # re-running reuses every finished stage (pretraining re-enters the trainer, which has nothing left to do)
    run()
    again = json.loads((out / "report.json").read_text())
    reused = [d["name"] for d in again["stage_details"] if d["reused"]]
    assert reused == [n for n in names if n not in ("pretrain (CPT)", "pretrain (CPT, no replay)",
                                                     "align (SFT -> DPO)")]
    assert again["domain_gain_pct"] == report["domain_gain_pct"]


def test_dryrun_lists_every_stage_with_its_command(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--dryrun", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    names = [s["stage"] for s in stages]
    assert names[0] == "tiny base (pretrained on general text)" and names[-1] == "eval"
    assert "ellama eval --model" in stages[-1]["command"] and "--data" in stages[-1]["command"]
    assert ("align (SFT -> DPO)" in names) == align_available()
    assert "pretrain (CPT, no replay)" in names and "manifest_noreplay.json" in stages[names.index(
        "pretrain (CPT, no replay)")]["command"]
    assert "general_heldout.jsonl" in stages[-1]["command"]
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--dryrun", "--json", "--no-align", "--no-replay-arm"]) == 0
    names = [s["stage"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert "align (SFT -> DPO)" not in names and "pretrain (CPT, no replay)" not in names
    assert not (tmp_path / "q").exists()


def test_a_finished_eval_is_redone_for_other_models_or_another_eval_limit(tmp_path):
    """The quickstart skips its eval stage only when eval.json covers the same models with the same --eval-limit and
    is newer than their files (a re-run with `--eval-limit 0` used to reuse the 100-example eval)."""
    from ellama_recipes.workflows.quickstart import _eval_is_current

    models = [tmp_path / "base_hf", tmp_path / "hf"]
    for m in models:
        m.mkdir()
        (m / "config.json").write_text("{}")
    out = tmp_path / "eval"
    out.mkdir()
    assert not _eval_is_current(out, models, 100)  # nothing measured yet
    (out / "eval.json").write_text(json.dumps({"models": [{"model": str(m)} for m in models], "limit": 100}))
    later = max(p.stat().st_mtime for m in models for p in m.iterdir()) + 10
    os.utime(out / "eval.json", (later, later))
    assert _eval_is_current(out, models, 100)
    assert not _eval_is_current(out, models, None)  # --eval-limit 0: every example
    assert not _eval_is_current(out, models[:1], 100)
    (out / "eval.json").write_text(json.dumps({"models": [{"model": str(m)} for m in models]}))  # before "limit"
    os.utime(out / "eval.json", (later, later))
    assert not _eval_is_current(out, models, 100)
