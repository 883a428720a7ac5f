"""`ellama merge`: linear interpolation of a base and an adapted HF checkpoint, e-Llama's trade-off knob.

    ellama merge --base .quickstart/base_hf --adapted .quickstart/hf --alpha 0.5 --out merged
    ellama merge --base B --adapted A --alpha 0.25 --alpha 0.5 --alpha 0.75 --out sweep --eval --data M.json

``merged = (1 - alpha) * base + alpha * adapted``, tensor by tensor, computed in float32 and stored in the input
dtype. alpha 0 and 1 copy the base's / adapted's tensor bytes (bit-exact); alpha 0.5 is the mean.

Streaming: both inputs are read one tensor at a time (plain reads at the offsets of the safetensors header, not a
memory map, so pages of tensors already merged do not stay resident) and the output safetensors file is written
one tensor at a time (its header is computed up front from the shapes, then each merged tensor's bytes
are appended), so peak memory is about one tensor pair, not two models. The output keeps the adapted model's
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
import struct
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from ellama_recipes.io.atomic import atomic_dir
from ellama_recipes.errors import UserError
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
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(_read_json(index)["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{model_dir} has no model.safetensors (or index); merge needs safetensors weights. "
                    "Re-export with `ellama export-hf` (it writes safetensors).")


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _tensor_table(model_dir: Path) -> dict[str, tuple[str, str, list[int]]]:
    """tensor name -> (file, dtype, shape), from the safetensors headers only (no weights read)."""
    table = {}
    for fname in weight_files(model_dir):
        for name, info in _header(Path(model_dir) / fname).items():
            if name != "__metadata__":
                table[name] = (fname, info["dtype"], list(info["shape"]))
    return table


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


class _StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) first, then data.

    The format is an 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), then
    the tensors' bytes at the header's offsets; ``safetensors.safe_open`` / ``load_file`` read what this writes.
    """

    def __init__(self, path: Path, layout: list[tuple[str, str, list[int]]], metadata: dict | None = None):
        import numpy as np

        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.i = 0

    def write(self, name: str, data: memoryview) -> None:
        exp_name, exp_bytes = self.expected[self.i]
        if name != exp_name or data.nbytes != exp_bytes:
            raise RuntimeError(f"streaming writer: got {name} ({data.nbytes} bytes), expected {exp_name} ({exp_bytes})")
        self.f.write(data)
        self.i += 1

    def close(self) -> None:
        self.f.close()
        if self.i != len(self.expected):
            raise RuntimeError(f"streaming writer closed after {self.i} of {len(self.expected)} tensors")


class _TensorReader:
    """Read single tensors of a safetensors file with plain file reads (header offsets), one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n
        self.f = None

    def __enter__(self) -> "_TensorReader":
        self.f = open(self.path, "rb")
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def get(self, name: str):
        import torch

        info = self.header[name]
        beg, end = info["data_offsets"]
        self.f.seek(self.base + beg)
        buf = bytearray(end - beg)
        if self.f.readinto(buf) != len(buf):
            raise UserError(f"{self.path} is truncated (tensor {name}); re-export the model.")
        if not _TORCH_DTYPES:
            _TORCH_DTYPES.update(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16,
                                 I64=torch.int64, I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8,
                                 BOOL=torch.bool)
        dtype = _TORCH_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


_TORCH_DTYPES = {}


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


def _tensor_bytes(t) -> memoryview:
    """The tensor's raw bytes without a copy (a view of its storage)."""
    return memoryview(t.contiguous().reshape(-1).view(torch_uint8()).numpy())


def torch_uint8():
    import torch

    return torch.uint8


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
    base_file = {n: f for n, (f, _, _) in _tensor_table(Path(base)).items()}
    total, done = len(table), 0
    with atomic_dir(Path(out), replace=replace) as tmp, ExitStack() as stack:
        readers: dict[Path, _TensorReader] = {}

        def reader(path: Path) -> "_TensorReader":
            if path not in readers:
                readers[path] = stack.enter_context(_TensorReader(path))
            return readers[path]

        for fname in weight_files(adapted):
            names = [n for n, (f, _, _) in table.items() if f == fname]
            meta = _header(Path(adapted) / fname).get("__metadata__")
            writer = _StreamingSafetensorsWriter(tmp / fname, [(n, table[n][1], table[n][2]) for n in names], meta)
            try:
                for name in names:
                    ta = reader(Path(adapted) / fname).get(name)
                    tb = reader(Path(base) / base_file[name]).get(name)
                    writer.write(name, _tensor_bytes(interpolate(tb, ta, alpha)))
                    del ta, tb
                    done += 1
                    if progress:
                        progress(done, total)
            finally:
                writer.close()
        if (Path(adapted) / "model.safetensors.index.json").is_file():
            shutil.copy2(Path(adapted) / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
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
