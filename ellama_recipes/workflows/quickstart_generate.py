"""The quickstart's sample answers: held-out domain instructions, the aligned model through its chat template
next to the base's raw-text continuation (``report.json["generation"]``). Used by
:mod:`ellama_recipes.workflows.quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ellama_recipes.workflows.quickstart_splits import read_jsonl


def sample_generations(base_hf: Path, aligned_hf: Path | None, heldout: Path, n: int = 2) -> list[dict[str, Any]]:
    """Held-out domain instructions (never trained on): the aligned model answers through its chat template, the
    base continues the same instruction as raw text. One classify and one title instruction in English."""
    rows = read_jsonl(heldout)
    picked, seen = [], set()
    for want in ("classify", "title", "extract"):
        for r in rows:
            if r.get("task") == want and r.get("lang") == "en" and want not in seen:
                picked.append(r)
                seen.add(want)
                break
    out = []
    for r in picked[:n]:
        msgs = [m for m in r["messages"] if m["role"] != "assistant"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        ref = next((m["content"] for m in r["messages"] if m["role"] == "assistant"), None)
        out.append({"model": "base", "prompt": user, "text": generate(base_hf, user), "chat_template": False,
                    "reference": ref, "id": r.get("id")})
        if aligned_hf is not None:
            out.append({"model": "aligned", "prompt": user, "text": generate(aligned_hf, msgs, chat=True),
                        "chat_template": True, "reference": ref, "id": r.get("id")})
    return out


def _greedy_model(hf_dir: Path):
    """``(tokenizer, model, stop ids)`` of an exported model (transformers, CPU, fp32) set up for greedy decoding: the
    checkpoint's sampling defaults (temperature / top_p, which greedy decoding warns about) dropped; stop at the end
    of text or the end of a chat turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.do_sample = False
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    stop = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")} if isinstance(t, int) and t >= 0]
    return tok, model, stop


def generate(hf_dir: Path, prompt: str | list[dict], max_new_tokens: int = 24, chat: bool = False) -> str:
    """Load the exported model with transformers (CPU) and greedily continue ``prompt``: raw text, or (``chat``)
    the messages rendered by the tokenizer's chat template with the assistant header (only the new tokens are
    returned then)."""
    import torch

    tok, model, stop = _greedy_model(hf_dir)
    if chat:
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                             eos_token_id=stop)
    new = gen[0][ids["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True).strip()


# A category word at the start of a turn (no leading space) is 2-4 tokens of the tiny BPE ('electronics': el|ectr|
# onic|s) plus the end-of-turn token: 8 leaves room for all of them.
ANSWER_TOKENS = 8


def answer_accuracy(hf_dir: Path, heldout: Path, max_new_tokens: int = ANSWER_TOKENS) -> dict[str, Any]:
    """Exact-match accuracy of ``hf_dir``'s greedy answers (through its chat template) to the held-out one-word
    questions in ``heldout`` (``splits/eval/classify_heldout.jsonl``: a product's category among six): the answer,
    stripped, lower-cased and without a final full stop, must equal the reference. ``chance``: one in the number of
    categories offered."""
    import torch

    rows = read_jsonl(heldout)
    tok, model, stop = _greedy_model(hf_dir)
    prompts = [tok.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"],
                                       add_generation_prompt=True, tokenize=False) for r in rows]
    tok.padding_side = "left"  # one greedy batch: left padding keeps every prompt's end at the same position
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    texts = []
    for b in range(0, len(prompts), 64):
        ids = tok(prompts[b:b + 64], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop)
        texts += tok.batch_decode(gen[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    correct, answers = 0, []
    for r, text in zip(rows, texts):
        ref = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
        ok = text.strip().lower().rstrip(".") == ref.strip().lower()
        correct += ok
        answers.append({"id": r.get("id"), "answer": text.strip(), "reference": ref, "correct": ok})
    line = rows[0]["messages"][-2]["content"].splitlines()[0] if rows else ""
    n_choices = len(line.split(":", 1)[-1].split(",")) if rows else 0
    refs = [a["reference"] for a in answers]
    top = max(sorted(set(refs)), key=refs.count) if refs else None
    return {"task": "product category (one word among the six offered)", "questions": len(rows), "correct": correct,
            "exact_match": correct / len(rows) if rows else None, "chance": 1 / n_choices if n_choices else None,
            "majority_class": top, "majority_rate": refs.count(top) / len(refs) if refs else None,
            "decoding": f"greedy, at most {max_new_tokens} new tokens, chat template", "path": str(heldout),
            "answers": answers}
