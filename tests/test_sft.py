"""SFT on the tiny model, on CPU, through the real engine (llm.finetune): the loss falls on the bundled data, only
assistant tokens count (masking proof on the engine's own loss), the run folder exports with `ellama export-hf`
unchanged, and a finished stage is skipped on re-run.

One SFT run per module (about a minute on 2 cores), in a fresh process like the CLI's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import SAMPLE_DATA, subprocess_env

SFT_STEPS = 24


def _run_sft(base: Path, out: Path, save_every: int = 12) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import json
        from ellama_recipes.workflows.align import AlignRequest, run
        if __name__ == "__main__":
            req = AlignRequest(size="tiny", from_path={str(base)!r}, sft=[{str(SAMPLE_DATA / 'sft')!r}],
                               dpo=[{str(SAMPLE_DATA / 'preference')!r}], out={str(out)!r}, sft_steps={SFT_STEPS},
                               save_every={save_every})
            res = run(req, stages=("sft",))
            print("RESULT " + json.dumps(res, default=str))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=900)


@pytest.fixture(scope="module")
def sft_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "run2"
    proc = _run_sft(tiny_base, out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _documented_lr(step: int, sch) -> float:
    k, w, t = step - 1, sch.warmup_steps, sch.train_steps
    if w > 0 and k <= w:
        return sch.lr * (k + 1) / (w + 1)
    return sch.min_lr + (sch.lr - sch.min_lr) * 0.5 * (1 + math.cos(math.pi * (k - w) / (t - w)))


@pytest.mark.slow
def test_sft_loss_falls_and_metrics_rows(sft_run):
    out, _ = sft_run
    rows = _rows(out / "sft" / "metrics.jsonl")
    train = [r for r in rows if r.get("loss") is not None]
    assert [r["step"] for r in train] == list(range(1, SFT_STEPS + 1))
    assert all(r["stage"] == "sft" and r["lr"] is not None for r in rows)
    assert all(r["grad_norm"] > 0 for r in train)  # before clipping
    # the LR each step ran with is the documented schedule's (docs/alignment.md): step k (1-based) of T with W warmup
    # steps: peak x k/(W+1) for k <= W+1, then cosine from the peak to min_lr at k = T+1 (NeMo's CosineAnnealing)
    from ellama_recipes.recipes.sft import build_config

    sch = build_config("tiny", train_steps=SFT_STEPS).schedule
    for r in train:
        assert abs(r["lr"] - _documented_lr(r["step"], sch)) < 1e-6 * sch.lr, (r, sch)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2, rows
    first, last = sum(r["loss"] for r in train[:4]) / 4, sum(r["loss"] for r in train[-4:]) / 4
    assert last < first - 0.5, (first, last)
    print(f"SFT loss: mean of steps 1-4 {first:.4f} -> steps {SFT_STEPS - 3}-{SFT_STEPS} {last:.4f}; "
          f"val_loss {val[0]:.4f} (step {[r['step'] for r in rows if 'val_loss' in r][0]}) -> {val[-1]:.4f}")
    assert val[-1] < val[0], val
    # the run folder has pretraining's layout and a completion record naming its last complete checkpoint
    assert (out / "sft" / "checkpoints").is_dir() and (out / "sft" / "logs").is_dir()
    done = json.loads((out / "sft" / "complete.json").read_text())
    assert done["train_steps"] == SFT_STEPS and Path(done["checkpoint"]).is_dir()
    report = json.loads((out / "sft" / "data" / "report.json").read_text())
    assert report["records_in"] == report["kept"] + report["rejected_total"] and report["train"] > 300
    # both stages' data is prepared (and checked) before SFT starts
    assert (out / "dpo" / "data" / "train.jsonl").is_file()


MASK_PROOF = """
import json, sys, torch
from ellama_recipes.data.chat import load_chat_tokenizer, collate_sft
from ellama_recipes.engine.checkpoint.parity import load_engine_model
from ellama_recipes.engine.sft import masked_loss
if __name__ == "__main__":
    ckpt = sys.argv[1]
    tok = load_chat_tokenizer(ckpt)
    conv = [{"role": "user", "content": "Classify the product: Vantor wool sweater"},
            {"role": "assistant", "content": "clothing"},
            {"role": "user", "content": "And the oak table?"},
            {"role": "assistant", "content": "home"}]
    ex, _ = tok.encode_sft(conv, 128)
    batch = collate_sft([ex, ex], 128, tok.pad_id)
    model, _ = load_engine_model(ckpt)
    base = masked_loss(model, batch)
    g = torch.Generator().manual_seed(0)
    prompt = batch["loss_mask"] == 0
    b1 = {k: v.clone() for k, v in batch.items()}
    b1["labels"][prompt] = torch.randint(0, tok.vocab_size, (int(prompt.sum()),), generator=g)
    changed_prompt = masked_loss(model, b1)
    b2 = {k: v.clone() for k, v in batch.items()}
    pos = int(batch["loss_mask"][0].nonzero()[0])
    b2["labels"][0, pos] = (b2["labels"][0, pos] + 7) % tok.vocab_size
    changed_response = masked_loss(model, b2)
    b3 = {k: v.clone() for k, v in batch.items()}
    b3["loss_mask"] = (b3["tokens"] != -1).float()   # what NeMo's chat path uses without {% generation %}
    all_tokens = masked_loss(model, b3)
    print("PROOF " + json.dumps({"base": base, "changed_prompt": changed_prompt, "changed_response": changed_response,
                                 "all_tokens": all_tokens, "n_prompt": int(prompt.sum()),
                                 "n_loss": int(batch["loss_mask"].sum())}))
"""


@pytest.mark.slow
def test_masking_proof_on_the_engine_loss(sft_run):
    out, _ = sft_run
    ckpt = json.loads((out / "sft" / "complete.json").read_text())["checkpoint"]
    proc = subprocess.run([sys.executable, "-c", MASK_PROOF, ckpt], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proof = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("PROOF "))[6:])
    print("masking proof (engine loss):", json.dumps(proof))
    assert proof["n_loss"] > 0 and proof["n_prompt"] > proof["n_loss"]
    assert proof["changed_prompt"] == proof["base"], proof  # prompt labels do not count at all
    assert abs(proof["changed_response"] - proof["base"]) > 1e-4, proof  # a response label does
    assert abs(proof["all_tokens"] - proof["base"]) > 1e-3, proof  # and the mask is not all ones


@pytest.mark.slow
def test_export_hf_from_the_sft_run_folder(sft_run, tmp_path):
    out, _ = sft_run
    hf = tmp_path / "hf_sft"
    proc = subprocess.run([sys.executable, "-m", "ellama_recipes", "export-hf", "--from", str(out / "sft"),
                           "--out", str(hf), "--no-progress"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((hf / "ellama_export.json").read_text())
    done = json.loads((out / "sft" / "complete.json").read_text())
    assert Path(report["checkpoint"]).resolve() == Path(done["checkpoint"]).resolve()
    assert (hf / "model.safetensors").is_file() and "chat_template" in (hf / "tokenizer_config.json").read_text() \
        or (hf / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_rerun_skips_the_complete_stage(sft_run, tiny_base):
    out, _ = sft_run
    before = (out / "sft" / "metrics.jsonl").read_text()
    proc = _run_sft(tiny_base, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sft: already complete" in proc.stdout + proc.stderr
    assert "sft data unchanged: reusing" in proc.stdout + proc.stderr
    assert (out / "sft" / "metrics.jsonl").read_text() == before  # nothing trained again


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_ends_like_the_uninterrupted_run(sft_run, tiny_base, tmp_path):
    import os
    import signal
    import time

    ref_out, _ = sft_run
    out = tmp_path / "run2"
    code = textwrap.dedent(f"""
        from ellama_recipes.workflows.align import AlignRequest, run
        if __name__ == "__main__":
            run(AlignRequest(size="tiny", from_path={str(tiny_base)!r}, sft=[{str(SAMPLE_DATA / 'sft')!r}],
                             dpo=[{str(SAMPLE_DATA / 'preference')!r}], out={str(out)!r}, sft_steps={SFT_STEPS},
                             save_every=10), stages=("sft",))
    """)
    metrics = out / "sft" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r.get("step", 0) >= 14 for r in _rows(metrics)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (out / "sft" / "complete.json").exists()
    again = _run_sft(tiny_base, out, save_every=10)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    import re

    resumed = re.search(r"resumed from step (\d+)", again.stdout + again.stderr)
    # checkpoints every 10 steps = the validation interval (as pretraining's resume test): the step-10 checkpoint
    # is written after that step's validation
    assert resumed and int(resumed.group(1)) == 10, (again.stdout + again.stderr)[-3000:]
    rows, ref = _rows(metrics), _rows(ref_out / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("loss") is not None] == list(range(1, SFT_STEPS + 1))  # no step twice
    final, ref_final = rows[-1], ref[-1]
    assert final["step"] == ref_final["step"] == SFT_STEPS
    assert final["loss"] == pytest.approx(ref_final["loss"], rel=1e-4)
    assert final["val_loss"] == pytest.approx(ref_final["val_loss"], rel=1e-4)
