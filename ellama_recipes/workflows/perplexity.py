"""Perplexity per source for ``ellama eval``: held-out text (a blend manifest's validation split, or JSONL) and the
token-weighted perplexity of an HF model on it.

A document is scored as ``[bos] + tokens`` in non-overlapping windows of ``max_length`` tokens, each window
predicting its tokens after the first; perplexity = exp(total NLL / predicted tokens) (what
``model(ids, labels=ids).loss`` gives for one window). A manifest's validation split is the document range of every
``.bin/.idx`` prefix that pretraining validates on (Megatron's split rule, default ``990,10,0``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ellama_recipes.errors import UserError

SIDES = ("domain", "general")
DEFAULT_SPLIT = "990,10,0"  # ManifestDataModule's default: the validation documents pretraining measured


def device() -> str:
    """Where the HF model runs: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TextSource:
    name: str
    side: str
    lang: str
    texts: list[str] = field(default_factory=list)


def split_range(split: str, n: int, which: int = 1) -> tuple[int, int]:
    """Document range of split ``which`` (0 train, 1 validation, 2 test) of ``n`` documents, Megatron's rule
    (megatron.core.datasets: normalise the split weights, cumulative bounds, ``round(bound * n)``)."""
    try:
        w = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise UserError(f"--split {split!r} is not a comma-separated list of numbers (e.g. 990,10,0).") from None
    w = (w + [0.0, 0.0, 0.0])[:3]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"--split {split!r} must have non-negative weights with a positive sum.")
    bounds = [0.0]
    for x in w:
        bounds.append(bounds[-1] + x / sum(w))
    return int(round(bounds[which] * n)), int(round(bounds[which + 1] * n))


def sources_from_manifest(manifest: Path, split: str = DEFAULT_SPLIT, max_docs: int | None = 200) -> list[TextSource]:
    """The validation documents of every source of a blend manifest, decoded with the tokenizer of the data build."""
    manifest = Path(manifest)
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--data {manifest}: not a readable blend manifest ({exc}). Pass DIR/manifest.json written "
                        "by `ellama data build`, or domain=FILE.jsonl / general=FILE.jsonl.") from None
    if not isinstance(m, dict) or not m.get("sources"):
        raise UserError(f"--data {manifest}: no `sources` list; pass the manifest.json of `ellama data build`.")
    tok = _manifest_tokenizer(manifest)
    from ellama_recipes.data.indexed import read_back, read_document

    out = []
    for s in m["sources"]:
        prefix = manifest.parent / s["prefix"]
        if not Path(str(prefix) + ".idx").is_file():
            raise UserError(f"--data {manifest}: source {s['prefix']} has no {prefix}.idx; re-run `ellama data build`.")
        n = read_back(prefix)["documents"]
        beg, end = split_range(split, n)
        if max_docs:
            end = min(end, beg + max_docs)
        texts = [tok.decode(read_document(prefix, i).tolist(), skip_special_tokens=True) for i in range(beg, end)]
        out.append(TextSource(Path(s["prefix"]).name, s["side"], s.get("lang") or "und", [t for t in texts if t.strip()]))
    if not any(s.texts for s in out):
        raise UserError(f"--data {manifest}: the validation split {split!r} has no documents; pass a larger split "
                        "share (e.g. --split 900,100,0) or JSONL text.")
    return out


def _manifest_tokenizer(manifest: Path):
    from transformers import AutoTokenizer

    report = manifest.parent / "report.json"
    name = None
    if report.is_file():
        name = (json.loads(report.read_text(encoding="utf-8")).get("tokenizer") or {}).get("name")
    if not name:
        raise UserError(f"--data {manifest}: {report} does not name the tokenizer the data was built with, so the "
                        "validation tokens cannot be decoded. Re-run `ellama data build` or pass JSONL text.")
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise UserError(f"--data {manifest}: the data's tokenizer {name} could not be loaded ({exc}).") from None


def sources_from_jsonl(side: str, path: Path, max_docs: int | None = None) -> list[TextSource]:
    """JSONL ``{"text", "lang"?}`` lines of one side, grouped by language."""
    if side not in SIDES:
        raise UserError(f"--data {side}={path}: the side must be `domain` or `general`.")
    by_lang: dict[str, TextSource] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--data {side}={path}: cannot read the file ({exc}).") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            text = rec["text"]
            if not isinstance(text, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--data {path}:{i}: each line must be a JSON object with a string `text`.") from None
        lang = rec.get("lang") or "und"
        src = by_lang.setdefault(lang, TextSource(f"{Path(path).stem}_{lang}", side, lang))
        if text.strip() and (not max_docs or len(src.texts) < max_docs):
            src.texts.append(text)
    if not by_lang:
        raise UserError(f"--data {side}={path}: no text lines.")
    return list(by_lang.values())


def load_sources(data: list[str] | None, split: str = DEFAULT_SPLIT, max_docs: int | None = 200) -> list[TextSource]:
    out: list[TextSource] = []
    for d in data or []:
        side, _, path = d.partition("=") if "=" in d and d.split("=", 1)[0] in SIDES else ("", "", d)
        if side:
            out += sources_from_jsonl(side, Path(path), max_docs)
        else:
            out += sources_from_manifest(Path(path), split, max_docs)
    return out


def perplexity(model, tokenizer, texts: list[str], *, max_length: int = 1024, batch_size: int = 8) -> dict[str, float]:
    """Total NLL, predicted tokens and perplexity of ``texts`` (see the module docstring for the windowing)."""
    import torch

    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id] + ids
        windows += [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids[i:i + max_length]) > 1]
    windows.sort(key=len)
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            batch = windows[b:b + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, w in enumerate(batch):
                ids[i, : len(w)] = torch.tensor(w)
                mask[i, : len(w)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = ids[:, 1:].to(device)
            tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            keep = mask[:, 1:].to(device).bool()
            nll += float(tok_nll[keep].double().sum())
            count += int(keep.sum())
    return {"nll": nll, "tokens": count, "ppl": math.exp(nll / count) if count else float("nan")}


def model_perplexity(model_dir: Path, sources: list[TextSource], *, max_length: int = 1024,
                     batch_size: int = 8) -> dict[str, dict]:
    """Per-source and pooled (domain, general, general_en, general_non_en) perplexity of one model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device()).eval()
    limit = getattr(model.config, "max_position_embeddings", max_length) or max_length
    per: dict[str, dict] = {}
    for s in sources:
        if s.texts:
            per[s.name] = {"side": s.side, "lang": s.lang, "documents": len(s.texts),
                           **perplexity(model, tok, s.texts, max_length=min(max_length, limit), batch_size=batch_size)}
    pools = {
        "domain": lambda r: r["side"] == "domain",
        "general": lambda r: r["side"] == "general",
        "general_en": lambda r: r["side"] == "general" and r["lang"] == "en",
        "general_non_en": lambda r: r["side"] == "general" and r["lang"] != "en",
    }
    pooled = {}
    for name, pred in pools.items():
        rows = [r for r in per.values() if pred(r)]
        n = sum(r["tokens"] for r in rows)
        if n:
            total = sum(r["nll"] for r in rows)
            pooled[name] = {"nll": total, "tokens": n, "ppl": math.exp(total / n)}
    del model
    return {"sources": per, "pooled": pooled}
