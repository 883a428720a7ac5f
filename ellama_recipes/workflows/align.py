"""``ellama align``: SFT then DPO, chained, from a continued-pretrained checkpoint.

Stages (each a registered recipe, :mod:`ellama_recipes.recipes.sft` and :mod:`ellama_recipes.recipes.dpo`):

1. ``--from CKPT|RUN`` resolves to an engine checkpoint (a run folder: its latest complete checkpoint, exactly as
   ``ellama export-hf`` picks it).
2. The data of BOTH stages is validated, templated and tokenized first with that checkpoint's tokenizer
   (:func:`ellama_recipes.data.chat.prepare`) into ``RUN2/sft/data`` and ``RUN2/dpo/data``; one table is printed
   (in = kept + rejected, by reason, with the rejects files); nothing valid in either is exit 2 before any training.
   Prepared data is reused when its inputs (files, sizes, times, tokenizer, sequence length) are unchanged.
3. SFT in ``RUN2/sft`` from the ``--from`` checkpoint; then DPO in ``RUN2/dpo`` from SFT's latest complete
   checkpoint (which is also DPO's frozen reference).

Run folders are the pretraining layout (``checkpoints/``, ``metrics.jsonl``, ``logs/``), so
``ellama export-hf --from RUN2/sft`` and ``--from RUN2/dpo`` work unchanged. A stage that finished writes
``RUN/complete.json``; re-running the same command skips it with a message, and a stage killed mid-way resumes from
its last complete checkpoint (the recipes' SafeAutoResume). With ``--executor slurm`` one stage is submitted per
invocation (the first one not complete); re-run the command once it has finished to submit the next.

Overrides: ``sft.KEY=V`` goes to the SFT config, ``dpo.KEY=V`` to the DPO config, an unprefixed ``KEY=V`` to both
(e.g. ``cluster.slurm_account=llm``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.io.atomic import write_json
from ellama_recipes.io.run_folder import RunFolder

STAGES = ("sft", "dpo")
PENDING_SFT = "<the latest complete checkpoint of RUN2/sft, once SFT has finished>"


@dataclass
class AlignRequest:
    size: str
    from_path: str
    sft: list[str]
    dpo: list[str]
    out: str
    sft_steps: int | None = None
    dpo_steps: int | None = None
    save_every: int | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    executor: str | None = None
    overrides: list[str] = field(default_factory=list)


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """``sft.K=V`` -> sft, ``dpo.K=V`` -> dpo, anything else -> both."""
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        head = item.split("=", 1)[0]
        prefix = head.split(".", 1)[0]
        if prefix in STAGES and "." in head:
            out[prefix].append(item[len(prefix) + 1 :])
        else:
            for s in STAGES:
                out[s].append(item)
    return out


def stage_dirs(out: str | Path) -> dict[str, Path]:
    return {s: Path(out) / s for s in STAGES}


def resolve_from(path: str, echo: Callable[[str], None] | None = None) -> Path:
    """``--from``: an engine checkpoint, or a run folder's latest complete checkpoint (as ``export-hf`` does)."""
    from ellama_recipes.workflows.import_export import resolve_checkpoint

    return resolve_checkpoint(Path(path), echo=echo)


def stage_complete(cfg: Any) -> dict[str, Any] | None:
    """The stage's completion record when it finished ``schedule.train_steps`` steps (and its checkpoint is there)."""
    rec = RunFolder.of(cfg).read_complete()
    if not rec or int(rec.get("train_steps", -1)) < cfg.schedule.train_steps:
        return None
    ckpt = rec.get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        return None
    return rec


# ------------------------------------------------------------------------------------------------ data
def _fingerprint(paths: list[Path], tokenizer_name: str, seq_length: int, val_fraction: float, seed: int) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    tok = Path(tokenizer_name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tok / name).is_file():
            h.update(hashlib.sha256((tok / name).read_bytes()).digest())
    h.update(f"{seq_length}|{val_fraction}|{seed}".encode())
    return h.hexdigest()


def prepare_stage_data(kind: str, paths: list[str], tokenizer: Any, *, seq_length: int, out_dir: Path,
                       val_fraction: float, seed: int, echo: Callable[[str], None] = print):
    """:func:`ellama_recipes.data.chat.prepare` into ``out_dir``, reused when its inputs are unchanged."""
    from ellama_recipes.data import chat
    from ellama_recipes.data.records import expand_paths

    files = expand_paths(paths, "SFT" if kind == chat.SFT else "preference")
    fp = _fingerprint(files, tokenizer.name, seq_length, val_fraction, seed)
    report_file = out_dir / chat.REPORT_FILE
    if report_file.is_file():
        try:
            old = json.loads(report_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        if old.get("fingerprint") == fp and (out_dir / chat.TRAIN_FILE).is_file():
            echo(f"[ellama] {kind} data unchanged: reusing {out_dir}")
            rep = chat.PrepareReport(kind=kind)
            for k in ("records_in", "kept", "truncated", "train", "validation", "tokens", "loss_tokens", "files",
                      "out_dir", "seq_length"):
                setattr(rep, k, old.get(k, getattr(rep, k)))
            rep.template = old.get("chat_template", "")
            rep.rejected.update(old.get("rejected", {}))
            return rep
    rep = chat.prepare(kind, files, tokenizer, seq_length=seq_length, out_dir=out_dir, val_fraction=val_fraction,
                       seed=seed)
    data = json.loads(report_file.read_text(encoding="utf-8"))
    data["fingerprint"] = fp
    write_json(report_file, data)
    return rep


def estimate_rows(paths: list[str]) -> int:
    """Rows in the input files without parsing them (JSONL lines, Parquet row counts): the dry run's step count."""
    from ellama_recipes.data.records import expand_paths

    n = 0
    for f in expand_paths(paths, "SFT"):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            n += pq.ParquetFile(f).metadata.num_rows
        else:
            with open(f, "rb") as fh:
                n += sum(1 for line in fh if line.strip())
    return n


# ------------------------------------------------------------------------------------------------ configs
def build_configs(req: AlignRequest, *, from_ckpt: str, sft_ckpt: str | None, train_rows: int | None,
                  estimated: bool) -> dict[str, Any]:
    """The SFT and DPO configs of this request (not validated). ``train_rows``: prepared SFT training rows (sets
    the SFT step count when ``--sft-steps`` is not given)."""
    from ellama_recipes.recipes import get_recipe
    from ellama_recipes.recipes.sft import set_train_steps, steps_for

    dirs = stage_dirs(req.out)
    ov = split_overrides(req.overrides)
    shared = dict(num_nodes=req.nodes, gpus_per_node=req.gpus_per_node, executor=req.executor,
                  save_every=req.save_every)
    sft = get_recipe("sft").build_config(
        req.size,
        restore_from=from_ckpt,
        train=str(dirs["sft"] / "data" / "train.jsonl"),
        validation=str(dirs["sft"] / "data" / "validation.jsonl"),
        out_dir=str(dirs["sft"]),
        train_steps=req.sft_steps,
        overrides=ov["sft"],
        **shared,
    )
    if req.sft_steps is None and train_rows:
        steps = steps_for(sft, train_rows)
        set_train_steps(sft, steps)
        sft.lr_source += f"; steps: {sft.data.epochs:g} epochs x {'~' if estimated else ''}{train_rows} rows"
        apply_again = [o for o in ov["sft"] if o.split("=", 1)[0].strip().startswith("schedule.")]
        if apply_again:  # an explicit schedule override wins over the data-derived step count
            from ellama_recipes.config.overrides import apply_overrides

            apply_overrides(sft, apply_again)
    dpo = get_recipe("dpo").build_config(
        req.size,
        data_dir=str(dirs["dpo"] / "data"),
        restore_from=sft_ckpt or PENDING_SFT,
        out_dir=str(dirs["dpo"]),
        train_steps=req.dpo_steps,
        overrides=ov["dpo"],
        **shared,
    )
    if sft_ckpt is None:  # the DPO model is the SFT model: show (and validate) that architecture
        dpo.model = copy.deepcopy(sft.model)
    return {"sft": sft, "dpo": dpo}


DRYRUN_KEYS = ("lr", "min_lr", "global_batch_size", "micro_batch_size", "seq_length", "train_steps",
               "tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel", "precision")


def dryrun(req: AlignRequest) -> dict[str, Any]:
    """``{"sft": {...}, "dpo": {...}}``: each stage's resolved plan (validated) and its launch (torchrun command or
    sbatch script). Nothing is prepared or trained."""
    from ellama_recipes.workflows import launch
    from ellama_recipes.recipes import get_recipe

    from_ckpt = req.from_path
    with contextlib.suppress(UserError):
        from_ckpt = str(resolve_from(req.from_path))
    rows = None
    if req.sft_steps is None:  # the held-out share the real run keeps (the SFT config's data.val_fraction)
        probe = build_configs(req, from_ckpt=from_ckpt, sft_ckpt=None, train_rows=None, estimated=True)
        rows = max(1, round(estimate_rows(req.sft) * (1 - probe["sft"].data.val_fraction)))
    cfgs = build_configs(req, from_ckpt=from_ckpt, sft_ckpt=None, train_rows=rows, estimated=True)
    for cfg in cfgs.values():  # both stages' problems before anything is built
        cfg.validate()
    out: dict[str, Any] = {}
    for stage, cfg in cfgs.items():
        with contextlib.redirect_stdout(sys.stderr):  # NeMo banners stay off stdout (--json)
            partial = get_recipe(stage).build_partial(cfg)
            plan = launch.render(cfg, partial)
        summary = cfg.summary()
        out[stage] = {**{k: summary[k] for k in DRYRUN_KEYS}, **summary, "run_dir": cfg.checkpoint.out_dir,
                      "launch": plan.as_dict(), "config": cfg.to_dict()}
    return out


# ------------------------------------------------------------------------------------------------ run
def run(req: AlignRequest, *, echo: Callable[[str], None] = print, show_table: Callable[[list], None] | None = None,
        stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Prepare both stages' data, then SFT, then DPO (skipping complete stages). Returns per-stage summaries.

    ``stages`` limits the chain (Python API, e.g. ``("sft",)`` to stop after SFT); the CLI runs both."""
    from ellama_recipes.workflows import launch
    from ellama_recipes.data import chat

    from_ckpt = resolve_from(req.from_path, echo=echo)
    echo(f"[ellama] align: starting from {from_ckpt}")
    dirs = stage_dirs(req.out)
    tok = chat.load_chat_tokenizer(from_ckpt)
    # sequence lengths come from the configs (size defaults + overrides): build them once without data first
    probe = build_configs(req, from_ckpt=str(from_ckpt), sft_ckpt=None, train_rows=None, estimated=False)
    reports = [
        prepare_stage_data("sft", req.sft, tok, seq_length=probe["sft"].schedule.seq_length,
                           out_dir=dirs["sft"] / "data", val_fraction=probe["sft"].data.val_fraction,
                           seed=probe["sft"].data.seed, echo=echo),
        prepare_stage_data("preference", req.dpo, tok, seq_length=probe["dpo"].schedule.seq_length,
                           out_dir=dirs["dpo"] / "data", val_fraction=probe["dpo"].data.val_fraction,
                           seed=probe["dpo"].data.seed, echo=echo),
    ]
    if show_table:
        show_table(reports)
    for rep in reports:
        chat.require_rows(rep)

    results: dict[str, Any] = {}
    sft_ckpt: str | None = None
    for stage in stages:
        cfgs = build_configs(req, from_ckpt=str(from_ckpt), sft_ckpt=sft_ckpt, train_rows=reports[0].train,
                             estimated=False)
        cfg = cfgs[stage]
        if stage == "sft":
            cfg.data.pad_id = tok.pad_id
        if stage == "dpo" and results.get("sft", {}).get("skipped") is False and RunFolder.of(cfg).has_checkpoints():
            raise UserError(
                f"SFT was (re)trained just now, but {cfg.checkpoint.out_dir} already holds DPO checkpoints trained "
                f"from the previous SFT result; resuming them would mix the two. Fix: remove {cfg.checkpoint.out_dir} "
                "(or pass a new --out) and re-run this command: SFT is complete and will be skipped."
            )
        done = stage_complete(cfg)
        if done:
            echo(f"[ellama] {stage}: already complete ({cfg.schedule.train_steps} steps, {done['checkpoint']}); "
                 "skipping")
            results[stage] = {"skipped": True, **done}
        else:
            recipe = launch.check(cfg)  # once, before the stage's first line
            echo(f"[ellama] {stage}: {cfg.schedule.train_steps} steps -> {cfg.checkpoint.out_dir}")
            handle = launch.start(cfg, recipe.build_partial(cfg))
            done = stage_complete(cfg)  # written by the stage's rank 0, in this process or a launched one
            if done is None:
                results[stage] = {"skipped": False, "launched": handle}
                echo(f"[ellama] {stage} submitted ({cfg.cluster.executor}); re-run this command when it has "
                     "finished to go on with the next stage.")
                return results
            # the stage's own summary (written by rank 0 into complete.json), with the launch's job folder
            results[stage] = {"skipped": False, **done, **{k: handle[k] for k in ("job_dir", "state") if k in handle}}
        if stage == "sft":
            sft_ckpt = str(done["checkpoint"]) if done else None
    return results
