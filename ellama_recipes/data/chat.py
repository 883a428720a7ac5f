"""Alignment data: SFT conversations and preference pairs -> validated, chat-templated, tokenized, loss-masked.

Input rows (JSONL lines or Parquet rows; folders are searched for ``.jsonl`` / ``.parquet``):

- SFT: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": str}, ...]}`` (at least one
  assistant turn) or ``{"prompt": str, "response": str}`` (one user turn, one assistant turn).
- Preference: ``{"prompt": str | "messages": [...], "chosen": str, "rejected": str}``; ``chosen`` / ``rejected`` may
  also be a one-element list ``[{"role": "assistant", "content": str}]`` (TRL's conversational form). The prompt
  ``messages`` must not end with an assistant turn.

Every row is either kept or rejected with a reason and ``file:line`` (``rejects.jsonl``); the report checks
``in = kept + rejected``. Reasons: ``blank_line``, ``invalid_utf8``, ``malformed_json``, ``not_an_object``,
``missing_field``, ``wrong_type``, ``unknown_role``, ``empty_response``, ``no_assistant_turn``,
``chosen_equals_rejected``, ``prompt_too_long``.

Chat template: the tokenizer's own (``tokenizer.chat_template``), else Llama 3.1's
(:data:`ellama_recipes.data.tokenizer_train.LLAMA31_CHAT_TEMPLATE`). A conversation is rendered into segments by
rendering growing prefixes (``messages[:i]`` with the generation prompt, then ``messages[:i+1]``): the text an
assistant turn adds (its content and ``<|eot_id|>``) is an *assistant segment*, everything else (bos, system header,
user turns, the ``<|start_header_id|>assistant<|end_header_id|>`` headers) is *prompt*. Each segment is tokenized
on its own (``add_special_tokens=False``) and concatenated, so the mask is exact per token, and a pair's chosen and
rejected sequences share the very same prompt ids. This does not depend on a ``{% generation %}`` block in the
template (NeMo 2.7.3's ``_chat_preprocess`` falls back to training on the prompt without one).

Tokenized examples (what the engine reads; ``seq_length`` = tokens the model sees per sequence):

- SFT example ``{"input_ids": [int], "loss_mask": [0|1]}``, same length, at most ``seq_length + 1`` ids;
  ``loss_mask[i] == 1`` iff ``input_ids[i]`` belongs to an assistant turn. Training shifts by one:
  ``tokens = ids[:-1]``, ``labels = ids[1:]``, ``loss_mask = mask[1:]`` (:func:`collate_sft`).
- Preference pair ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}``: full sequences (the same
  prompt ids, then the response's), masks 1 on the response tokens only (:func:`pair_examples` turns them into two
  SFT-style examples), each at most ``seq_length + 1`` ids (responses are truncated to fit; a prompt that leaves no
  room is rejected).

Python::

    from ellama_recipes.data.chat import load_chat_tokenizer, prepare
    tok = load_chat_tokenizer("checkpoints/base")  # HF tokenizer dir or engine checkpoint
    report = prepare("sft", ["ellama_recipes/sample_data/sft"], tok, seq_length=4096, out_dir="runs/al/sft/data")
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ellama_recipes.data.records import (
    MISSING_FIELD,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    RecordError,
    Reject,
    expand_paths,
    iter_objects,
)
from ellama_recipes.data.chat_template import (  # noqa: F401 (the tokenizer is part of this module's API)
    CHOSEN_EQUALS_REJECTED, PROMPT_TOO_LONG, ChatTokenizer, load_chat_tokenizer, tokenizer_dir,
)
from ellama_recipes.errors import UserError

SFT, PREFERENCE = "sft", "preference"
KINDS = (SFT, PREFERENCE)
ROLES = ("system", "user", "assistant", "tool", "ipython")

UNKNOWN_ROLE = "unknown_role"
EMPTY_RESPONSE = "empty_response"
NO_ASSISTANT_TURN = "no_assistant_turn"

# Files written by prepare() into its out_dir.
TRAIN_FILE, VALIDATION_FILE, REJECTS_FILE, REPORT_FILE = "train.jsonl", "validation.jsonl", "rejects.jsonl", "report.json"


# ---------------------------------------------------------------------------------------------------- validation
def _messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordError(WRONG_TYPE, f"field {what!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(WRONG_TYPE, f"{what}[{i}] is {type(m).__name__}, expected an object {{role, content}}")
        if "role" not in m or m["role"] is None:
            raise RecordError(MISSING_FIELD, f"{what}[{i}] has no 'role'")
        if "content" not in m or m["content"] is None:
            raise RecordError(MISSING_FIELD, f"{what}[{i}] has no 'content'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise RecordError(WRONG_TYPE, f"{what}[{i}].role is {type(role).__name__}, expected a string")
        if role not in ROLES:
            raise RecordError(UNKNOWN_ROLE, f"{what}[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(WRONG_TYPE, f"{what}[{i}].content is {type(content).__name__}, expected a string")
        out.append({"role": role, "content": content})
    return out


def _text(obj: dict, name: str) -> str:
    if name not in obj or obj[name] is None:
        raise RecordError(MISSING_FIELD, f"missing field {name!r}")
    v = obj[name]
    if not isinstance(v, str):
        raise RecordError(WRONG_TYPE, f"field {name!r} is {type(v).__name__}, expected a string")
    return v


def _response(obj: dict, name: str) -> str:
    """``chosen`` / ``rejected``: a string or ``[{"role": "assistant", "content": str}]``."""
    if name not in obj or obj[name] is None:
        raise RecordError(MISSING_FIELD, f"missing field {name!r}")
    v = obj[name]
    if isinstance(v, list):
        msgs = _messages(v, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RecordError(WRONG_TYPE, f"field {name!r} as a list must be one assistant message")
        v = msgs[0]["content"]
    if not isinstance(v, str):
        raise RecordError(WRONG_TYPE, f"field {name!r} is {type(v).__name__}, expected a string")
    if not v.strip():
        raise RecordError(EMPTY_RESPONSE, f"field {name!r} is empty")
    return v


def validate_sft(obj: object) -> list[dict[str, str]]:
    """The conversation of one SFT row (``messages`` or ``prompt``/``response``), or :class:`RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj and obj["messages"] is not None:
        msgs = _messages(obj["messages"], "messages")
    elif "prompt" in obj or "response" in obj:
        prompt, response = _text(obj, "prompt"), _text(obj, "response")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        raise RecordError(MISSING_FIELD, "missing field 'messages' (or 'prompt' and 'response')")
    assistant = [m for m in msgs if m["role"] == "assistant"]
    if not assistant:
        raise RecordError(NO_ASSISTANT_TURN, "the conversation has no assistant turn (nothing to learn)")
    if any(not m["content"].strip() for m in assistant):
        raise RecordError(EMPTY_RESPONSE, "an assistant turn is empty")
    return msgs


def validate_preference(obj: object) -> dict[str, Any]:
    """``{"prompt": messages, "chosen": str, "rejected": str}`` of one preference row, or :class:`RecordError`."""
    if not isinstance(obj, dict):
        raise RecordError(NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj and obj["messages"] is not None:
        prompt = _messages(obj["messages"], "messages")
    elif "prompt" in obj and isinstance(obj["prompt"], list):
        prompt = _messages(obj["prompt"], "prompt")
    elif "prompt" in obj:
        text = _text(obj, "prompt")
        prompt = [{"role": "user", "content": text}]
    else:
        raise RecordError(MISSING_FIELD, "missing field 'prompt' (or 'messages')")
    if prompt[-1]["role"] == "assistant":
        raise RecordError(WRONG_TYPE, "the prompt ends with an assistant turn; chosen/rejected are the next turn")
    if not any(m["content"].strip() for m in prompt):
        raise RecordError(MISSING_FIELD, "the prompt is empty")
    chosen, rejected = _response(obj, "chosen"), _response(obj, "rejected")
    if chosen.strip() == rejected.strip():
        raise RecordError(CHOSEN_EQUALS_REJECTED, "chosen and rejected are the same text (no preference signal)")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


VALIDATORS = {SFT: validate_sft, PREFERENCE: validate_preference}


def iter_rows(path: Path) -> Iterator[tuple[Any, str, Reject | None]]:
    """``(object, "file:line", None)`` per decodable line/row of ``path``, or ``(None, src, reject)``: the data
    stages' one line reader (:func:`ellama_recipes.data.records.iter_objects`)."""
    return iter_objects(path)


# ---------------------------------------------------------------------------------------------------- examples
def pair_examples(pair: dict[str, list[int]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The chosen and rejected SFT-style examples (``input_ids``, ``loss_mask``) of one tokenized pair."""
    return (
        {"input_ids": pair["chosen_ids"], "loss_mask": pair["chosen_mask"]},
        {"input_ids": pair["rejected_ids"], "loss_mask": pair["rejected_mask"]},
    )


def collate_sft(examples: list[dict[str, list[int]]], seq_length: int, pad_id: int) -> dict[str, Any]:
    """Megatron GPT batch from examples: ``tokens``, ``labels``, ``loss_mask`` (float), ``position_ids`` of shape
    ``[B, seq_length]`` and a causal ``attention_mask`` ``[B, 1, S, S]`` (True = masked out, Megatron's
    convention). Padding has loss mask 0; labels are ``input_ids`` shifted left by one."""
    import torch

    b = len(examples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float)
    for i, ex in enumerate(examples):
        ids, mask = ex["input_ids"][: seq_length + 1], ex["loss_mask"][: seq_length + 1]
        n = len(ids) - 1
        if n < 1:
            continue
        tokens[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[i, :n] = torch.tensor(ids[1:], dtype=torch.long)
        loss_mask[i, :n] = torch.tensor(mask[1:], dtype=torch.float)
    position_ids = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    causal = torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)
    attention_mask = causal.unsqueeze(0).unsqueeze(0).expand(b, 1, -1, -1).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }


# ---------------------------------------------------------------------------------------------------- prepare
@dataclass
class PrepareReport:
    kind: str
    records_in: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    truncated: int = 0
    train: int = 0
    validation: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    files: list[str] = field(default_factory=list)
    out_dir: str = ""
    template: str = ""
    seq_length: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "records_in": self.records_in,
            "kept": self.kept,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "truncated": self.truncated,
            "train": self.train,
            "validation": self.validation,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "files": self.files,
            "out_dir": self.out_dir,
            "chat_template": self.template,
            "seq_length": self.seq_length,
        }


def _held_out(src: str, seed: int, fraction: float) -> bool:
    h = hashlib.sha256(f"{seed}:{src}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def prepare(
    kind: str,
    paths: Iterable[str | Path],
    tokenizer: ChatTokenizer,
    *,
    seq_length: int,
    out_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 1234,
) -> PrepareReport:
    """Validate, template, tokenize and split ``paths`` into ``out_dir`` (written atomically).

    ``out_dir`` gets ``train.jsonl`` / ``validation.jsonl`` (tokenized examples or pairs, see the module docstring),
    ``rejects.jsonl`` (``{"reason", "source": "file:line", "detail"}``) and ``report.json``
    (:meth:`PrepareReport.as_dict`). The held-out split is a deterministic hash of each row's ``file:line`` and
    ``seed`` (at least one row when two or more are kept). Nothing valid left is not an error here: the caller
    prints the table and raises (see :func:`require_rows`).
    """
    from ellama_recipes.io.atomic import atomic_dir

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    files = expand_paths(list(paths), "SFT" if kind == SFT else "preference")
    validate = VALIDATORS[kind]
    rep = PrepareReport(kind=kind, files=[str(f) for f in files], out_dir=str(out_dir), seq_length=seq_length)
    rep.template = tokenizer.template_source
    kept: list[tuple[str, dict]] = []
    rejects: list[Reject] = []
    for f in files:
        for obj, src, rj in iter_rows(f):
            rep.records_in += 1
            try:
                if rj is not None:
                    raise RecordError(rj.reason, rj.detail)
                row = validate(obj)
                if kind == SFT:
                    ex, truncated = tokenizer.encode_sft(row, seq_length)
                    rep.tokens += len(ex["input_ids"])
                    rep.loss_tokens += sum(ex["loss_mask"][1:])
                else:
                    ex, truncated = tokenizer.encode_pair(row, seq_length)
                    rep.tokens += len(ex["chosen_ids"]) + len(ex["rejected_ids"])
                    rep.loss_tokens += sum(ex["chosen_mask"][1:]) + sum(ex["rejected_mask"][1:])
            except RecordError as exc:
                rejects.append(Reject(exc.reason, src, exc.detail))
                rep.rejected[exc.reason] += 1
                continue
            rep.truncated += int(truncated)
            kept.append((src, ex))
    rep.kept = len(kept)
    assert rep.records_in == rep.kept + sum(rep.rejected.values())
    val_idx = {i for i, (src, _) in enumerate(kept) if _held_out(src, seed, val_fraction)}
    if len(kept) >= 2 and not val_idx:
        val_idx = {min(range(len(kept)), key=lambda i: hashlib.sha256(f"{seed}:{kept[i][0]}".encode()).digest())}
    if len(val_idx) == len(kept) and len(kept) >= 2:
        val_idx = set(sorted(val_idx)[: max(1, len(kept) // 2)])
    with atomic_dir(Path(out_dir), replace=True) as tmp:
        with open(tmp / TRAIN_FILE, "w", encoding="utf-8") as tr, open(tmp / VALIDATION_FILE, "w", encoding="utf-8") as va:
            for i, (src, ex) in enumerate(kept):
                (va if i in val_idx else tr).write(json.dumps({**ex, "source": src}) + "\n")
        rep.validation = len(val_idx)
        rep.train = rep.kept - rep.validation
        with open(tmp / REJECTS_FILE, "w", encoding="utf-8") as rf:
            for rj in rejects:
                rf.write(json.dumps(rj.as_dict(), ensure_ascii=False) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(rep.as_dict(), indent=2) + "\n", encoding="utf-8")
    return rep


def require_rows(rep: PrepareReport) -> None:
    """UserError (exit 2) when ``prepare`` kept nothing usable for training."""
    if rep.kept == 0 or rep.train == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in rep.rejected.most_common()) or "no rows"
        raise UserError(
            f"No valid {rep.kind} rows: {rep.records_in} read, {rep.kept} kept ({reasons}). Every reject is listed "
            f"with its reason and file:line in {Path(rep.out_dir) / REJECTS_FILE}. Fix the rows (format: "
            + ('{"messages": [{"role", "content"}, ...]} or {"prompt", "response"}' if rep.kind == SFT
               else '{"prompt" | "messages", "chosen", "rejected"}')
            + ") and re-run."
        )


def read_examples(path: str | Path) -> list[dict[str, Any]]:
    """The tokenized rows of a ``train.jsonl`` / ``validation.jsonl`` written by :func:`prepare`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def report_table(reports: Iterable[PrepareReport]):
    """A rich Table: rows in = kept + rejected, by reason, per data kind."""
    from rich.table import Table

    t = Table(title="ellama align: data rows")
    for col in ("data", "in", "kept", "rejected", "reasons", "train", "validation", "truncated", "rejects file"):
        t.add_column(col, justify="right" if col in ("in", "kept", "rejected", "train", "validation", "truncated") else "left")
    for r in reports:
        t.add_row(
            r.kind,
            str(r.records_in),
            str(r.kept),
            str(sum(r.rejected.values())),
            ", ".join(f"{k} {v}" for k, v in r.rejected.most_common()) or "-",
            str(r.train),
            str(r.validation),
            str(r.truncated),
            str(Path(r.out_dir) / REJECTS_FILE),
        )
    return t


__all__ = [
    "ChatTokenizer",
    "PrepareReport",
    "collate_sft",
    "load_chat_tokenizer",
    "pair_examples",
    "prepare",
    "read_examples",
    "report_table",
    "require_rows",
    "tokenizer_dir",
    "validate_preference",
    "validate_sft",
]
