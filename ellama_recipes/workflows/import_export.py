"""Hugging Face <-> engine checkpoints: download, convert, verify, write atomically.

    ellama import-hf --size 8b --out checkpoints/llama31-8b          # Hub (token from $HF_TOKEN), resumable
    ellama import-hf --size tiny --out checkpoints/tiny              # builds the tiny base locally, no Hub
    ellama import-hf --from ./my-llama --out checkpoints/mine        # any Llama-3.1-architecture shape
    ellama export-hf --from runs/cpt --out hf/llama31-8b-ecom        # latest complete checkpoint of a run

Python (what the quickstart calls)::

    ckpt = import_hf("tiny", Path("checkpoints/tiny"))
    report = export_hf(Path("runs/cpt"), Path("hf/tiny-ecom"))

The conversion streams one tensor group at a time (ellama_recipes.engine.checkpoint, mapping table in
ellama_recipes.engine.bridge); this module finds the source, checks it, shows progress in bytes and never
leaves a half-written output: work happens in a hidden temp dir next to the output, renamed into place only
after verification passed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ellama_recipes.io.atomic import atomic_dir as _atomic_dir
from ellama_recipes.errors import UserError
from ellama_recipes.model import architecture
from ellama_recipes.model.sizes import SIZES, get_size

# Files an HF Llama checkpoint needs (no *.pth "original/" consolidated weights, no gguf).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
UNFINISHED_SUFFIX = "-unfinished"  # nemo.lightning.pytorch.callbacks.ModelCheckpoint.UNFINISHED_CHECKPOINT_SUFFIX


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def atomic_dir(out: Path):
    """The output folder written atomically; an existing ``out`` is an error (an export never overwrites)."""
    return _atomic_dir(out, replace=False)


def _progress(enabled: bool):
    """Progress in bytes of model tensors (converted, then verified), with throughput."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TransferSpeedColumn)

    from rich.console import Console

    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled, transient=False,
    )


def _bytes_task(prog, description: str, total: int):
    task = prog.add_task(description, total=total)
    return lambda n: prog.update(task, advance=n)


def _is_hf_dir(p: Path) -> bool:
    return (p / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Hub download
# ----------------------------------------------------------------------------------------------------------------


def download_hf(repo_id: str, *, cache_dir: Path | None = None, revision: str | None = None,
                progress: bool = True) -> Path:
    """snapshot_download of the files a Llama checkpoint needs; resumable (re-run continues partial files).

    The token comes from the environment (``HF_TOKEN``); offline (``HF_HUB_OFFLINE=1``) the local cache is used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, disable_progress_bars,
        enable_progress_bars,
    )

    token = os.environ.get("HF_TOKEN") or None
    if not progress:
        disable_progress_bars()
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache_dir) if cache_dir else None, token=token,
            allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=["original/*"],  # Meta's consolidated .pth copy
        )
    except GatedRepoError as exc:
        raise UserError(
            f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id} and export HF_TOKEN "
            f"with a token of that account (now {'set' if token else 'unset'})."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise UserError(
            f"Hub repo {repo_id!r} was not found (or HF_TOKEN lacks access). Check the name, or pass a local "
            "directory with --from."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise UserError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). Connect to the network, or download it "
            "elsewhere and pass the directory with --from."
        ) from exc
    except HfHubHTTPError as exc:
        raise UserError(f"Downloading {repo_id} failed: {exc}. Re-run the same command to resume.") from exc
    finally:
        if not progress:
            enable_progress_bars()
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------


def _require_size(size_name: str, spec: dict, src: str) -> None:
    """`--size S` together with a source: the source must have S's architecture (every size row alike)."""
    bad = architecture.mismatches(spec, get_size(size_name).arch)
    if bad:
        raise UserError(
            f"{src} is not a Llama 3.1 {size_name} model. Pass the --size that matches it, or leave --size out: "
            "with --from the architecture is read from the source's config.json.", problems=bad,
        )


def _source_kind(size: str | None, source: str | Path | None) -> str:
    if source is not None and Path(source).exists():
        return "local"
    if source is not None or (size is not None and get_size(size).hf_repo):
        return "hub"
    if size is None:
        raise UserError("import-hf needs --from (a local HF directory or a Hub repo id) or --size (the size's Hub "
                        f"repo, or a locally built model for sizes without one): sizes are {', '.join(SIZES)}.")
    return "built"  # the size row names no Hub repo: its base is built locally (ellama_recipes.model.tiny)


def describe_import(size: str | None, out: Path, source: str | Path | None = None) -> dict:
    """What `import-hf` would do (the --dryrun output); reads nothing from the network."""
    kind = _source_kind(size, source)
    plan: dict = {"size": size, "out": str(out)}
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rope_scaling")
    if kind == "local":
        plan["source"] = {"kind": "local", "path": str(Path(source).resolve())}
        if _is_hf_dir(Path(source)):
            cfg = json.loads((Path(source) / "config.json").read_text())
            if size is not None:
                _require_size(size, architecture.from_hf(cfg, Path(source) / "config.json"), str(source))
            plan["architecture"] = {k: cfg.get(k) for k in keys + ("torch_dtype",)}
            plan["files"] = sorted(p.name for p in Path(source).iterdir() if p.is_file())
    elif kind == "hub":
        repo = str(source) if source is not None else get_size(size).hf_repo
        plan["source"] = {"kind": "hub", "repo": repo, "allow_patterns": HUB_ALLOW_PATTERNS,
                          "token": "HF_TOKEN set" if os.environ.get("HF_TOKEN") else "HF_TOKEN unset"}
    else:
        plan["source"] = {"kind": "built", "what": f"{size}: Llama-3.1-architecture model built locally "
                                                   "(ellama_recipes.model.tiny)"}
        hf = architecture.to_hf(get_size(size).arch)
        plan["architecture"] = {k: hf[k] for k in keys}
    plan["steps"] = ["resolve source", "stream HF tensors -> Megatron torch_dist checkpoint (weights/) + NeMo "
                     "context/, one tensor group at a time", "read back and verify every HF tensor bit-exact",
                     f"rename into {out}"]
    return plan


def import_hf(size: str | None, out: Path, source: str | Path | None = None, progress: bool = True,
              workers: int = 1) -> Path:
    """HF Llama 3.1 (Hub repo id, local directory, or the size row's locally built base) -> engine checkpoint.

    With a source, the architecture is the source's (``size``, when given, must match it). Every HF tensor is
    verified bit-exact in the written checkpoint; on any failure ``out`` is not created. Returns ``out``. The
    verification report is written to ``out/ellama_import.json``.
    """
    from ellama_recipes.model.tiny import build_tiny_base

    kind = _source_kind(size, source)
    out = Path(out)
    with atomic_dir(out) as tmp, _progress(progress) as prog:
        if kind == "local":
            hf_dir = Path(source)
            if not _is_hf_dir(hf_dir):
                raise UserError(f"--from {source} has no config.json; pass a Hugging Face model directory.")
            origin = {"kind": "local", "path": str(hf_dir.resolve())}
        elif kind == "hub":
            repo = str(source) if source is not None else get_size(size).hf_repo
            if source is not None and (str(source).startswith((".", "/", "~")) or str(source).count("/") != 1):
                raise UserError(f"--from {source} does not exist (and is not a Hub repo id like org/name).")
            hf_dir = download_hf(repo, progress=progress)
            origin = {"kind": "hub", "repo": repo, "snapshot": str(hf_dir)}
        else:
            hf_dir = build_tiny_base(tmp / "hf-base", arch=get_size(size).arch)
            origin = {"kind": "built", "seed": 0}
        cfg = architecture.read_hf_config(hf_dir)
        spec = architecture.from_hf(cfg, hf_dir / "config.json")
        if size is not None and kind != "built":
            _require_size(size, spec, str(source or get_size(size).hf_repo))

        from ellama_recipes.engine.checkpoint.hf_import import import_hf_to_engine, model_bytes

        total = model_bytes(hf_dir)
        ckpt_tmp = tmp / "ckpt"
        rep = import_hf_to_engine(hf_dir, ckpt_tmp, workers=workers,
                                  progress=_bytes_task(prog, "import-hf: convert + write", total),
                                  verify_progress=_bytes_task(prog, "import-hf: verify", total))
        report = {"source": origin, "size": size, "architecture": spec, "tensors": len(rep.checks),
                  "all_equal": not rep.bad, "checks": [c.as_dict() for c in rep.checks]}
        (ckpt_tmp / "ellama_import.json").write_text(json.dumps(report, indent=2))
        for child in list(tmp.iterdir()):
            if child.name != "ckpt":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        for child in list(ckpt_tmp.iterdir()):
            child.rename(tmp / child.name)
        ckpt_tmp.rmdir()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint discovery (imported checkpoints and the trainer's RUN/checkpoints/...)
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Why ``ckpt`` is not a complete engine checkpoint (empty list when it is).

    The same checks resume uses (:func:`ellama_recipes.engine.resume.checkpoint_content_problem`: context,
    weights metadata, every listed shard present and long enough), plus the trainer's ``-unfinished`` marker.
    """
    from ellama_recipes.engine.resume import checkpoint_content_problem

    ckpt = Path(ckpt)
    problems = []
    marker = Path(str(ckpt) + UNFINISHED_SUFFIX)
    if marker.exists():
        problems.append(f"the trainer's unfinished marker {marker.name} exists (save was interrupted)")
    if not ckpt.resolve().is_dir():
        problems.append(f"it points to {ckpt.resolve()}, which does not exist")
    else:
        content = checkpoint_content_problem(ckpt.resolve())
        if content:
            problems.append(content)
    return problems


def _is_checkpoint_dir(p: Path) -> bool:
    return (p / "weights").exists() or (p / "context").exists()


def resolve_checkpoint(path: Path, *, echo=None) -> Path:
    """A checkpoint dir, or a run dir -> its latest COMPLETE checkpoint. Incomplete ones are skipped with a message.

    A run dir is searched one level deep only: ``RUN/checkpoints/*`` (the trainer's layout) and ``RUN/*``; never an
    arbitrary tree, so a stray checkpoint elsewhere is never exported by accident.
    """
    from ellama_recipes.engine.resume import checkpoint_step

    path = Path(path)
    if not path.exists():
        raise UserError(f"--from {path} does not exist; pass an engine checkpoint dir (weights/ + context/) or a run dir.")
    if _is_checkpoint_dir(path):
        problems = checkpoint_problems(path)
        if problems:
            raise UserError(
                f"{path} is a partial or corrupt checkpoint; pick another checkpoint (or the run dir, to take the "
                "latest complete one) or re-run the step that wrote it.", problems=problems,
            )
        return path
    seen, candidates = set(), []
    for parent in (path / "checkpoints", path):
        if not parent.is_dir():
            continue
        for c in sorted(parent.iterdir()):
            key = c.resolve()
            if (c.is_dir() or c.is_symlink()) and key not in seen and (_is_checkpoint_dir(c) or c.is_symlink()):
                seen.add(key)
                candidates.append(c)
    if not candidates:
        raise UserError(
            f"No checkpoint under {path}: expected weights/ + context/ here, under {path}/checkpoints/<name>/ or "
            f"{path}/<name>/. Pass the directory written by `ellama import-hf` or `ellama pretrain`."
        )
    complete, skipped = [], []
    for c in candidates:
        probs = checkpoint_problems(c)
        (skipped if probs else complete).append((c, probs))
    for c, probs in skipped:
        if echo:
            echo(f"skipping incomplete checkpoint {c}: {'; '.join(probs)}")
    if not complete:
        raise UserError(f"Every checkpoint under {path} is partial or corrupt:",
                        problems=[f"{c}: {'; '.join(p)}" for c, p in skipped])
    complete.sort(key=lambda cp: (checkpoint_step(cp[0]) or -1, (cp[0] / "weights" / ".metadata").stat().st_mtime))
    return complete[-1][0]


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


# Above this many model bytes the logits check (it instantiates the whole model in float32) is skipped unless asked.
LOGITS_CHECK_MAX_BYTES = 1 << 30


def export_hf(ckpt: Path, out: Path, dryrun: bool = False, progress: bool = True, echo=None, workers: int = 1,
              check_logits: bool | None = None) -> dict:
    """Engine checkpoint (or run dir) -> verified HF directory. See ellama_recipes.engine.checkpoint for the checks.

    Returns a report: ``checkpoint``, ``out``, ``mapping`` (engine -> HF names, shapes, dtypes), ``tensors``
    (per-tensor results) and, when the logits check ran, ``max_logit_diff`` / ``logit_tolerance``. With ``dryrun``
    only the mapping is computed and nothing is written. ``check_logits`` None = only for models up to
    LOGITS_CHECK_MAX_BYTES (the check loads the whole model). A failed verification raises UserError and
    leaves no ``out``.
    """
    if not dryrun and Path(out).exists():
        raise UserError(f"Output {out} already exists; choose a new --out or remove it first.")
    src = resolve_checkpoint(ckpt, echo=echo)

    from ellama_recipes.engine.checkpoint import hf_export, parity

    plan = hf_export.plan_export(src)
    mapping = [{"engine": g.megatron, "hf": h, "engine_shape": list(g.engine_shape), "shape": list(s),
                "dtype": str(plan.dtype).replace("torch.", "")} for g in plan.groups for h, s in zip(g.hf, g.hf_shapes)]
    report: dict = {"checkpoint": str(src), "out": str(out), "mapping": mapping}
    if dryrun:
        return report
    if check_logits is None:
        check_logits = plan.nbytes <= LOGITS_CHECK_MAX_BYTES
    with atomic_dir(Path(out)) as tmp, _progress(progress) as prog:
        rep = hf_export.export_engine_to_hf(
            src, tmp, workers=workers, plan=plan,
            progress=_bytes_task(prog, "export-hf: convert + write", plan.nbytes),
            verify_progress=_bytes_task(prog, "export-hf: verify", plan.nbytes))
        report["tensors"] = [c.as_dict() for c in rep.checks]
        if rep.bad:
            raise UserError(
                f"Export verification failed: {len(rep.bad)} of {len(rep.checks)} tensors are missing, duplicated "
                f"or differ between {src} and the HF export; nothing was written to {out}.",
                problems=rep.problems(),
            )
        report["logits_checked"] = check_logits
        if check_logits:
            logits = parity.compare_logits(parity.engine_batch_logits(src, plan.spec["vocab_size"]), tmp)
            report.update(logits)
            if not logits["logits_ok"]:
                raise UserError(
                    f"Export verification failed: logits of the HF export differ from the engine's forward pass by "
                    f"{logits['max_logit_diff']:.3g} (tolerance {logits['logit_tolerance']:.1g}); nothing was "
                    f"written to {out}. Every tensor matched, so this is an architecture/config mismatch: report it."
                )
        (tmp / "ellama_export.json").write_text(json.dumps(
            {k: v for k, v in report.items() if k != "mapping"}, indent=2, default=str))
    return report


def size_names() -> list[str]:
    return list(SIZES)
