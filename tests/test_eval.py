"""`ellama eval`: perplexity per source, lm-evaluation-harness task suites, the two numbers, forgetting curves.

No NeMo here (the manifest path is exercised by the quickstart test); ~1 minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ellama_recipes.workflows import evaluate as ev
from ellama_recipes.cli.main import main
from ellama_recipes.model.sizes import SIZES
from ellama_recipes.model.tiny import build_tiny_base

ARCH = replace(SIZES["tiny"].arch, num_layers=2)
SAMPLE = Path(ev.__file__).parents[1] / "sample_data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("eval") / "m", arch=ARCH, seed=0)


def _texts(n=6):
    lines = (SAMPLE / "general" / "general_en.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(x)["text"] for x in lines]


def test_perplexity_equals_a_direct_transformers_computation(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    texts = _texts(5)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            assert ids[0, 0] == tok.bos_token_id
            loss = model(input_ids=ids, labels=ids).loss  # mean NLL of tokens 1..n-1
            nll += float(loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    got = ev.perplexity(model, tok, texts, batch_size=3)  # padded batches of unequal lengths
    assert got["tokens"] == n
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    one = ev.perplexity(model, tok, texts[:1])
    direct = math.exp(float(model(**tok(texts[0], return_tensors="pt"), labels=tok(texts[0], return_tensors="pt")["input_ids"]).loss))
    assert one["ppl"] == pytest.approx(direct, rel=1e-5)
    # windows: a long document split into windows of 16 is scored window by window
    w = ev.perplexity(model, tok, texts[:1], max_length=16)
    ids = tok(texts[0])["input_ids"]
    assert w["tokens"] == sum(len(ids[i:i + 16]) - 1 for i in range(0, len(ids), 16) if len(ids[i:i + 16]) > 1)


def test_model_against_itself_is_zero_gain_zero_regression(model_dir, tmp_path):
    (tmp_path / "dom.jsonl").write_text("".join(
        json.dumps({"text": json.loads(x)["description"], "lang": json.loads(x)["lang"]}) + "\n"
        for x in (SAMPLE / "domain" / "products.jsonl").read_text(encoding="utf-8").splitlines()[:6]))
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"text": t, "lang": "en"}) + "\n" for t in _texts(6)))
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--model", str(model_dir), "--data", f"domain={tmp_path / 'dom.jsonl'}",
               "--data", f"general={tmp_path / 'gen.jsonl'}", "--tasks", "ecom_review_sentiment", "--tasks",
               "general_en_continuation", "--limit", "16", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    base, same = report["models"]
    assert same["domain_gain_pct"] == 0.0 and same["general_regression_pct"] == 0.0
    assert same["domain_basis"] == same["general_basis"] == "tasks"
    assert base["tasks"]["ecom_review_sentiment"]["side"] == "domain"
    assert base["tasks"]["general_en_continuation"]["side"] == "general"
    assert base["tasks"]["ecom_review_sentiment"]["samples"] == 16
    assert 0.0 <= base["domain_score"] <= 1.0
    assert set(base["perplexity"]["pooled"]) == {"domain", "general", "general_en"}
    assert base["perplexity"]["pooled"]["general"]["ppl"] > 1.0
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # perplexity-only: the numbers fall back to perplexity, still 0 / 0
    rep = ev.evaluate([model_dir, model_dir], data=[f"general={tmp_path / 'gen.jsonl'}"], tasks=["none"])
    assert rep["models"][1]["general_regression_pct"] == 0.0 and rep["models"][1]["general_basis"] == "perplexity"
    assert rep["models"][1]["domain_gain_pct"] is None  # no domain text and no domain task: nothing to compare


def test_gain_and_regression_follow_the_stated_definitions():
    base = {"tasks": {"d1": {"side": "domain", "score": 0.4}, "d2": {"side": "domain", "score": 0.6},
                      "g1": {"side": "general", "score": 0.8}}, "perplexity": {}}
    m = {"tasks": {"d1": {"side": "domain", "score": 0.5}, "d2": {"side": "domain", "score": 0.7},
                   "g1": {"side": "general", "score": 0.6}}, "perplexity": {}}
    c = ev.compare(base, m)
    assert c["domain_gain_pct"] == pytest.approx(100 * (0.6 - 0.5) / 0.5)
    assert c["general_regression_pct"] == pytest.approx(100 * (0.8 - 0.6) / 0.8)
    pb = {"tasks": {}, "perplexity": {"pooled": {"domain": {"ppl": 20.0}, "general": {"ppl": 10.0}}}}
    pm = {"tasks": {}, "perplexity": {"pooled": {"domain": {"ppl": 15.0}, "general": {"ppl": 11.0}}}}
    c = ev.compare(pb, pm)
    assert c["domain_gain_pct"] == pytest.approx(25.0) and c["general_regression_pct"] == pytest.approx(10.0)


def test_a_task_answered_right_by_construction_scores_one(model_dir, tmp_path, monkeypatch):
    # The right choice is a strict prefix of every wrong one: its log-likelihood is the wrong one's minus the
    # (negative) log-probabilities of the extra tokens, so any model ranks it first.
    rows = [{"q": f"Product {i}: a kettle", "choices": ["steel", "steel and some glass", "steel and a lid"], "gold": 0}
            for i in range(12)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "by_construction.yaml").write_text(
        "task: by_construction\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: items.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n  side: domain\n")
    refs = ev.resolve_tasks([str(tmp_path / "by_construction.yaml")])
    assert refs[0].side == "domain" and refs[0].metric == "acc"
    # what an in-process training run (the quickstart's) leaves in the environment: accelerate inside HFLM would
    # otherwise try to join a process group ("environment variable RANK expected")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    res = ev.run_tasks(model_dir, refs)
    assert os.environ["LOCAL_RANK"] == "0"  # restored afterwards
    assert res["by_construction"]["score"] == 1.0 and res["by_construction"]["samples"] == 12


def test_bundled_suite_resolves_with_sides():
    refs = ev.resolve_tasks(None)
    sides = {t.name: t.side for t in refs}
    assert sides == {
        "ecom_attribute_extraction": "domain", "ecom_product_classification": "domain",
        "ecom_review_sentiment": "domain", "ecom_title_generation": "domain",
        "general_en_continuation": "general", "general_multilingual_continuation": "general"}
    for t in refs:
        (path,) = t.spec["dataset_kwargs"]["data_files"].values()
        assert Path(path).is_file() and len(Path(path).read_text().splitlines()) >= 150


def test_split_range_is_megatrons(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    for split in ("990,10,0", "900,100,0", "98,1,1", "1,1,0"):
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for n in (7, 101, 2525, 900):
            assert ev.split_range(split, n) == (int(round(matrix[1][0] * n)), int(round(matrix[1][1] * n)))


def test_forgetting_curve_from_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "train_loss": 5 - s / 10} for s in range(1, 21)]
    for r in recs:
        if r["step"] % 5 == 0:
            r.update(val_loss_domain=6 - r["step"] / 10, val_loss_general=3 + r["step"] / 100)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 21, "tra')
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 3.0}) + "\n")
    assert main(["eval", "--run", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "no val_loss_domain" in capsys.readouterr().err


def test_user_errors(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "ecom_reviw_sentiment"]) == 2
    assert "ecom_review_sentiment" in capsys.readouterr().err  # close match offered
    assert main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "nope.json"), "--tasks", "none"]) == 2


def test_harness_task_that_needs_a_download_fails_clearly(model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "ellama_recipes", "eval", "--model", str(model_dir), "--tasks", "arc_easy",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "arc_easy" in p.stderr and "Hugging Face Hub" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "eval.json").exists()
