"""The whole chain on the `tiny` size and the bundled sample data, on CPU: `ellama quickstart`.

Stages (each one a command of its own, each output under OUT/):

1. ``base_hf/``   a tiny Llama-3.1-architecture HF model + a tokenizer trained on the bundled sample (no hub)
2. ``base/``      ``ellama import-hf --size tiny --from OUT/base_hf --out OUT/base``
3. ``data/``      ``ellama data build --domain <sample>/domain --general <sample>/general --tokenizer OUT/base_hf``
4. ``cpt/``       ``ellama pretrain --size tiny --from OUT/base --data OUT/data/manifest.json --out OUT/cpt``
5. ``hf/``        ``ellama export-hf --from OUT/cpt --out OUT/hf`` (verified), then loaded with transformers and
                  asked to generate.

Stages whose output is already complete are reused, so re-running continues where a previous run stopped
(pretraining resumes from its last complete checkpoint); ``--fresh`` starts over.
"""

from __future__ import annotations

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


def describe(out: Path, steps: int | None = None) -> list[dict[str, str]]:
    """The stages and the equivalent commands, without running anything (`ellama quickstart --dryrun`)."""
    from ellama_recipes.data.sample import sample_dir

    out, sample = Path(out), sample_dir()
    step_flag = f" --steps {steps}" if steps else ""
    return [
        {"stage": "tiny base model + tokenizer", "output": str(out / "base_hf"),
         "command": "python -c 'from ellama_recipes.tiny import build_tiny_base; build_tiny_base(...)'"},
        {"stage": "import-hf", "output": str(out / "base"),
         "command": f"ellama import-hf --size tiny --from {out / 'base_hf'} --out {out / 'base'}"},
        {"stage": "data build", "output": str(out / "data"),
         "command": f"ellama data build --domain {sample / 'domain'} --general {sample / 'general'} "
                    f"--tokenizer {out / 'base_hf'} --out {out / 'data'}"},
        {"stage": "pretrain (CPU)", "output": str(out / "cpt"),
         "command": f"ellama pretrain --size tiny --from {out / 'base'} --data {out / 'data' / 'manifest.json'} "
                    f"--out {out / 'cpt'}{step_flag}"},
        {"stage": "export-hf", "output": str(out / "hf"),
         "command": f"ellama export-hf --from {out / 'cpt'} --out {out / 'hf'}"},
    ]


def run_quickstart(
    out: Path, *, steps: int | None = None, fresh: bool = False, prompt: str = "Product:", echo=print
) -> dict[str, Any]:
    from ellama_recipes.data.sample import sample_dir

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    sample = sample_dir()
    if not (sample / "domain").is_dir() or not (sample / "general").is_dir():
        raise UserError(f"The bundled sample data is missing under {sample}. Reinstall ellama-recipes.")
    results: list[StageResult] = []
    base_hf, base, data, cpt, hf = (out / n for n in ("base_hf", "base", "data", "cpt", "hf"))

    def build_base() -> dict:
        from ellama_recipes.tiny import build_tiny_base

        build_tiny_base(base_hf, seed=0)
        return {}

    _stage(results, "tiny base model + tokenizer", base_hf, (base_hf / "config.json").is_file(), build_base, echo)

    def do_import() -> dict:
        from ellama_recipes.convert import import_hf

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

    from ellama_recipes.recipe import build_pretrain_config

    cfg = build_pretrain_config(
        "tiny", manifest=str(data / "manifest.json"), restore_from=str(base), out_dir=str(cpt), train_steps=steps
    )
    def do_pretrain() -> dict:
        from ellama_recipes.engine.train import run_local

        return run_local(cfg)

    # Always enter the trainer: it resumes from the last complete checkpoint, and returns at once when done.
    _stage(results, "pretrain (CPU)", cpt, False, do_pretrain, echo)

    def do_export() -> dict:
        from ellama_recipes.convert import export_hf

        if hf.exists():
            shutil.rmtree(hf)
        report = export_hf(cpt, hf)
        return {k: report[k] for k in ("max_logit_diff", "tensors") if k in report}

    _stage(results, "export-hf", hf, False, do_export, echo)
    sample_text = generate(hf, prompt)
    return {
        "out": str(out),
        "stages": [r.__dict__ for r in results],
        "metrics": _metrics_summary(cpt / "metrics.jsonl"),
        "generation": {"prompt": prompt, "text": sample_text},
        "hf_dir": str(hf),
    }


def _metrics_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
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
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0], skip_special_tokens=True)
