"""The whole chain on the `tiny` size and the bundled sample data, on CPU, with the answer: `ellama quickstart`.

Stages (each one a command of its own, each output under OUT/):

1. ``base_hf/``   a tiny Llama-3.1-architecture HF model + tokenizer, pretrained briefly on the bundled *general*
                  sample so it has learned general text (:func:`ellama_recipes.model.tiny.trained_tiny_base`, cached)
2. ``base/``      ``ellama import-hf --size tiny --from OUT/base_hf --out OUT/base``
3. ``data/``      ``ellama data build --domain <sample>/domain --general <sample>/general --tokenizer OUT/base_hf``
4. ``cpt/``       ``ellama pretrain --size tiny --from OUT/base --data OUT/data/manifest.json --out OUT/cpt``
                  (also writes ``cpt/forgetting.png``)
5. ``cpt_hf/``    ``ellama export-hf --from OUT/cpt --out OUT/cpt_hf`` (verified)
6. ``align/``     ``ellama align --from OUT/cpt ... --out OUT/align`` (SFT then DPO), when ``ellama align`` exists
7. ``hf/``        ``ellama export-hf --from OUT/align/dpo --out OUT/hf``: the aligned model
8. ``eval/``      ``ellama eval --model OUT/base_hf --model OUT/cpt_hf --model OUT/hf --data OUT/data/manifest.json``

``OUT/report.json``: ``domain_gain_pct`` and ``general_regression_pct`` of the final model (the aligned one; the CPT
model when alignment is not available) against the base, ``hf_dir`` (its export), ``stages`` (name -> seconds of
this invocation, 0 for reused stages), ``stage_details`` and ``eval`` (the per-model table).

Stages whose output is already complete are reused, so re-running continues where a previous run stopped
(pretraining resumes from its last complete checkpoint); ``--fresh`` starts over.
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


def describe(out: Path, steps: int | None = None, align: bool = True) -> list[dict[str, str]]:
    """The stages and the equivalent commands, without running anything (`ellama quickstart --dryrun`)."""
    from ellama_recipes.data.bundled import sample_dir

    out, sample = Path(out), sample_dir()
    step_flag = f" --steps {steps}" if steps else ""
    stages = [
        {"stage": "tiny base (pretrained on general text)", "output": str(out / "base_hf"),
         "command": "python -c 'from ellama_recipes.model.tiny import trained_tiny_base; trained_tiny_base(...)'"},
        {"stage": "import-hf", "output": str(out / "base"),
         "command": f"ellama import-hf --size tiny --from {out / 'base_hf'} --out {out / 'base'}"},
        {"stage": "data build", "output": str(out / "data"),
         "command": f"ellama data build --domain {sample / 'domain'} --general {sample / 'general'} "
                    f"--tokenizer {out / 'base_hf'} --out {out / 'data'}"},
        {"stage": "pretrain (CPT)", "output": str(out / "cpt"),
         "command": f"ellama pretrain --size tiny --from {out / 'base'} --data {out / 'data' / 'manifest.json'} "
                    f"--out {out / 'cpt'}{step_flag}"},
        {"stage": "export-hf (CPT)", "output": str(out / "cpt_hf"),
         "command": f"ellama export-hf --from {out / 'cpt'} --out {out / 'cpt_hf'}"},
    ]
    models = f"--model {out / 'base_hf'} --model {out / 'cpt_hf'}"
    if align and align_available():
        stages += [
            {"stage": "align (SFT -> DPO)", "output": str(out / "align"),
             "command": f"ellama align --size tiny --from {out / 'cpt'} --sft {sample / 'sft'} "
                        f"--dpo {sample / 'preference'} --out {out / 'align'}"},
            {"stage": "export-hf (aligned)", "output": str(out / "hf"),
             "command": f"ellama export-hf --from {out / 'align' / 'dpo'} --out {out / 'hf'}"},
        ]
        models += f" --model {out / 'hf'}"
    stages.append({"stage": "eval", "output": str(out / "eval"),
                   "command": f"ellama eval {models} --data {out / 'data' / 'manifest.json'} --out {out / 'eval'}"})
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


def _eval_is_current(out: Path, models: list[Path]) -> bool:
    rec = out / "eval.json"
    if not rec.is_file():
        return False
    try:
        report = json.loads(rec.read_text())
    except json.JSONDecodeError:
        return False
    if [m["model"] for m in report.get("models", [])] != [str(m) for m in models]:
        return False
    newest = max(p.stat().st_mtime for m in models for p in Path(m).iterdir())
    return rec.stat().st_mtime > newest


def run_quickstart(
    out: Path, *, steps: int | None = None, base_steps: int = 150, align_steps: int | None = None,
    eval_limit: int | None = None, align: bool = True, fresh: bool = False, prompt: str = "Product:", echo=print,
) -> dict[str, Any]:
    from ellama_recipes.data.bundled import sample_dir

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = sample_dir()
    if not (sample / "domain").is_dir() or not (sample / "general").is_dir():
        raise UserError(f"The bundled sample data is missing under {sample}. Reinstall ellama-recipes.")
    results: list[StageResult] = []
    base_hf, base, data, cpt, cpt_hf = (out / n for n in ("base_hf", "base", "data", "cpt", "cpt_hf"))
    align_dir, hf, eval_dir = out / "align", out / "hf", out / "eval"

    def build_base() -> dict:
        from ellama_recipes.model.tiny import trained_tiny_base

        trained_tiny_base(base_hf, steps=base_steps, echo=echo)
        return json.loads((base_hf / "ellama_base_pretrain.json").read_text())

    _stage(results, "tiny base (pretrained on general text)", base_hf,
           (base_hf / "ellama_base_pretrain.json").is_file(), build_base, echo)

    def do_import() -> dict:
        from ellama_recipes.workflows.import_export import import_hf

        import_hf("tiny", base, source=base_hf)
        return {}

    _stage(results, "import-hf", base, (base / "context").is_dir() and (base / "weights").is_dir(), do_import, echo)

    def do_data() -> dict:
        from ellama_recipes.data.pipeline import build

        manifest = build(
            domain=[sample / "domain"], general=[sample / "general"], tokenizer=base_hf, out=data,
            ratio="1:1", non_english=0.10, mix="graph",
        )
        return {"realized": manifest.get("realized"), "rejected": sum((manifest.get("rejected") or {}).values())}

    _stage(results, "data build", data, (data / "manifest.json").is_file(), do_data, echo)

    from ellama_recipes.recipes.pretrain import build_config

    cfg = build_config("tiny", manifest=str(data / "manifest.json"), restore_from=str(base), out_dir=str(cpt),
                       train_steps=steps)

    def do_pretrain() -> dict:
        from ellama_recipes.workflows.launch import run_in_process

        return run_in_process(cfg)

    # Always enter the trainer: it resumes from the last complete checkpoint, and returns at once when done.
    _stage(results, "pretrain (CPT)", cpt, False, do_pretrain, echo)
    _stage(results, "export-hf (CPT)", cpt_hf, _export_is_current(cpt, cpt_hf), lambda: _export(cpt, cpt_hf), echo)

    models, labels = [base_hf, cpt_hf], ["base", "cpt"]
    final_hf = cpt_hf
    aligned = align and align_available()
    if aligned:
        from ellama_recipes.workflows import align as align_mod

        def do_align() -> dict:
            req = align_mod.AlignRequest(size="tiny", from_path=str(cpt), sft=[str(sample / "sft")],
                                         dpo=[str(sample / "preference")], out=str(align_dir), sft_steps=align_steps,
                                         dpo_steps=align_steps)
            return {"stages": align_mod.run(req, echo=echo)}

        _stage(results, "align (SFT -> DPO)", align_dir, False, do_align, echo)
        dpo_run = align_dir / "dpo"
        _stage(results, "export-hf (aligned)", hf, _export_is_current(dpo_run, hf), lambda: _export(dpo_run, hf), echo)
        models.append(hf)
        labels.append("aligned")
        final_hf = hf
    else:
        why = "--no-align" if not align else "`ellama align` is not available in this install"
        echo(f"[quickstart] align (SFT -> DPO): skipped ({why}); the CPT model is the final one")

    def do_eval() -> dict:
        from ellama_recipes.workflows.evaluate import evaluate

        evaluate(models, data=[str(data / "manifest.json")], out=eval_dir, limit=eval_limit, labels=labels,
                 echo=echo)
        return {}

    _stage(results, "eval", eval_dir, _eval_is_current(eval_dir, models), do_eval, echo)
    report = json.loads((eval_dir / "eval.json").read_text())
    final = report["models"][-1]
    summary = {
        "out": str(out),
        "domain_gain_pct": final.get("domain_gain_pct"),
        "general_regression_pct": final.get("general_regression_pct"),
        "final_model": final["label"],
        "hf_dir": str(final_hf),
        "aligned": aligned,
        "stages": {r.name: round(r.seconds, 2) for r in results},
        "stage_details": [r.__dict__ for r in results],
        "eval": [eval_row(e) for e in report["models"]],
        "definitions": report["definitions"],
        "metrics": _metrics_summary(cpt / "metrics.jsonl"),
        "forgetting_png": str(cpt / "forgetting.png") if (cpt / "forgetting.png").is_file() else None,
        "eval_json": str(eval_dir / "eval.json"),
        "generation": {"prompt": prompt, "text": generate(final_hf, prompt)},
    }
    from ellama_recipes.io.atomic import write_json

    write_json(out / "report.json", summary)
    return summary


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


def generate(hf_dir: Path, prompt: str, max_new_tokens: int = 24) -> str:
    """Load the exported model with transformers (CPU) and greedily continue ``prompt``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0], skip_special_tokens=True)
