"""`ellama merge`: linear interpolation of a base and an adapted HF checkpoint, e-Llama's trade-off knob.

    ellama merge --base .quickstart/base_hf --adapted .quickstart/hf --alpha 0.5 --out merged
    ellama merge --base B --adapted A --alpha 0.25 --alpha 0.5 --alpha 0.75 --out sweep --eval --data M.json

``merged = (1 - alpha) * base + alpha * adapted``, tensor by tensor, computed in float32 and stored in the input
dtype. alpha 0 and 1 copy the base's / adapted's tensor bytes (bit-exact); alpha 0.5 is the mean.

Streaming, through the one safetensors codec (:mod:`ellama_recipes.io.safetensors`): both inputs are read one tensor
at a time (positional reads at the offsets of the safetensors header, not a memory map, so pages of tensors already
merged do not stay resident) and the output safetensors files are written one tensor at a time (headers computed up
front from the shapes, each merged tensor's bytes written at its offset), so peak memory is about one tensor pair,
not two models. The output keeps the adapted model's
shard layout and index. Before anything is written the two checkpoints must agree on architecture (config.json
shape keys), tokenizer (tokenizer files byte-identical) and every tensor's name, shape and dtype; a mismatch is a
user error naming the key or the tensor. Output folders are atomic (:mod:`ellama_recipes.io.atomic`); config.json,
generation_config.json and the tokenizer are carried from the adapted model.

Why not mergekit: mergekit 0.1.5 requires transformers 5, and NeMo 2.7.3 (the engine here) requires
transformers 4.x, so the two cannot share one environment; this small streaming linear merge is our own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.errors import UserError
from ellama_recipes.io import safetensors
from ellama_recipes.io.atomic import atomic_dir
from ellama_recipes.io.safetensors import DTYPES, INDEX, Buffers, HFWeights, SafetensorsShards, read_header
from ellama_recipes.model.architecture import HF_LAYOUT_KEYS

# config.json keys that fix the tensor layout / meaning: must be equal to merge (the architecture's HF keys)
ARCH_KEYS = HF_LAYOUT_KEYS
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
CARRIED_FILES = ("config.json", "generation_config.json", "chat_template.jinja", *TOKENIZER_FILES)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} could not be read as JSON ({exc}).") from None


def weight_files(model_dir: Path) -> list[str]:
    """Safetensors files of an HF model directory (sharded via model.safetensors.index.json, or one file)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json). Pass what "
                        "`ellama export-hf` wrote.")
    files = safetensors.weight_files(model_dir)
    if not files or not all((model_dir / f).is_file() for f in files):
        raise UserError(f"{model_dir} has no model.safetensors (or index); merge needs safetensors weights. "
                        "Re-export with `ellama export-hf` (it writes safetensors).")
    return files


def _tensor_table(model_dir: Path) -> dict[str, tuple[str, str, list[int]]]:
    """tensor name -> (file, dtype, shape), from the safetensors headers only (no weights read)."""
    weight_files(model_dir)
    return safetensors.tensor_table(model_dir)


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_compatible(base: Path, adapted: Path) -> dict[str, tuple[str, str, list[int]]]:
    """Refuse (UserError naming what differs) unless the two checkpoints can be interpolated."""
    cb, ca = _read_json(Path(base) / "config.json"), _read_json(Path(adapted) / "config.json")
    diff = [f"{k}: {cb.get(k)!r} vs {ca.get(k)!r}" for k in ARCH_KEYS if cb.get(k) != ca.get(k)]
    if diff:
        raise UserError(f"--base {base} and --adapted {adapted} have different architectures ({'; '.join(diff)}); "
                        "only checkpoints of one architecture can be merged (the adapted model must come from this "
                        "base by continued pretraining / SFT / DPO).")
    for name in TOKENIZER_FILES:
        if name == "tokenizer_config.json":
            continue  # carries the chat template / model_max_length, which post-training may change
        db, da = _file_digest(Path(base) / name), _file_digest(Path(adapted) / name)
        if db != da:
            raise UserError(f"--base and --adapted have different tokenizers ({name} differs); token ids would mean "
                            "different things in the two embedding tables, so they cannot be merged.")
    tb, ta = _tensor_table(Path(base)), _tensor_table(Path(adapted))
    only_b, only_a = sorted(set(tb) - set(ta)), sorted(set(ta) - set(tb))
    if only_b or only_a:
        first = (only_b or only_a)[0]
        raise UserError(f"Tensor {first} is only in {'--base' if only_b else '--adapted'} "
                        f"({len(only_b)} tensors only in the base, {len(only_a)} only in the adapted model); "
                        "merge needs the same tensor names in both.")
    for name in sorted(tb):
        if tb[name][2] != ta[name][2]:
            raise UserError(f"Tensor {name} has shape {tb[name][2]} in --base but {ta[name][2]} in --adapted; "
                            "merge needs identical shapes.")
        if tb[name][1] != ta[name][1]:
            raise UserError(f"Tensor {name} is {tb[name][1]} in --base but {ta[name][1]} in --adapted; "
                            "merge needs identical dtypes (re-export both in one dtype).")
    return ta


def interpolate(b, a, alpha: float):
    """(1 - alpha) * b + alpha * a in float32, cast back to the input dtype; alpha 0 / 1 return the input.

    Overwrites the freshly read inputs (``.float()`` of a float32 tensor is the tensor itself): for float32 the result
    is ``b``, so only the two inputs are alive (two tensors of this size); other float dtypes add one float32 copy of
    each.
    """
    import torch

    if alpha == 0:
        return b
    if alpha == 1:
        return a
    if not b.dtype.is_floating_point:
        if not torch.equal(a, b):
            raise UserError("An integer tensor differs between --base and --adapted; it cannot be interpolated.")
        return b
    out = b.float().mul_(1.0 - alpha)
    out.add_(a.float().mul_(alpha))
    return out.to(b.dtype)


def merge_one(base: Path, adapted: Path, alpha: float, out: Path, *, replace: bool = False,
              progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``(1 - alpha) * base + alpha * adapted`` to the HF directory ``out`` (atomically)."""

    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha {alpha}: must be between 0 (the base) and 1 (the adapted model).")
    table = check_compatible(base, adapted)
    base_hf, adapted_hf = HFWeights(Path(base)), HFWeights(Path(adapted))
    total, done = len(table), 0
    with atomic_dir(Path(out), replace=replace) as tmp:
        # the adapted model's shard layout, tensors in its header order, the header's metadata kept
        layout = [(fname, [(n, tuple(table[n][2]), DTYPES[table[n][1]]) for n in table if table[n][0] == fname])
                  for fname in weight_files(adapted)]
        meta = read_header(Path(adapted) / layout[0][0])[0].get("__metadata__")
        shards = SafetensorsShards(tmp, shards=layout, metadata=meta)
        # the two inputs of each tensor are read into reused buffers (the same shapes repeat every layer): a fresh
        # allocation per tensor let the high-water mark drift to 103 MiB (4.3 tensors) inside the full suite
        buffers = Buffers()
        for _, tensors in layout:
            for name, _, _ in tensors:
                ta, tb = adapted_hf.get(name, buffers), base_hf.get(name, buffers)
                shards.write(name, interpolate(tb, ta, alpha))
                buffers.give(ta, tb)
                del ta, tb
                done += 1
                if progress:
                    progress(done, total)
        shards.finish()
        if (Path(adapted) / INDEX).is_file():
            shutil.copy2(Path(adapted) / INDEX, tmp / INDEX)  # the adapted model's own index (its metadata too)
        for name in CARRIED_FILES:
            if (Path(adapted) / name).is_file():
                shutil.copy2(Path(adapted) / name, tmp / name)
        from ellama_recipes.io.atomic import write_json

        write_json(tmp / "ellama_merge.json", {"base": str(base), "adapted": str(adapted), "alpha": alpha,
                                                      "formula": "(1 - alpha) * base + alpha * adapted"})
    return Path(out)


def alpha_dir(out: Path, alpha: float) -> Path:
    return Path(out) / f"alpha_{alpha:g}"


def merge(base: Path, adapted: Path, alphas: list[float], out: Path, *, evaluate: bool = False,
          data: list[str] | None = None, tasks: list[str] | None = None, limit: int | None = None,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One alpha: ``out`` is the merged model. Several: ``out/alpha_<a>/`` each; with ``evaluate`` every merge is
    evaluated against the base and ``out/tradeoff.png`` + ``out/tradeoff.json`` hold domain gain vs regression."""
    if not alphas:
        raise UserError("Pass at least one --alpha (0 = the base, 1 = the adapted model).")
    if len(set(alphas)) != len(alphas):
        raise UserError(f"--alpha values repeat ({alphas}); pass each alpha once.")
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise UserError(f"--alpha {a}: must be between 0 (the base) and 1 (the adapted model).")
    check_compatible(base, adapted)  # before any output appears
    if evaluate and len(alphas) < 2:
        raise UserError("--eval plots the trade-off over several merges: pass two or more --alpha values, or run "
                        "`ellama eval --model BASE --model MERGED` for one.")
    out = Path(out)
    if len(alphas) == 1:
        merge_one(base, adapted, alphas[0], out)
        return {"out": str(out), "merges": [{"alpha": alphas[0], "dir": str(out)}]}
    if out.exists() and any(alpha_dir(out, a).exists() for a in alphas):
        raise UserError(f"{out} already holds merges for some of these alphas; choose a new --out or remove them.")
    merges = []
    for a in alphas:
        d = alpha_dir(out, a)
        echo(f"[merge] alpha={a:g} -> {d}")
        merge_one(base, adapted, a, d)
        merges.append({"alpha": a, "dir": str(d)})
    result: dict[str, Any] = {"out": str(out), "merges": merges}
    if evaluate:
        from ellama_recipes.io.charts import tradeoff
        from ellama_recipes.io.atomic import write_json
        from ellama_recipes.workflows.evaluate import evaluate as run_eval

        models = [Path(base)] + [Path(m["dir"]) for m in merges]
        labels = ["base"] + [f"alpha={m['alpha']:g}" for m in merges]
        report = run_eval(models, data=data, tasks=tasks, out=out / "eval", limit=limit, labels=labels, echo=echo)
        points = [{"alpha": m["alpha"], "dir": m["dir"], "domain_gain_pct": e.get("domain_gain_pct"),
                   "general_regression_pct": e.get("general_regression_pct"), "domain_basis": e.get("domain_basis"),
                   "general_basis": e.get("general_basis")} for m, e in zip(merges, report["models"][1:])]
        write_json(out / "tradeoff.json", {"base": str(base), "adapted": str(adapted), "points": points,
                                                  "definitions": report["definitions"]})
        tradeoff(points, out / "tradeoff.png")
        result.update(points=points, tradeoff_png=str(out / "tradeoff.png"), tradeoff_json=str(out / "tradeoff.json"),
                      eval=report)
    return result
