"""The run folder contract (ellama_recipes/io): the one metrics.jsonl reader, its writers, complete.json, summaries."""

from __future__ import annotations

import json

import pytest

from ellama_recipes.errors import UserError
from ellama_recipes.io import metrics
from ellama_recipes.io.run_folder import RunFolder, summarize


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1], encoding="utf-8")


def test_a_torn_last_line_is_ignored_by_every_reader_and_dropped_by_the_rewriters(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, [json.dumps({"step": 1, "loss": 2.0}), json.dumps({"step": 2, "loss": 1.5}), '{"step": 3, "lo'])
    assert [r["step"] for r in metrics.read_metrics(f)] == [1, 2]
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]  # a run folder works too
    metrics.merge_step(f, 2, {"val_loss": 1.0})
    assert metrics.read_metrics(f) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.0}]
    assert f.read_text().endswith("\n") and "lo\n" not in f.read_text()
    _write(f, [json.dumps({"step": 1}), json.dumps({"step": 2}), "{torn"])
    metrics.truncate_after(f, 1)
    assert f.read_text() == json.dumps({"step": 1}) + "\n"


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    _write(f, [json.dumps({"step": 1}), "not json", json.dumps({"step": 3})])
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a metrics row"):
        metrics.read_metrics(f)
    _write(f, [json.dumps({"step": 1}), json.dumps(["no", "step"]), json.dumps({"step": 3})])
    with pytest.raises(UserError, match=r"metrics.jsonl:2"):
        metrics.read_metrics(f)
    assert metrics.read_metrics(tmp_path / "missing.jsonl") == []


def test_append_then_read_round_trips(tmp_path):
    f = tmp_path / "m.jsonl"
    for s in (1, 2, 3):
        metrics.append(f, {"step": s, "loss": 1.0 / s})
    assert metrics.last(metrics.read_metrics(f), "loss") == pytest.approx(1 / 3)
    assert metrics.first(metrics.read_metrics(f), "loss") == 1.0 and metrics.last_step(metrics.read_metrics(f), "loss") == 3


def test_complete_record_and_summary(tmp_path):
    run = RunFolder.at(tmp_path / "run")
    assert run.read_complete() is None and run.resumed_from() is None
    run.root.mkdir()
    (run.root / "ck").mkdir()
    for s, row in enumerate([{"loss": 3.0}, {"loss": 2.0, "val_loss": 2.5}, {"loss": 1.0}], 1):
        metrics.append(run.metrics, {"step": s, **row})
    run.write_resumed(2)
    rec = run.write_complete("sft", 3, run.root / "ck", {"final_loss": 1.0})
    assert run.read_complete() == rec and rec["checkpoint"] == str((run.root / "ck").resolve())
    got = summarize(run.root, "sft", {"first_loss": ("first", "loss"), "final_val_loss": ("last", "val_loss")},
                    step_key="loss")
    assert got["stage"] == "sft" and got["final_step"] == 3 and got["first_loss"] == 3.0
    assert got["final_val_loss"] == 2.5 and got["resumed_from"] == 2
    run.complete_file.write_text("{half")
    assert run.read_complete() is None  # an unreadable record means "not complete"
