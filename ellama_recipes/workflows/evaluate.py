"""`ellama eval`: did the adaptation pay? Domain gain and general regression of HF models against a baseline.

    ellama eval --model .quickstart/base_hf --model .quickstart/hf --data .quickstart/data/manifest.json --out eval

Two kinds of measurement, per model:

* **Perplexity per source** (:mod:`ellama_recipes.workflows.perplexity`) on held-out text: the validation split of a blend manifest (the same document range
  of every ``.bin/.idx`` prefix that pretraining validates on: Megatron's split rule, default ``990,10,0``), or
  JSONL text (``domain=PATH`` / ``general=PATH``). Reported per source and pooled as ``domain``, ``general``,
  ``general_en`` and ``general_non_en``. A document is scored as ``[bos] + tokens`` in non-overlapping windows of
  ``max_length`` tokens, each window predicting its tokens after the first; perplexity = exp(total NLL / predicted
  tokens) (what ``model(ids, labels=ids).loss`` gives for one window).
* **Task suites** through lm-evaluation-harness (``lm_eval.simple_evaluate`` with an ``HFLM``): the bundled
  e-commerce and general tasks (``ellama_recipes/eval_tasks/``), the user's own task YAML files, or any harness task
  name. A task is a *domain* task when its YAML says ``metadata: {side: domain}`` (or its ``tag`` names
  ``domain``); every other task is *general*. A task's score is the first higher-is-better metric of its
  ``metric_list`` (harness tasks: the first higher-is-better metric the harness reports).

The two numbers (definitions repeated in ``ellama eval --help`` and docs/evaluation.md):

* D(m) = macro-average (unweighted mean) of the task scores of model m over the domain tasks; G(m) the same over the
  general tasks. ``domain_gain_pct = 100 * (D(m) - D(base)) / D(base)``;
  ``general_regression_pct = 100 * (G(base) - G(m)) / G(base)`` (positive = general ability lost).
* Perplexity-based when no task of that side was run:
  ``domain_gain_pct = 100 * (PPL_domain(base) - PPL_domain(m)) / PPL_domain(base)``;
  ``general_regression_pct = 100 * (PPL_general(m) - PPL_general(base)) / PPL_general(base)``.

``base`` is the first ``--model``. Outputs: ``OUT/eval.json`` and ``OUT/eval.png`` (the two numbers per model).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.workflows.perplexity import device as default_device
from ellama_recipes.workflows.perplexity import (  # noqa: F401 (perplexity, split_range: this module's API too)
    DEFAULT_SPLIT, TextSource, load_sources, model_perplexity, perplexity, split_range,
)

BUNDLED_DIR = Path(__file__).parent.parent / "eval_tasks"
SIDES = ("domain", "general")

DEFINITIONS = {
    "domain_gain_pct": "100 * (D(m) - D(base)) / D(base), D = macro-average of the task scores over domain tasks; "
                       "without domain tasks: 100 * (PPL_domain(base) - PPL_domain(m)) / PPL_domain(base)",
    "general_regression_pct": "100 * (G(base) - G(m)) / G(base), G = macro-average of the task scores over general "
                              "tasks; without general tasks: 100 * (PPL_general(m) - PPL_general(base)) / "
                              "PPL_general(base)",
    "ppl_domain_gain_pct": "100 * (PPL_domain(base) - PPL_domain(m)) / PPL_domain(base) (always, when measured)",
    "ppl_general_regression_pct": "100 * (PPL_general(m) - PPL_general(base)) / PPL_general(base) (always, when measured)",
}


# ----------------------------------------------------------------------------------------------------------- tasks
@dataclass
class TaskRef:
    """One requested task: its harness spec (a config dict or a name/path string), side and primary metric."""

    name: str
    side: str
    spec: Any
    origin: str  # bundled | yaml | harness
    metric: str | None = None


def _side_of(cfg: dict) -> str:
    meta = cfg.get("metadata") or {}
    side = meta.get("side") if isinstance(meta, dict) else None
    if side in SIDES:
        return side
    tags = cfg.get("tag") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    return "domain" if any("domain" in str(t) for t in tags) else "general"


def _yaml_task(path: Path, origin: str) -> TaskRef:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError:
        # Harness-specific tags (!function ...): let the harness read the file itself.
        return TaskRef(path.stem, "general", str(path), origin)
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"Task file {path} could not be read as YAML ({exc}). Fix the file or pass a task name.") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise UserError(f"Task file {path} has no `task:` key; an lm-evaluation-harness task YAML names its task. "
                        "See ellama_recipes/eval_tasks/*.yaml for examples.")
    # data_files relative to the YAML's folder (the bundled tasks; convenient for users' tasks too)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list, dict)):
        def fix(p: str) -> str:
            q = path.parent / p
            return str(q) if not Path(p).is_absolute() and q.exists() else p

        if isinstance(files, str):
            files = fix(files)
        elif isinstance(files, list):
            files = [fix(p) for p in files]
        else:
            files = {k: (fix(v) if isinstance(v, str) else [fix(x) for x in v]) for k, v in files.items()}
        cfg = {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": files}}
    metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)
               and m.get("higher_is_better", True) and isinstance(m.get("metric"), str)]
    return TaskRef(str(cfg["task"]), _side_of(cfg), cfg, origin, metrics[0] if metrics else None)


def bundled_tasks() -> list[TaskRef]:
    return [_yaml_task(p, "bundled") for p in sorted(BUNDLED_DIR.glob("*.yaml"))]


def resolve_tasks(specs: list[str] | None) -> list[TaskRef]:
    """``--tasks`` values -> task refs. Empty/None or ``bundled``: the bundled suite; ``none``: perplexity only."""
    specs = list(specs or ["bundled"])
    if specs == ["none"]:
        return []
    bundled = {t.name: t for t in bundled_tasks()}
    out: list[TaskRef] = []
    unknown: list[str] = []
    for s in specs:
        if s == "bundled":
            out += bundled.values()
        elif s in bundled:
            out.append(bundled[s])
        elif s.endswith((".yaml", ".yml")) or os.sep in s:
            p = Path(s)
            if not p.is_file():
                raise UserError(f"--tasks {s}: no such task file. Pass an lm-evaluation-harness task YAML, a harness "
                                "task name, `bundled` (the default suite) or `none`.")
            out.append(_yaml_task(p, "yaml"))
        else:
            unknown.append(s)
    if unknown:
        tm = _task_manager(with_harness=True)
        for s in unknown:
            if s not in tm.all_tasks:
                close = difflib.get_close_matches(s, list(bundled) + tm.all_tasks, n=5)
                raise UserError(f"--tasks {s}: not a bundled task ({', '.join(bundled)}), a task file, or an "
                                f"lm-evaluation-harness task name. Close matches: {', '.join(close) or 'none'}.")
            out.append(TaskRef(s, "general", s, "harness"))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--tasks names {', '.join(dup)} more than once; pass each task once.")
    return out


_TM: dict[bool, Any] = {}


def _task_manager(with_harness: bool):
    from lm_eval.tasks import TaskManager

    if with_harness not in _TM:
        _TM[with_harness] = TaskManager(include_defaults=with_harness)
    return _TM[with_harness]


def check_tasks_load(tasks: list[TaskRef]) -> None:
    """Build every task's dataset once before any model loads: missing data or a needed download fails here."""
    if not tasks:
        return
    tm = _task_manager(any(t.origin == "harness" for t in tasks))
    for t in tasks:
        try:
            tm.load([t.spec])
        except (ConnectionError, OSError, ImportError, ValueError, KeyError) as exc:
            raise _task_error(t, exc) from None


def _task_error(t: TaskRef, exc: BaseException) -> UserError:
    msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if isinstance(exc, ConnectionError) or "Hub" in msg or "offline" in msg.lower():
        return UserError(
            f"Task {t.name!r} needs its dataset from the Hugging Face Hub and it could not be downloaded here ({msg}). "
            "Fix: run where huggingface.co is reachable (or with the dataset already in HF_DATASETS_CACHE), or pass "
            "a local task YAML (dataset_path: json, dataset_kwargs: {data_files: ...}) like "
            "ellama_recipes/eval_tasks/*.yaml.")
    return UserError(f"Task {t.name!r} could not be loaded by lm-evaluation-harness ({type(exc).__name__}: {msg}). "
                     "Fix the task YAML (dataset_path, data_files, doc_to_text/doc_to_choice/doc_to_target).")


def _primary(result: dict, hib: dict, preferred: str | None) -> tuple[str | None, float | None]:
    order = ([preferred] if preferred else []) + [m for m, up in (hib or {}).items() if up]
    for metric in order:
        for key, value in result.items():
            if key.split(",")[0] == metric and "_stderr" not in key and isinstance(value, (int, float)):
                return metric, float(value)
    return None, None


def run_tasks(model_dir: Path, tasks: list[TaskRef], *, limit: int | None = None, batch_size: int = 16,
              device: str | None = None) -> dict[str, dict]:
    """Evaluate one HF model directory on ``tasks`` with lm-evaluation-harness; returns name -> scores."""
    if not tasks:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = _task_manager(any(t.origin == "harness" for t in tasks))
    with _single_process_env():
        lm = HFLM(pretrained=str(model_dir), device=device or default_device(), batch_size=batch_size, dtype="float32")
        try:
            res = simple_evaluate(model=lm, tasks=[t.spec for t in tasks], task_manager=tm, limit=limit,
                                  log_samples=False, bootstrap_iters=0, verbosity="WARNING")
        except (ConnectionError, OSError) as exc:
            raise _task_error(tasks[0], exc) from None
    out: dict[str, dict] = {}
    for t in tasks:
        r = res["results"].get(t.name)
        if r is None:
            raise UserError(f"lm-evaluation-harness returned no result for task {t.name!r}; check its YAML.")
        metric, score = _primary(r, res.get("higher_is_better", {}).get(t.name, {}), t.metric)
        metrics = {k.split(",")[0] if k.endswith(",none") else k: v for k, v in r.items()
                   if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"}
        out[t.name] = {"side": t.side, "metric": metric, "score": score, "metrics": metrics,
                       "samples": r.get("sample_len"), "origin": t.origin}
    return out


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def _single_process_env():
    """Hide torchrun-style variables left behind by an in-process training run (the quickstart trains in this
    process before evaluating): with LOCAL_RANK set, accelerate (inside HFLM) would try to join a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield
        return
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---------------------------------------------------------------------------------------------------------- report
def _pct(new: float | None, old: float | None, sign: int) -> float | None:
    if new is None or old is None or not math.isfinite(old) or old == 0:
        return None
    return 100.0 * sign * (new - old) / old


def side_score(tasks: dict[str, dict], side: str) -> float | None:
    scores = [t["score"] for t in tasks.values() if t["side"] == side and t["score"] is not None]
    return sum(scores) / len(scores) if scores else None


def compare(base: dict, m: dict) -> dict[str, Any]:
    """domain_gain_pct / general_regression_pct of model entry ``m`` against ``base`` (definitions above)."""
    out: dict[str, Any] = {}
    for side, key, sign in (("domain", "domain_gain_pct", -1), ("general", "general_regression_pct", 1)):
        b, n = side_score(base["tasks"], side), side_score(m["tasks"], side)
        if b is not None and n is not None:
            # tasks: higher is better; gain = (new - old)/old, regression = (old - new)/old
            out[key] = _pct(n, b, -sign)
            out[f"{side}_basis"] = "tasks"
            continue
        bp = base["perplexity"].get("pooled", {}).get(side, {}).get("ppl")
        np_ = m["perplexity"].get("pooled", {}).get(side, {}).get("ppl")
        if bp is not None and np_ is not None:
            # perplexity: lower is better; gain = (old - new)/old, regression = (new - old)/old
            out[key] = _pct(np_, bp, sign)
            out[f"{side}_basis"] = "perplexity"
        else:
            out[key] = None
            out[f"{side}_basis"] = None
    # Always reported alongside when both have perplexity (informative where the task suites sit near chance):
    for side, key, sign in (("domain", "ppl_domain_gain_pct", -1), ("general", "ppl_general_regression_pct", 1)):
        bp = base["perplexity"].get("pooled", {}).get(side, {}).get("ppl")
        np_ = m["perplexity"].get("pooled", {}).get(side, {}).get("ppl")
        out[key] = _pct(np_, bp, sign) if bp is not None and np_ is not None else None
    return out


def _labels(models: list[Path]) -> list[str]:
    names = [Path(m).name or str(m) for m in models]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def check_model_dir(d: Path) -> None:
    if not (Path(d) / "config.json").is_file():
        raise UserError(f"--model {d}: not a Hugging Face model directory (no config.json). Pass what "
                        "`ellama export-hf` or `ellama merge` wrote.")


def evaluate(
    models: list[Path], *, data: list[str] | None = None, tasks: list[str] | None = None, out: Path | None = None,
    split: str = DEFAULT_SPLIT, limit: int | None = None, batch_size: int = 16, max_docs: int | None = 200,
    labels: list[str] | None = None, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``models`` (the first is the baseline); write ``out/eval.json`` and ``out/eval.png`` if ``out``."""
    if not models:
        raise UserError("Pass at least one --model (the first is the baseline).")
    for d in models:
        check_model_dir(d)
    refs = resolve_tasks(tasks)
    sources = load_sources(data, split, max_docs)
    if not refs and not sources:
        raise UserError("Nothing to measure: --tasks none and no --data. Pass --data MANIFEST (or domain=/general= "
                        "JSONL) for perplexity, or task names/YAML files.")
    check_tasks_load(refs)
    labels = labels or _labels(models)
    entries = []
    for label, d in zip(labels, models):
        echo(f"[eval] {label}: perplexity on {sum(len(s.texts) for s in sources)} documents, {len(refs)} tasks")
        entry = {"label": label, "model": str(d),
                 "perplexity": model_perplexity(Path(d), sources, batch_size=max(1, batch_size // 2)) if sources else {},
                 "tasks": run_tasks(Path(d), refs, limit=limit, batch_size=batch_size)}
        entry["domain_score"] = side_score(entry["tasks"], "domain")
        entry["general_score"] = side_score(entry["tasks"], "general")
        entries.append(entry)
    for e in entries[1:]:
        e.update(compare(entries[0], e))
    report = {"baseline": entries[0]["label"], "models": entries, "definitions": DEFINITIONS,
              "tasks": [{"name": t.name, "side": t.side, "origin": t.origin} for t in refs],
              "split": split if any(not (d.split("=", 1)[0] in SIDES) for d in data or []) else None,
              "limit": limit}
    if out is not None:
        write_report(report, Path(out))
    return report


def write_report(report: dict, out: Path) -> None:
    from ellama_recipes.io.charts import eval_bars
    from ellama_recipes.io.atomic import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", report)
    eval_bars([(e["label"], e.get("domain_gain_pct"), e.get("general_regression_pct")) for e in report["models"][1:]],
              out / "eval.png", baseline=report["baseline"])
