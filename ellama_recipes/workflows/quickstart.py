"""The whole chain on the `tiny` size and the bundled sample data, on CPU, with the answer: `ellama quickstart`.

Stages (each one a command of its own, each output under OUT/; ``OUT/splits`` holds the held-out splits first):

1. ``base_hf/``   a tiny Llama-3.1-architecture HF model + tokenizer, pretrained briefly on the *train* part of the
                  bundled general sample (``splits/general``: every 10th document of each file is held out,
                  :func:`ellama_recipes.model.tiny.split_general_documents`; cached)
2. ``base/``      ``ellama import-hf --size tiny --from OUT/base_hf --out OUT/base``
3. ``data/``      ``ellama data build --domain <sample>/domain --general OUT/splits/general --tokenizer OUT/base_hf``,
                  plus ``data/manifest_noreplay.json`` (the same blend, general weights 0)
4. ``cpt/``       ``ellama pretrain --size tiny --from OUT/base --data OUT/data/manifest.json --out OUT/cpt``
   ``cpt_noreplay/`` the same CPT (steps, LR, batch, so tokens) on ``manifest_noreplay.json``: the replay arm
5. ``cpt_hf/``, ``cpt_noreplay_hf/``  ``ellama export-hf`` (verified)
6. ``align/``     ``ellama align --from OUT/cpt --sft OUT/splits/sft ...`` (SFT then DPO; every 10th e-commerce SFT
                  conversation is held out), when ``ellama align`` exists
7. ``hf/``        ``ellama export-hf --from OUT/align/dpo --out OUT/hf``: the aligned model
8. ``eval/``      ``ellama eval`` of base, cpt, cpt_noreplay, aligned on held-out text only:
                  ``general=OUT/splits/eval/general_heldout.jsonl`` (never trained on by the base nor CPT) and
                  ``domain=OUT/splits/eval/domain_validation.jsonl`` (the blend's validation split), + the task suites

``OUT/report.json``: ``domain_gain_pct`` and ``general_regression_pct`` of the final model (the aligned one; the CPT
model when alignment is not available) against the base, ``hf_dir`` (its export), ``stages`` (name -> seconds of
this invocation, 0 for reused stages), ``stage_details``, ``eval`` (the per-model table), ``eval_documents`` (what
each number is measured on), ``splits``, ``replay`` (``with_replay`` / ``without_replay``: ``domain_gain_pct``,
``general_regression_pct`` and the perplexity versions, against the base; ``verdict``), ``dpo`` +
``val_reward_accuracy`` / ``val_margin`` (DPO's held-out pairs), ``alignment`` (the aligned model's general
regression against the CPT model) and ``generation`` (``[{model, prompt, text, chat_template}]``: held-out
instructions, the aligned model through its chat template, the base as raw text).

The console shows ellama's own lines; NeMo / Lightning / megatron-core output goes to ``OUT/logs/NN-<stage>.log``
(:mod:`ellama_recipes.io.console`; ``verbose=True`` shows it too). Stages whose output is already complete are
reused, so re-running continues where a previous run stopped (pretraining resumes from its last complete
checkpoint); ``--fresh`` starts over.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.model.tiny import TINY_BASE_STEPS
from ellama_recipes.workflows.quickstart_generate import answer_accuracy, generate, sample_generations
from ellama_recipes.workflows.quickstart_splits import (prepare_splits, write_domain_eval,
                                                         write_noreplay_manifest)


@dataclass
class StageResult:
    name: str
    output: str
    seconds: float
    reused: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def _stage(results: list[StageResult], name: str, output: Path, done: bool, fn: Callable[[], dict | None], echo) -> None:
    if done:
        echo(f"[quickstart] {name}: reusing {output}")
        results.append(StageResult(name, str(output), 0.0, reused=True))
        return
    echo(f"[quickstart] {name} -> {output}")
    t0 = time.perf_counter()
    details = fn() or {}
    results.append(StageResult(name, str(output), time.perf_counter() - t0, details=details))


def align_available() -> bool:
    """True when `ellama align` (ellama_recipes.workflows.align: SFT then DPO) and its bundled samples are part of this install."""
    if importlib.util.find_spec("ellama_recipes.workflows.align") is None:
        return False
    from ellama_recipes.data.bundled import sample_dir
    from ellama_recipes.recipes import recipes

    names = set(recipes())
    return {"sft", "dpo"} <= names and all((sample_dir() / d).is_dir() for d in ("sft", "preference"))


def describe(out: Path, steps: int | None = None, align: bool = True, replay_arm: bool = True) -> list[dict[str, str]]:
    """The stages and the equivalent commands, without running anything (`ellama quickstart --dryrun`)."""
    from ellama_recipes.data.bundled import sample_dir

    out, sample = Path(out), sample_dir()
    step_flag = f" --steps {steps}" if steps else ""
    sp = out / "splits"
    stages = [
        {"stage": "tiny base (pretrained on general text)", "output": str(out / "base_hf"),
         "command": "python -c 'from ellama_recipes.model.tiny import trained_tiny_base; trained_tiny_base(...)' "
                    f"(trains on {sp / 'general'}: the bundled general documents minus every 10th, held out)"},
        {"stage": "import-hf", "output": str(out / "base"),
         "command": f"ellama import-hf --size tiny --from {out / 'base_hf'} --out {out / 'base'}"},
        {"stage": "data build", "output": str(out / "data"),
         "command": f"ellama data build --domain {sample / 'domain'} --general {sp / 'general'} "
                    f"--tokenizer {out / 'base_hf'} --out {out / 'data'} (+ data/manifest_noreplay.json: general "
                    "weights 0)"},
        {"stage": "pretrain (CPT)", "output": str(out / "cpt"),
         "command": f"ellama pretrain --size tiny --from {out / 'base'} --data {out / 'data' / 'manifest.json'} "
                    f"--out {out / 'cpt'}{step_flag}"},
    ]
    if replay_arm:
        stages.append({"stage": "pretrain (CPT, no replay)", "output": str(out / "cpt_noreplay"),
                       "command": f"ellama pretrain --size tiny --from {out / 'base'} --data "
                                  f"{out / 'data' / 'manifest_noreplay.json'} --out {out / 'cpt_noreplay'}{step_flag}"})
    stages.append({"stage": "export-hf (CPT)", "output": str(out / "cpt_hf"),
                   "command": f"ellama export-hf --from {out / 'cpt'} --out {out / 'cpt_hf'}"})
    models = f"--model {out / 'base_hf'} --model {out / 'cpt_hf'}"
    if replay_arm:
        stages.append({"stage": "export-hf (CPT, no replay)", "output": str(out / "cpt_noreplay_hf"),
                       "command": f"ellama export-hf --from {out / 'cpt_noreplay'} --out {out / 'cpt_noreplay_hf'}"})
        models += f" --model {out / 'cpt_noreplay_hf'}"
    if align and align_available():
        stages += [
            {"stage": "align (SFT -> DPO)", "output": str(out / "align"),
             "command": f"ellama align --size tiny --from {out / 'cpt'} --sft {sp / 'sft'} "
                        f"--dpo {sample / 'preference'} --out {out / 'align'}"
                        + "".join(f" {o}" for o in QUICKSTART_SFT_OVERRIDES)},
            {"stage": "export-hf (aligned)", "output": str(out / "hf"),
             "command": f"ellama export-hf --from {out / 'align' / 'dpo'} --out {out / 'hf'}"},
        ]
        models += f" --model {out / 'hf'}"
    stages.append({"stage": "eval", "output": str(out / "eval"),
                   "command": f"ellama eval {models} --data domain={sp / 'eval' / 'domain_validation.jsonl'} "
                              f"--data general={sp / 'eval' / 'general_heldout.jsonl'} --limit {QUICKSTART_EVAL_LIMIT} "
                              f"--out {out / 'eval'}"})
    return stages


def _export_is_current(run: Path, hf: Path) -> bool:
    """The HF export exists and was made from the run's latest complete checkpoint."""
    from ellama_recipes.workflows.import_export import resolve_checkpoint

    rec = hf / "ellama_export.json"
    if not rec.is_file():
        return False
    try:
        return json.loads(rec.read_text()).get("checkpoint") == str(resolve_checkpoint(run))
    except (UserError, json.JSONDecodeError):
        return False


def _export(run: Path, hf: Path) -> dict:
    from ellama_recipes.workflows.import_export import export_hf

    if hf.exists():
        shutil.rmtree(hf)
    report = export_hf(run, hf)
    return {k: report[k] for k in ("checkpoint", "max_logit_diff") if k in report} | {"tensors": len(report.get("tensors", []))}


def _eval_is_current(out: Path, models: list[Path], limit: int | None) -> bool:
    """eval.json is newer than every model's files and was measured on the same models with the same --eval-limit."""
    rec = out / "eval.json"
    if not rec.is_file():
        return False
    try:
        report = json.loads(rec.read_text())
    except json.JSONDecodeError:
        return False
    if [m["model"] for m in report.get("models", [])] != [str(m) for m in models]:
        return False
    if report.get("limit", "absent") != limit:  # another --eval-limit (or a report from before it was recorded)
        return False
    newest = max(p.stat().st_mtime for m in models for p in Path(m).iterdir())
    return rec.stat().st_mtime > newest


# The quickstart's own alignment choice (not the size row's: the tests' few SFT steps on a random-init tiny model
# need the row's 3e-4). Measured on the quickstart's CPT model, 79 SFT + 20 DPO steps (150-step base, held-out general
# perplexity 5.37 after CPT): SFT max LR 3e-4 -> 19.2 (+257 %), 1e-4 -> 9.0 (+68 %), 5e-5 -> 7.0 (+31 %); with the
# 80-step base and the 160 extra classification rows (119 SFT steps) 1e-4 -> +12.5 % (5.48 -> 6.17), and still 0/44
# held-out category questions answered right; see docs/quickstart.md.
QUICKSTART_SFT_OVERRIDES: list[str] = ["sft.schedule.max_lr=1e-4"]
QUICKSTART_BASE_STEPS = TINY_BASE_STEPS  # the tiny base's general-text pretraining steps (model/tiny.py)
# At most this many examples per bundled task suite in the quickstart's eval (the suites sit near chance at this
# scale; perplexity on the held-out documents is measured on all of them). `--eval-limit 0`: every example.
QUICKSTART_EVAL_LIMIT = 100


def run_quickstart(
    out: Path, *, steps: int | None = None, base_steps: int = QUICKSTART_BASE_STEPS, align_steps: int | None = None,
    eval_limit: int | None = QUICKSTART_EVAL_LIMIT, align: bool = True, fresh: bool = False, replay_arm: bool = True,
    verbose: bool = False, echo=print,
) -> dict[str, Any]:
    from ellama_recipes.io.console import console_to_log

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with console_to_log(out / "logs" / "quickstart.log", verbose=verbose) as logs:
        return _run(out, logs, steps=steps, base_steps=base_steps, align_steps=align_steps, eval_limit=eval_limit,
                    align=align, replay_arm=replay_arm, echo=echo)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _run(out: Path, logs, *, steps, base_steps, align_steps, eval_limit, align, replay_arm, echo) -> dict[str, Any]:
    from ellama_recipes.data.bundled import sample_dir

    sample = sample_dir()
    if not (sample / "domain").is_dir() or not (sample / "general").is_dir():
        raise UserError(f"The bundled sample data is missing under {sample}. Reinstall ellama-recipes.")
    results: list[StageResult] = []
    base_hf, base, data, cpt, cpt_hf = (out / n for n in ("base_hf", "base", "data", "cpt", "cpt_hf"))
    nr, nr_hf = out / "cpt_noreplay", out / "cpt_noreplay_hf"
    align_dir, hf, eval_dir = out / "align", out / "hf", out / "eval"
    log_dir = out / "logs"

    def stage(name: str, output: Path, done: bool, fn: Callable[[], dict | None]) -> None:
        logs.switch(log_dir / f"{len(results) + 1:02d}-{_slug(name)}.log")
        try:
            _stage(results, name, output, done, fn, echo)
        except BaseException:
            echo(f"[quickstart] {name} failed; its log: {logs.path}")
            raise
        if not done:
            echo(f"[quickstart] {name}: {results[-1].seconds:.1f} s (log: {logs.path.relative_to(out)})")

    splits = prepare_splits(out)

    def build_base() -> dict:
        from ellama_recipes.model.tiny import trained_tiny_base

        trained_tiny_base(base_hf, steps=base_steps, echo=echo)
        rec = json.loads((base_hf / "ellama_base_pretrain.json").read_text())
        return {k: v for k, v in rec.items() if k != "document_ids"}

    stage("tiny base (pretrained on general text)", base_hf, (base_hf / "ellama_base_pretrain.json").is_file(),
          build_base)

    def do_import() -> dict:
        from ellama_recipes.workflows.import_export import import_hf

        import_hf("tiny", base, source=base_hf)
        return {}

    stage("import-hf", base, (base / "context").is_dir() and (base / "weights").is_dir(), do_import)

    domain_eval = out / "splits" / "eval" / "domain_validation.jsonl"

    def do_data() -> dict:
        from ellama_recipes.data.pipeline import build

        manifest = build(
            domain=[sample / "domain"], general=[out / "splits" / "general"], tokenizer=base_hf, out=data,
            ratio="1:1", non_english=0.10, mix="graph", progress=False,
        )
        write_noreplay_manifest(data)
        n = write_domain_eval(data, domain_eval)
        return {"realized": manifest.get("realized"), "rejected": sum((manifest.get("rejected") or {}).values()),
                "domain_eval_documents": n}

    stage("data build", data, all(p.is_file() for p in (data / "manifest.json", data / "manifest_noreplay.json",
                                                          domain_eval)), do_data)

    from ellama_recipes.recipes.pretrain import build_config

    cfg = build_config("tiny", manifest=str(data / "manifest.json"), restore_from=str(base), out_dir=str(cpt),
                       train_steps=steps)

    def pretrain(c) -> Callable[[], dict]:
        def go() -> dict:
            from ellama_recipes.workflows.launch import run_in_process

            return run_in_process(c)
        return go

    # Always enter the trainer: it resumes from the last complete checkpoint, and returns at once when done.
    stage("pretrain (CPT)", cpt, False, pretrain(cfg))
    if replay_arm:
        cfg_nr = build_config("tiny", manifest=str(data / "manifest_noreplay.json"), restore_from=str(base),
                              out_dir=str(nr), train_steps=steps)
        stage("pretrain (CPT, no replay)", nr, False, pretrain(cfg_nr))
    stage("export-hf (CPT)", cpt_hf, _export_is_current(cpt, cpt_hf), lambda: _export(cpt, cpt_hf))
    models, labels = [base_hf, cpt_hf], ["base", "cpt"]
    if replay_arm:
        stage("export-hf (CPT, no replay)", nr_hf, _export_is_current(nr, nr_hf), lambda: _export(nr, nr_hf))
        models.append(nr_hf)
        labels.append("cpt_noreplay")
    final_hf = cpt_hf
    aligned = align and align_available()
    if aligned:
        from ellama_recipes.workflows import align as align_mod

        def do_align() -> dict:
            req = align_mod.AlignRequest(size="tiny", from_path=str(cpt), sft=[str(out / "splits" / "sft")],
                                         dpo=[str(sample / "preference")], out=str(align_dir), sft_steps=align_steps,
                                         dpo_steps=align_steps, overrides=list(QUICKSTART_SFT_OVERRIDES))
            return {"stages": align_mod.run(req, echo=echo)}

        stage("align (SFT -> DPO)", align_dir, False, do_align)
        dpo_run = align_dir / "dpo"
        stage("export-hf (aligned)", hf, _export_is_current(dpo_run, hf), lambda: _export(dpo_run, hf))
        models.append(hf)
        labels.append("aligned")
        final_hf = hf
    else:
        why = "--no-align" if not align else "`ellama align` is not available in this install"
        echo(f"[quickstart] align (SFT -> DPO): skipped ({why}); the CPT model is the final one")

    general_eval = out / "splits" / "eval" / "general_heldout.jsonl"
    eval_data = [f"domain={domain_eval}", f"general={general_eval}"]

    def do_eval() -> dict:
        from ellama_recipes.workflows.evaluate import evaluate

        evaluate(models, data=eval_data, out=eval_dir, limit=eval_limit, labels=labels, max_docs=None, echo=echo)
        return {}

    stage("eval", eval_dir, _eval_is_current(eval_dir, models, eval_limit), do_eval)
    logs.switch(log_dir / f"{len(results) + 1:02d}-generate.log")
    report = json.loads((eval_dir / "eval.json").read_text())
    rows = {e["label"]: e for e in report["models"]}
    final = report["models"][-1]
    summary: dict[str, Any] = {
        "out": str(out),
        "domain_gain_pct": final.get("domain_gain_pct"),
        "general_regression_pct": final.get("general_regression_pct"),
        "final_model": final["label"],
        "hf_dir": str(final_hf),
        "aligned": aligned,
        "stages": {r.name: round(r.seconds, 2) for r in results},
        "stage_details": [r.__dict__ for r in results],
        "eval": [eval_row(e) for e in report["models"]],
        "eval_documents": {
            "general": f"{splits['general_eval']['documents']} held-out general documents ({general_eval}): "
                       f"{splits['rule']}; the tiny base and CPT's replay never train on them",
            "domain": f"the {sum(1 for _ in domain_eval.open())} domain documents of the blend's validation split "
                      f"({domain_eval}); CPT never trains on them",
            "tasks": "the bundled lm-eval task suites (ellama_recipes/eval_tasks, a held-out draw of the sample "
                     "generator)" + (f", at most {eval_limit} examples each" if eval_limit else ""),
        },
        "splits": splits,
        "definitions": report["definitions"],
        "metrics": _metrics_summary(cpt / "metrics.jsonl"),
        "forgetting_png": str(cpt / "forgetting.png") if (cpt / "forgetting.png").is_file() else None,
        "eval_json": str(eval_dir / "eval.json"),
    }
    if replay_arm:
        summary["replay"] = {
            "with_replay": _arm(rows["cpt"], "1:1 general:domain (the recipe)", cpt),
            "without_replay": _arm(rows["cpt_noreplay"], "domain only (general weight 0)", nr),
            "same": {"train_steps": cfg.schedule.train_steps, "max_lr": cfg.schedule.lr,
                     "global_batch_size": cfg.schedule.global_batch_size, "seq_length": cfg.schedule.seq_length,
                     "tokens": cfg.schedule.train_steps * cfg.schedule.global_batch_size * cfg.schedule.seq_length},
        }
        summary["replay"]["verdict"] = _replay_verdict(summary["replay"])
    if aligned:
        summary["dpo"] = _dpo_summary(align_dir / "dpo")
        summary["val_reward_accuracy"] = summary["dpo"].get("val_reward_accuracy")
        summary["val_margin"] = summary["dpo"].get("val_margin")
        summary["alignment"] = {
            "general_regression_vs_cpt_pct": _pct_change(rows["cpt"].get("general_score"),
                                                         rows["aligned"].get("general_score"), -1),
            "ppl_general_regression_vs_cpt_pct": _ppl_change(rows["cpt"], rows["aligned"], "general"),
            "ppl_domain_change_vs_cpt_pct": _ppl_change(rows["cpt"], rows["aligned"], "domain"),
            "sft_overrides": list(QUICKSTART_SFT_OVERRIDES),
        }
    summary["generation"] = sample_generations(base_hf, final_hf if aligned else None,
                                               out / "splits" / "eval" / "sft_heldout.jsonl")
    if aligned:
        classify = out / "splits" / "eval" / "classify_heldout.jsonl"
        acc = answer_accuracy(final_hf, classify)
        before = answer_accuracy(cpt_hf, classify)
        summary["generation_accuracy"] = {"model": "aligned", **acc,
                                          "cpt": {k: before[k] for k in ("correct", "exact_match")}}
    from ellama_recipes.io.atomic import write_json

    write_json(out / "report.json", summary)
    return summary


def _pct_change(old: float | None, new: float | None, sign: int = 1) -> float | None:
    """100 * (new - old) / old (sign -1: a fall counts positive)."""
    if old in (None, 0) or new is None:
        return None
    return sign * 100.0 * (new - old) / old


def _ppl(e: dict, side: str) -> float | None:
    return ((e.get("perplexity") or {}).get("pooled", {}).get(side) or {}).get("ppl")


def _ppl_change(old: dict, new: dict, side: str) -> float | None:
    return _pct_change(_ppl(old, side), _ppl(new, side))


def _arm(e: dict, blend: str, run: Path) -> dict[str, Any]:
    m = _metrics_summary(run / "metrics.jsonl")
    return {"blend": blend, "domain_gain_pct": e.get("domain_gain_pct"),
            "general_regression_pct": e.get("general_regression_pct"),
            "ppl_domain_gain_pct": e.get("ppl_domain_gain_pct"),
            "ppl_general_regression_pct": e.get("ppl_general_regression_pct"),
            "ppl_domain": _ppl(e, "domain"), "ppl_general": _ppl(e, "general"),
            "domain_score": e.get("domain_score"), "general_score": e.get("general_score"),
            "val_loss_general_last": (m.get("val_loss_general") or {}).get("last"),
            "val_loss_domain_last": (m.get("val_loss_domain") or {}).get("last")}


def _replay_verdict(r: dict) -> str:
    w, wo = r["with_replay"], r["without_replay"]
    parts = []
    for key, what in (("ppl_general_regression_pct", "general perplexity regression"),
                      ("general_regression_pct", "general task regression")):
        a, b = w.get(key), wo.get(key)
        if a is None or b is None:
            continue
        if a < b:
            parts.append(f"replay reduces the {what} ({a:+.2f} % with vs {b:+.2f} % without)")
        else:
            parts.append(f"replay does NOT reduce the {what} at this scale ({a:+.2f} % with vs {b:+.2f} % without)")
    return "; ".join(parts) or "not measured"


def _dpo_summary(run: Path) -> dict[str, Any]:
    rec = json.loads((run / "complete.json").read_text()) if (run / "complete.json").is_file() else {}
    s = rec.get("summary") or {}
    out = {k: s.get(k) for k in ("val_reward_accuracy", "val_margin", "first_val_margin", "first_dpo_loss",
                                 "final_dpo_loss")}
    val = run / "data" / "validation.jsonl"
    out["val_pairs"] = sum(1 for x in val.open() if x.strip()) if val.is_file() else None
    out["train_steps"] = rec.get("train_steps")
    return out


def eval_row(e: dict) -> dict[str, Any]:
    pooled = (e.get("perplexity") or {}).get("pooled", {})
    return {"model": e["label"], "dir": e["model"], "domain_score": e.get("domain_score"),
            "general_score": e.get("general_score"),
            **{f"ppl_{k}": v.get("ppl") for k, v in pooled.items()},
            "domain_gain_pct": e.get("domain_gain_pct"), "general_regression_pct": e.get("general_regression_pct"),
            "ppl_domain_gain_pct": e.get("ppl_domain_gain_pct"),
            "ppl_general_regression_pct": e.get("ppl_general_regression_pct"),
            "tasks": {k: t["score"] for k, t in e.get("tasks", {}).items()}}


def _metrics_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from ellama_recipes.io.metrics import read_metrics

    recs = read_metrics(path)
    out: dict[str, Any] = {"logged_steps": len(recs)}
    for key in ("train_loss", "val_loss_domain", "val_loss_general"):
        vals = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if vals:
            out[key] = {"first": vals[0][1], "last": vals[-1][1], "first_step": vals[0][0], "last_step": vals[-1][0]}
    return out
