"""Verification, independent of the conversion: what was written is read back and compared bit for bit.

The engine side is split with the bridge's plain-torch inverses (:func:`ellama_recipes.engine.bridge.split_qkv`,
``split_fc1``: not NeMo's converters, so a wrong converter cannot verify itself) and each piece is compared with
the HF tensor on disk by memcmp in 64 MiB slices (:meth:`ellama_recipes.io.safetensors.HFWeights.equals`);
dtype-widened norms are compared both ways. HF tensors no table row accounts for are reported as unmapped.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ellama_recipes.engine import bridge
from ellama_recipes.engine.bridge import Group
from ellama_recipes.engine.checkpoint.read import EngineChunks, dcp_reader, engine_shapes
from ellama_recipes.io.safetensors import Buffers, HFWeights, bits_equal
from ellama_recipes.model import architecture

Progress = Callable[[int], None]  # called with bytes done


@dataclass
class TensorCheck:
    hf_name: str
    engine_name: str | None
    shape: list
    dtype: str
    status: str  # "equal" | "mismatch" | "shape" | "missing_in_engine" | "missing_in_hf"
    max_abs_diff: float = 0.0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)

    @property
    def bad(self) -> list[TensorCheck]:
        return [c for c in self.checks if c.status != "equal"]

    def problems(self) -> list[str]:
        msgs = []
        for c in self.bad:
            if c.status == "missing_in_engine":
                msgs.append(f"{c.hf_name}: in the HF weights, absent from the engine checkpoint (unmapped)")
            elif c.status == "missing_in_hf":
                msgs.append(f"{c.hf_name} <- {c.engine_name}: in the engine checkpoint, absent from the HF weights "
                            "(dropped)")
            elif c.status == "shape":
                msgs.append(f"{c.hf_name} <- {c.engine_name}: shape mismatch ({c.shape})")
            else:
                msgs.append(f"{c.hf_name} <- {c.engine_name}: values differ (max |diff| {c.max_abs_diff:.3g})")
        return msgs


def _same(h: torch.Tensor, e: torch.Tensor, direction: str) -> bool:
    """Bit-exact, allowing only dtype changes that lose nothing the direction must keep.

    import: the engine tensor may be a lossless widening of the HF one (bf16 norm -> fp32 local RMSNorm).
    export: the HF tensor must be exactly the engine tensor in the export dtype (what save in that dtype means).
    """
    if h.dtype == e.dtype:
        return bits_equal(h, e)
    if direction == "import":
        return bits_equal(h.to(e.dtype), e) and bits_equal(e.to(h.dtype), h)
    return bits_equal(e.to(h.dtype), h)


def check_tensor(name: str, owner: str | None, h: torch.Tensor | None, e: torch.Tensor | None,
                 direction: str) -> TensorCheck:
    if h is None:
        return TensorCheck(name, owner, list(e.shape), str(e.dtype), "missing_in_hf")
    if e is None:
        return TensorCheck(name, None, list(h.shape), str(h.dtype), "missing_in_engine")
    if tuple(h.shape) != tuple(e.shape):
        return TensorCheck(name, owner, [list(h.shape), list(e.shape)], str(h.dtype), "shape")
    ok = _same(h, e, direction)
    diff = 0.0 if ok or not h.numel() else (h.float() - e.float()).abs().max().item()
    dt = str(h.dtype) if h.dtype == e.dtype else f"{e.dtype}->{h.dtype}" if direction == "export" else \
        f"{h.dtype}->{e.dtype}"
    return TensorCheck(name, owner, list(h.shape), dt.replace("torch.", ""), "equal" if ok else "mismatch", diff)


def map_groups(fn: Callable[[Group], Any], groups: list[Group], workers: int) -> list:
    if workers <= 1:
        return [fn(g) for g in groups]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, groups))


def map_loaded(fn: Callable[[Group, Any], Any], load: Callable[[Group], Any], groups: list[Group],
                workers: int) -> list:
    """``fn(g, load(g))`` for every group, in order. With one worker the next group's ``load`` (its read) runs in a
    second thread while ``fn`` works on this one (at most two groups loaded at once); with more, each worker loads
    its own groups."""
    if workers > 1 or os.environ.get("ELLAMA_CONVERT_NO_PREFETCH"):
        return map_groups(lambda g: fn(g, load(g)), groups, workers)
    out: list = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, groups[0]) if groups else None
        for i, g in enumerate(groups):
            x = nxt.result()
            nxt = pool.submit(load, groups[i + 1]) if i + 1 < len(groups) else None
            out.append(fn(g, x))
            del x
    return out


def verify_group(g: Group, engine: torch.Tensor, hf: HFWeights, spec: dict, direction: str,
                 progress: Progress | None = None, buffers: Buffers | None = None) -> list[TensorCheck]:
    """Split one engine tensor with the plain-torch splitters and compare each piece with the HF tensor read from
    disk, bit for bit."""
    out = []
    for name, part in zip(g.hf, bridge.verify_split(g, engine, spec)):
        same = hf.equals(name, part, buffers) if buffers is not None and name in hf.entries else None
        if same:  # bit-exact, compared slice by slice from the file (a mismatch is re-read whole for its report)
            out.append(TensorCheck(name, g.megatron, list(part.shape), str(part.dtype).replace("torch.", ""),
                                   "equal"))
        else:
            h = hf.get(name, buffers) if name in hf.entries else None
            out.append(check_tensor(name, g.megatron, h, part, direction))
            if buffers is not None:
                buffers.give(h)
            del h
        if progress:
            progress(part.numel() * part.dtype.itemsize)
    return out


def unmapped(hf: HFWeights, groups: list[Group]) -> list[TensorCheck]:
    mapped = {h for g in groups for h in g.hf}
    return [TensorCheck(n, None, list(hf.shape(n)), str(hf.dtype(n)), "missing_in_engine")
            for n in sorted(set(hf.names()) - mapped)]


def verify_groups(wdir: Path, hf: HFWeights, spec: dict, groups: list[Group], direction: str, *, workers: int = 1,
                  progress: Progress | None = None, buffers: Buffers | None = None) -> VerifyReport:
    """Read back each engine tensor and its HF tensors and compare (:func:`verify_group`); HF tensors no group
    accounts for are reported too."""
    reader, buffers = EngineChunks(wdir), buffers or Buffers()

    def one(g: Group, engine: torch.Tensor) -> list[TensorCheck]:
        try:
            return verify_group(g, engine, hf, spec, direction, progress, buffers)
        finally:
            buffers.give(engine)

    checks = map_loaded(one, lambda g: reader.group(g, buffers), groups, workers)
    return VerifyReport([c for cs in checks for c in cs] + unmapped(hf, groups))


def verify_engine_against_hf(ckpt: Path, hf_dir: Path, *, workers: int = 1) -> VerifyReport:
    """Every HF tensor must land, bit-exact, in the engine checkpoint (and nothing else may be there)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    spec = architecture.from_hf(cfg, Path(hf_dir) / "config.json")
    hf = HFWeights(hf_dir)
    if spec["tie_word_embeddings"]:
        hf.entries.pop("lm_head.weight", None)
    groups = groups_for_checkpoint(Path(ckpt), spec)
    return verify_groups(Path(ckpt) / "weights", hf, spec, groups, "import", workers=workers)


def groups_for_checkpoint(ckpt: Path, spec: dict) -> list[Group]:
    _, meta = dcp_reader(ckpt / "weights")
    shapes = engine_shapes(meta)
    rows = shapes.get("embedding.word_embeddings.weight", ([None],))[0][0]
    return bridge.expand(spec, vocab_rows=rows)
