"""Alignment data layer (ellama_recipes.data.chat): validation and rejects, chat template, masks, pairs, samples.

No NeMo here: the tiny HF tokenizer (session fixture ``tiny_hf``) and plain files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ellama_recipes.data import chat
from ellama_recipes.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "ellama_recipes" / "sample_data"


@pytest.fixture(scope="module")
def tok(tiny_hf):
    return chat.load_chat_tokenizer(tiny_hf)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Classify: red wool sweater"},
    {"role": "assistant", "content": "clothing"},
    {"role": "user", "content": "And an oak table?"},
    {"role": "assistant", "content": "home"},
]


def test_sft_mask_covers_exactly_the_assistant_turns(tok):
    ex, truncated = tok.encode_sft(CONV, seq_length=256)
    assert not truncated
    # segment-wise ids are the ids of the whole rendered conversation: nothing is lost or re-tokenized
    assert ex["input_ids"] == tok.encode(tok.render(CONV))
    assert tok.template_source == "tokenizer"
    learned = tok.tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    assert learned == "clothing<|eot_id|>home<|eot_id|>"
    prompt = tok.tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if not m])
    for text in ("Be brief.", "red wool sweater", "oak table", "<|start_header_id|>assistant<|end_header_id|>"):
        assert text in prompt


def test_prompt_response_form_equals_messages_form(tok):
    a = chat.validate_sft({"prompt": "What is 2 + 3?", "response": "5"})
    b = chat.validate_sft({"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                        {"role": "assistant", "content": "5"}]})
    assert tok.encode_sft(a, 128)[0] == tok.encode_sft(b, 128)[0]


def test_pair_shares_the_prompt_and_masks_only_responses(tok):
    row = chat.validate_preference({"prompt": "Say hi", "chosen": "Hello there!", "rejected": "Go away."})
    pair, _ = tok.encode_pair(row, seq_length=128)
    n = pair["chosen_mask"].index(1)
    assert pair["rejected_mask"].index(1) == n
    assert pair["chosen_ids"][:n] == pair["rejected_ids"][:n]
    assert tok.tok.decode(pair["chosen_ids"][n:]) == "Hello there!<|eot_id|>"
    assert tok.tok.decode(pair["rejected_ids"][n:]) == "Go away.<|eot_id|>"
    assert all(pair["chosen_mask"][n:]) and not any(pair["chosen_mask"][:n])
    c, r = chat.pair_examples(pair)
    assert c == {"input_ids": pair["chosen_ids"], "loss_mask": pair["chosen_mask"]}
    assert r["input_ids"] == pair["rejected_ids"]


def test_collate_shifts_labels_and_masks_padding(tok):
    ex, _ = tok.encode_sft(CONV, seq_length=256)
    b = chat.collate_sft([ex], seq_length=128, pad_id=tok.pad_id)
    n = len(ex["input_ids"]) - 1
    assert b["tokens"].shape == (1, 128) and b["attention_mask"].shape == (1, 1, 128, 128)
    assert b["tokens"][0, :n].tolist() == ex["input_ids"][:-1]
    assert b["labels"][0, :n].tolist() == ex["input_ids"][1:]
    assert b["loss_mask"][0, :n].tolist() == [float(m) for m in ex["loss_mask"][1:]]
    assert b["loss_mask"][0, n:].sum() == 0  # padding never counts
    # loss_mask[i] == 1 exactly where labels[i] is an assistant token
    learned = [int(t) for t, m in zip(b["labels"][0], b["loss_mask"][0]) if m]
    assert tok.tok.decode(learned) == "clothing<|eot_id|>home<|eot_id|>"
    assert bool(b["attention_mask"][0, 0, 0, 1]) and not bool(b["attention_mask"][0, 0, 1, 0])  # causal


def _write_bad(path: Path, long_prompt: str) -> dict[int, str]:
    """Lines of every bad kind; returns line number -> expected reason."""
    ok_msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines: list[tuple[bytes, str | None]] = [
        (json.dumps({"messages": ok_msgs}).encode(), None),
        (b"{not json", "malformed_json"),
        (b"", "blank_line"),
        (b"\xff\xfe", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (json.dumps({"text": "no conversation"}).encode(), "missing_field"),
        (json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}).encode(),
         "unknown_role"),
        (json.dumps({"prompt": "q", "response": "   "}).encode(), "empty_response"),
        (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode(), "no_assistant_turn"),
        (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}).encode(),
         "wrong_type"),
        (json.dumps({"prompt": long_prompt, "response": "ok"}).encode(), "prompt_too_long"),
        (json.dumps({"prompt": "fine", "response": "also fine"}).encode(), None),
    ]
    path.write_bytes(b"\n".join(x for x, _ in lines) + b"\n")
    return {i: r for i, (_, r) in enumerate(lines, 1) if r}


def test_every_bad_sft_row_is_counted_with_reason_and_line(tok, tmp_path):
    src = tmp_path / "sft_bad.jsonl"
    expected = _write_bad(src, "word " * 400)
    rep = chat.prepare("sft", [src], tok, seq_length=128, out_dir=tmp_path / "out")
    assert rep.records_in == 12 and rep.kept == 2
    assert rep.records_in == rep.kept + sum(rep.rejected.values())
    rejects = [json.loads(x) for x in (tmp_path / "out" / chat.REJECTS_FILE).read_text().splitlines()]
    got = {int(r["source"].rsplit(":", 1)[1]): r["reason"] for r in rejects}
    assert got == expected
    assert all(r["source"].startswith(str(src) + ":") for r in rejects)
    report = json.loads((tmp_path / "out" / chat.REPORT_FILE).read_text())
    assert report["rejected"] == dict(Counter(expected.values()))
    rows = chat.read_examples(tmp_path / "out" / chat.TRAIN_FILE) + chat.read_examples(
        tmp_path / "out" / chat.VALIDATION_FILE)
    assert len(rows) == 2 and rep.validation == 1  # at least one held-out row when two or more are kept


def test_bad_preference_rows_and_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "Pick a colour", "chosen": "Blue.", "rejected": "Blue."},  # chosen == rejected
        {"prompt": "Pick a colour", "chosen": "Blue.", "rejected": ""},  # empty response
        {"prompt": "Pick a colour", "chosen": "Blue."},  # missing rejected
        {"prompt": "word " * 300, "chosen": "a", "rejected": "b"},  # prompt too long
        {"prompt": "Pick a colour", "chosen": "Blue.", "rejected": "I refuse."},
        {"prompt": "Pick a number", "chosen": "7", "rejected": "banana"},
    ]
    src = tmp_path / "pref.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    rep = chat.prepare("preference", [src], tok, seq_length=128, out_dir=tmp_path / "out")
    assert (rep.records_in, rep.kept) == (6, 2)
    assert dict(rep.rejected) == {"chosen_equals_rejected": 1, "empty_response": 1, "missing_field": 1,
                                  "prompt_too_long": 1}
    rejects = [json.loads(x) for x in (tmp_path / "out" / chat.REJECTS_FILE).read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{src}:{i}" for i in (1, 2, 3, 4)]


def test_nothing_valid_is_a_user_error_naming_the_rejects_file(tok, tmp_path):
    src = tmp_path / "all_bad.jsonl"
    src.write_text('{"prompt": "q", "response": ""}\n{oops\n')
    rep = chat.prepare("sft", [src], tok, seq_length=128, out_dir=tmp_path / "out")
    with pytest.raises(UserError) as err:
        chat.require_rows(rep)
    msg = str(err.value)
    assert "No valid sft rows: 2 read, 0 kept" in msg and str(tmp_path / "out" / chat.REJECTS_FILE) in msg


def test_builtin_llama31_template_when_the_tokenizer_has_none(tiny_hf):
    from transformers import AutoTokenizer

    from ellama_recipes.data.tokenizer_train import LLAMA31_CHAT_TEMPLATE

    hf = AutoTokenizer.from_pretrained(str(tiny_hf))
    own = chat.ChatTokenizer(hf)
    hf.chat_template = None
    bare = chat.ChatTokenizer(hf)
    assert bare.template == LLAMA31_CHAT_TEMPLATE and bare.template_source != "tokenizer"
    assert bare.encode_sft(CONV, 256) == own.encode_sft(CONV, 256)  # the tiny tokenizer ships the same template


def test_bundled_samples_are_valid_multilingual_and_cover_the_tasks(tok, tmp_path):
    for kind, folder in (("sft", SAMPLE / "sft"), ("preference", SAMPLE / "preference")):
        rep = chat.prepare(kind, [folder], tok, seq_length=256, out_dir=tmp_path / kind)
        assert rep.kept == rep.records_in > 100, rep.as_dict()
        assert rep.validation >= 1 and rep.train > rep.validation
        rows = [json.loads(x) for f in sorted(folder.glob("*.jsonl")) for x in f.read_text().splitlines()]
        assert {r["task"] for r in rows} >= {"classify", "extract", "title", "summarize"}
        assert {r["lang"] for r in rows} >= {"en", "de", "fr", "es"}
