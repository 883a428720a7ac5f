"""HF Llama 3.1 <-> engine (NeMo 2 / Megatron distributed) checkpoints, streamed one tensor group at a time.

Import reads the HF safetensors tensor by tensor (header parsed, bytes read into one buffer; no whole-file mmap),
converts each group with the mapping table of :mod:`ellama_recipes.engine.llama_bridge` (NeMo's ``TransformFns``
for the QKV interleave) and hands it to ``torch.distributed.checkpoint``'s writer through a lazy save planner, so
at most one group (``--workers`` groups) is in memory. The result is the checkpoint Megatron's ``torch_dist``
strategy writes: the same keys, layer-stacked tensors as one chunk per layer (gate and up as two), empty
``_extra_state`` objects, ``common.pt``, ``metadata.json`` and a ``context/`` dumped by NeMo's own io
serialisation - training and resume read it unchanged.

Export reads the engine checkpoint chunk by chunk (a load planner asks ``torch.distributed.checkpoint`` for one
layer's slice of a stacked key; the model is never instantiated) and writes safetensors shards whose headers are
known up front, at their final offsets.

Verification is independent of the conversion: it reads back what was written, tensor by tensor, undoes the QKV
interleave and gate/up fusion with the bridge's plain-torch splitters (not NeMo's) and compares with the HF side
bit for bit. For small models export also compares transformers' logits with the engine's own forward pass.

What NeMo 2.7.3's own connectors get wrong, and why this module does not use them: under the TE-free layer spec
their mapping leaves the per-layer RMSNorms at 1.0 on import and crashes on export; their importer reads only
``rope_scaling.factor``; they stage tokenizers in the shared /tmp/nemo_tokenizer; and both load whole models
(import peaks at ~3.6x, export at ~4.4x the model's bytes: 3 TB of host memory for 405B).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ellama_recipes.engine import llama_bridge as bridge
from ellama_recipes.engine.llama_bridge import SOURCE_CONFIG_NAME, Group
from ellama_recipes.errors import UserError

Progress = Callable[[int], None]  # called with bytes done
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ----------------------------------------------------------------------------------------------------------------
# Safetensors, tensor by tensor
# ----------------------------------------------------------------------------------------------------------------

_ST = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAME = {v: k for k, v in _ST.items()}


def _readinto(path: Path, offset: int, t: torch.Tensor) -> torch.Tensor:
    buf = memoryview(t.view(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise UserError(f"{path} is truncated (read {done} of {len(buf)} bytes at offset {offset}).")
            done += n
    return t


class HFWeights:
    """The tensors of an HF checkpoint directory, read one at a time (safetensors; pytorch_model*.bin mmapped)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        index = self.dir / "model.safetensors.index.json"
        files = sorted({self.dir / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.is_file() else sorted(self.dir.glob("*.safetensors"))
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, e in header.items():
                if name != "__metadata__":
                    self.entries[name] = (f, _ST[e["dtype"]], tuple(e["shape"]), 8 + n + e["data_offsets"][0])
        if not files:
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            if not bins:
                raise UserError(f"No *.safetensors or pytorch_model*.bin weights in {self.dir}.")
            for b in bins:
                sd = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
                self._bins[str(b)] = sd
                for name, t in sd.items():
                    self.entries[name] = (b, t.dtype, tuple(t.shape), -1)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, dt, shape, _ = self.entries[name]
        return torch.Size(shape).numel() * dt.itemsize

    def get(self, name: str) -> torch.Tensor:
        path, dt, shape, offset = self.entries[name]
        if offset < 0:
            return self._bins[str(path)][name].clone()
        return _readinto(path, offset, torch.empty(shape, dtype=dt))

    def read_all(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self.names()}


class SafetensorsShards:
    """HF safetensors shards written at known offsets (headers first), so tensors may arrive in any order."""

    def __init__(self, out: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for t in tensors:
            nb = torch.Size(t[1]).numel() * t[2].itemsize
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += nb
        self.out, self.where, self.weight_map = Path(out), {}, {}
        self.total = 0
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            pos = 0
            for name, shape, dt in shard:
                nb = torch.Size(shape).numel() * dt.itemsize
                header[name] = {"dtype": _ST_NAME[dt], "shape": list(shape), "data_offsets": [pos, pos + nb]}
                pos += nb
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = self.out / fname
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + pos)
            for name, shape, dt in shard:
                self.where[name] = (path, 8 + len(raw) + header[name]["data_offsets"][0], tuple(shape), dt)
                self.weight_map[name] = fname
            self.total += pos

    def write(self, name: str, t: torch.Tensor) -> None:
        path, offset, shape, dt = self.where[name]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise RuntimeError(f"{name}: got {tuple(t.shape)} {t.dtype}, planned {shape} {dt}")
        buf = memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
        fd = os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], offset + done)
        finally:
            os.close(fd)

    def finish(self) -> None:
        files = set(self.weight_map.values())
        for f in files:
            with open(self.out / f, "rb+") as fh:
                os.fsync(fh.fileno())
        if len(files) > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))


# ----------------------------------------------------------------------------------------------------------------
# Megatron distributed checkpoints (torch_dist), chunk by chunk
# ----------------------------------------------------------------------------------------------------------------


def _dcp_reader(wdir: Path):
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(wdir))
    try:
        return reader, reader.read_metadata()
    except Exception as exc:  # noqa: BLE001 - any read failure means the same thing to the user
        raise UserError(
            f"Cannot read the checkpoint metadata in {wdir} ({type(exc).__name__}: {exc}). The checkpoint is "
            "partial or corrupt; pick an earlier complete checkpoint or re-run the step that wrote it."
        ) from exc


def _chunk_planner(wants, meta, dest):
    """A load planner that asks for slices of stored tensors (module-level class: no reference cycle keeps the
    destination tensors alive after the load)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    global _ChunkPlanner
    if _ChunkPlanner is None:
        class _ChunkPlanner(DefaultLoadPlanner):  # noqa: N801 - built on first use (torch imported lazily)
            def create_local_plan(self):
                items = []
                for key, offsets, sizes in self.wants:
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
                    items += create_read_items_for_chunk_list(key, self.meta.state_dict_metadata[key], [chunk])
                return LoadPlan(items)

            def resolve_tensor(self, read_item):
                t = self.dest[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
                for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                    t = t.narrow(dim, o, n)
                return t

            def commit_tensor(self, read_item, tensor):
                pass

        globals()["_ChunkPlanner"] = _ChunkPlanner
    planner = _ChunkPlanner()
    planner.wants, planner.meta, planner.dest = wants, meta, dest
    return planner


_ChunkPlanner = None


def read_chunks(wdir: Path, wants: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
    """Read slices of stored tensors: ``wants`` = [(key, offsets, sizes)] -> tensors of ``sizes`` in the stored
    dtype. Only the stored chunks that overlap are read (one layer of a layer-stacked key, not all of them)."""
    import torch.distributed.checkpoint as dcp

    reader, meta = _dcp_reader(wdir)
    dest = {(key, tuple(offsets)): torch.empty(sizes, dtype=meta.state_dict_metadata[key].properties.dtype)
            for key, offsets, sizes in wants}
    try:
        dcp.load({}, storage_reader=reader, planner=_chunk_planner(wants, meta, dest), no_dist=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"Reading tensors from {wdir} failed ({type(exc).__name__}: {exc}); the checkpoint is partial or corrupt."
        ) from exc
    return [dest.pop((k, tuple(o))) for k, o, _ in wants]


def read_group(wdir: Path, g: Group) -> torch.Tensor:
    """One group's engine tensor (one layer of a stacked key), in the stored dtype."""
    if g.stacked:
        return read_chunks(wdir, [(g.key, (g.layer,) + (0,) * len(g.engine_shape), (1,) + g.engine_shape)])[0][0]
    return read_chunks(wdir, [(g.key, (0,) * len(g.engine_shape), g.engine_shape)])[0]


def engine_shapes(meta) -> dict[str, tuple[list[int], str]]:
    """Model tensors in checkpoint metadata: key (no ``module.`` prefix, layer-stacked) -> (global shape, dtype)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for key, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and key.startswith("module.") and not key.endswith("_extra_state"):
            out[key[len("module."):]] = (list(md.size), str(md.properties.dtype).replace("torch.", ""))
    return out


def read_engine_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of an engine checkpoint, layer-stacked tensors unstacked (decoder.layers.3.<rest>).

    Loads the whole model: for tests and small checkpoints; import/export stream with :func:`read_chunks`."""
    import torch.distributed.checkpoint as dcp

    wdir = Path(ckpt) / "weights"
    reader, meta = _dcp_reader(wdir)
    shapes = engine_shapes(meta)
    if not shapes:
        raise UserError(f"{wdir} holds no model tensors (no 'module.*' entries); it is not a NeMo model checkpoint.")
    state = {"module." + k: torch.empty(s, dtype=_DTYPES.get(d, torch.float32)) for k, (s, d) in shapes.items()}
    dcp.load(state, storage_reader=reader, no_dist=True)
    out = {}
    for key, t in state.items():
        key = key[len("module."):]
        if key.startswith("decoder.layers.") and not key.split(".")[2].isdigit():
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{key[len('decoder.layers.'):]}"] = t[i]
        else:
            out[key] = t
    return out


def _extra_state_bytes() -> io.BytesIO:
    # What megatron's torch_dist strategy stores for a TE-free linear layer's (empty) extra state.
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf


def write_engine_weights(wdir: Path, spec: dict, groups: list[Group], make_chunk: Callable[[Group, int], torch.Tensor],
                         dtypes: Callable[[Group], torch.dtype], workers: int = 1) -> None:
    """Write a Megatron torch_dist ``weights/`` dir, producing each chunk lazily when the writer reaches it."""
    import lightning
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import MCoreMetadata
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    L = spec["num_layers"]
    items, resolve = [], {}
    for g in groups:
        lead = (g.layer,) if g.stacked else ()
        size = torch.Size(((L,) if g.stacked else ()) + g.engine_shape)
        for j, (first, rows, _) in enumerate(bridge.engine_chunks(g)):
            offsets = torch.Size(lead + (first,) + (0,) * (len(g.engine_shape) - 1))
            sizes = torch.Size(((1,) if g.stacked else ()) + (rows,) + g.engine_shape[1:])
            idx = MetadataIndex(g.key, offsets)
            items.append(WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                properties=TensorProperties(dtype=dtypes(g)), size=size)))
            resolve[idx] = (g, j)
    for i in range(L):
        for mod in bridge.EXTRA_STATE_MODULES:
            idx = MetadataIndex(f"module.decoder.layers.{mod}._extra_state/shard_{i}_{L}")
            items.append(WriteItem(index=idx, type=WriteItemType.BYTE_IO))
    stacked = sorted({g.key for g in groups if g.stacked})

    class LazySavePlanner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def create_global_plan(self, all_plans):
            plans, md = super().create_global_plan(all_plans)
            return plans, MCoreMetadata(mcore_data={k: {} for k in stacked}, **vars(md))

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return _extra_state_bytes()
            g, j = resolve[write_item.index]
            t = make_chunk(g, j)
            return t.unsqueeze(0) if g.stacked else t

    wdir.mkdir(parents=True)
    writer = dcp.FileSystemWriter(str(wdir), thread_count=max(1, workers))
    dcp.save({}, storage_writer=writer, planner=LazySavePlanner(flatten_state_dict=False,
                                                                flatten_sharded_tensors=False), no_dist=True)
    # The non-sharded part megatron's save adds next to the shards (Lightning's checkpoint dict, no weights).
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__, "state_dict": {},
                "loops": {}, "callbacks": {}, "optimizer_states": {}, "lr_schedulers": [],
                "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                                     "distrib_optim_sharding_type": "dp_reshardable"}}, wdir / "common.pt")
    (wdir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))


# ----------------------------------------------------------------------------------------------------------------
# Verification (independent of the conversion)
# ----------------------------------------------------------------------------------------------------------------


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
        return torch.equal(h, e)
    if direction == "import":
        return torch.equal(h.to(e.dtype), e) and torch.equal(e.to(h.dtype), h)
    return torch.equal(e.to(h.dtype), h)


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


def _map_groups(fn: Callable[[Group], Any], groups: list[Group], workers: int) -> list:
    if workers <= 1:
        return [fn(g) for g in groups]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, groups))


def verify_group(g: Group, engine: torch.Tensor, hf: HFWeights, spec: dict, direction: str,
                 progress: Progress | None = None) -> list[TensorCheck]:
    """Split one engine tensor with the plain-torch splitters and compare each piece with the HF tensor read from
    disk, bit for bit."""
    out = []
    for name, part in zip(g.hf, bridge.verify_split(g, engine, spec)):
        h = hf.get(name) if name in hf.entries else None
        out.append(check_tensor(name, g.megatron, h, part, direction))
        del h
        if progress:
            progress(part.numel() * part.dtype.itemsize)
    return out


def _unmapped(hf: HFWeights, groups: list[Group]) -> list[TensorCheck]:
    mapped = {h for g in groups for h in g.hf}
    return [TensorCheck(n, None, list(hf.shape(n)), str(hf.dtype(n)), "missing_in_engine")
            for n in sorted(set(hf.names()) - mapped)]


def verify_groups(wdir: Path, hf: HFWeights, spec: dict, groups: list[Group], direction: str, *, workers: int = 1,
                  progress: Progress | None = None) -> VerifyReport:
    """Read back each engine tensor and its HF tensors and compare (:func:`verify_group`); HF tensors no group
    accounts for are reported too."""
    checks = _map_groups(lambda g: verify_group(g, read_group(wdir, g), hf, spec, direction, progress), groups,
                         workers)
    return VerifyReport([c for cs in checks for c in cs] + _unmapped(hf, groups))


def verify_engine_against_hf(ckpt: Path, hf_dir: Path, *, workers: int = 1) -> VerifyReport:
    """Every HF tensor must land, bit-exact, in the engine checkpoint (and nothing else may be there)."""
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    spec = bridge.spec_from_hf(cfg, Path(hf_dir) / "config.json")
    hf = HFWeights(hf_dir)
    if spec["tie_word_embeddings"]:
        hf.entries.pop("lm_head.weight", None)
    groups = _groups_for_checkpoint(Path(ckpt), spec)
    return verify_groups(Path(ckpt) / "weights", hf, spec, groups, "import", workers=workers)


def _groups_for_checkpoint(ckpt: Path, spec: dict) -> list[Group]:
    _, meta = _dcp_reader(ckpt / "weights")
    shapes = engine_shapes(meta)
    rows = shapes.get("embedding.word_embeddings.weight", ([None],))[0][0]
    return bridge.expand(spec, vocab_rows=rows)


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


@contextmanager
def _scoped_dist_env():
    """Restore the torch.distributed rendezvous variables Lightning sets for its single-process group.

    Lightning exports MASTER_ADDR/MASTER_PORT into os.environ and the c10d TCPStore keeps listening on that port
    after the group is destroyed, so a child process started later by the caller (e.g. `ellama pretrain` launched
    from the same Python process) would inherit a port that is in use (EADDRINUSE).
    """
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cpu_only() -> bool:
    return not torch.cuda.is_available()


def have_transformer_engine() -> bool:
    from nemo.collections.llm.gpt.model.base import HAVE_TE

    return bool(HAVE_TE)


def te_free_overrides() -> dict[str, Any]:
    """Config fields that need Transformer Engine / CUDA kernels; turned off only where TE is absent."""
    if have_transformer_engine():
        return {}
    return dict(apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, cross_entropy_loss_fusion=False)


def hf_dtype(cfg: dict) -> torch.dtype:
    return _DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"), torch.float32)


def engine_dtype(g: Group, params_dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine's module holds: params_dtype, except the TE-free RMSNorm (torch.nn.RMSNorm in
    megatron's WrappedTorchNorm), which megatron creates in float32 whatever params_dtype is."""
    if g.row.kind == "norm" and not have_transformer_engine():
        return torch.float32
    return params_dtype


def write_context(ckpt: Path, hf_dir: Path, cfg: dict, spec: dict) -> None:
    """``context/`` as NeMo's importer writes it: the model (Llama31Config + HF tokenizer) and trainer, serialised
    by NeMo's own io (``TrainerContext.io_dump``), the tokenizer files and the source HF config as artifacts."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.collections.llm.gpt.model.llama import LlamaModel
    from nemo.lightning import MegatronStrategy, Trainer
    from nemo.lightning.io.pl import TrainerContext
    from transformers import AutoTokenizer as HFAutoTokenizer, GenerationConfig

    dtype = hf_dtype(cfg)
    gen = GenerationConfig.from_pretrained(str(hf_dir)) if (hf_dir / "generation_config.json").is_file() else None
    config = bridge.llama31_config(
        spec, seq_length=spec["max_position_embeddings"], init_method_std=cfg.get("initializer_range", 0.02),
        fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16, params_dtype=dtype, generation_config=gen,
        **te_free_overrides())
    stage = Path(tempfile.mkdtemp(prefix="ellama-tok-")) / "nemo_tokenizer"
    try:
        try:
            HFAutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(stage))
        except Exception as exc:  # noqa: BLE001 - any tokenizer load failure
            raise UserError(f"Cannot load the tokenizer in {hf_dir} with transformers ({type(exc).__name__}: "
                            f"{exc}); an HF Llama directory needs tokenizer.json / tokenizer_config.json.") from exc
        # Export needs max_position_embeddings and the eos id list, which NeMo's config has no place for; the
        # tokenizer dir travels into every checkpoint's context/ (trainer checkpoints too), so it rides there.
        (stage / SOURCE_CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        model = LlamaModel(config, tokenizer=AutoTokenizer(str(stage)))
        with _scoped_dist_env():
            trainer = Trainer(devices=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                              strategy=MegatronStrategy(ckpt_save_optimizer=False, ckpt_async_save=False))
            trainer.strategy.connect(model)
            TrainerContext.from_trainer(trainer).io_dump(ckpt / "context", yaml_attrs=["model"])
    finally:
        shutil.rmtree(stage.parent, ignore_errors=True)


def plan_import(hf: HFWeights, spec: dict) -> tuple[list[Group], VerifyReport]:
    """The groups to write, and the problems visible from the headers alone (unmapped, missing, wrong shape)."""
    groups = bridge.expand(spec)
    rep = VerifyReport()
    mapped = set()
    for g in groups:
        for name, shape in zip(g.hf, g.hf_shapes):
            mapped.add(name)
            if name not in hf.entries:
                rep.checks.append(TensorCheck(name, g.megatron, list(shape), "", "missing_in_hf"))
            elif hf.shape(name) != shape:
                rep.checks.append(TensorCheck(name, g.megatron, [list(hf.shape(name)), list(shape)],
                                              str(hf.dtype(name)), "shape"))
    for name in sorted(set(hf.names()) - mapped):
        if not (name == "lm_head.weight" and spec["tie_word_embeddings"]):
            rep.checks.append(TensorCheck(name, None, list(hf.shape(name)), str(hf.dtype(name)), "missing_in_engine"))
    return groups, rep


def import_hf_to_engine(hf_dir: Path, out: Path, *, workers: int = 1, progress: Progress | None = None,
                        verify_progress: Progress | None = None) -> VerifyReport:
    """Stream an HF Llama 3.1 directory into an engine checkpoint at ``out`` (must not exist) and verify it.

    Raises UserError (after removing ``out``) on unmapped, missing, mis-shaped or mismatched tensors.
    """
    hf_dir, out = Path(hf_dir).resolve(), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    spec = bridge.spec_from_hf(cfg, hf_dir / "config.json")
    hf = HFWeights(hf_dir)
    groups, pre = plan_import(hf, spec)
    if pre.bad:
        raise UserError(
            f"{hf_dir} does not hold exactly the tensors of the Llama its config.json describes "
            f"({spec['num_layers']} layers, hidden {spec['hidden_size']}); importing would drop or misplace "
            "weights. Nothing was written.", problems=pre.problems())
    params_dtype = hf_dtype(cfg)

    def make_chunk(g: Group, j: int) -> torch.Tensor:
        idx = bridge.engine_chunks(g)[j][2]
        t = bridge.to_engine(g, j, [hf.get(g.hf[i]) for i in idx], spec, engine_dtype(g, params_dtype))
        if progress:
            progress(sum(hf.nbytes(g.hf[i]) for i in idx))
        return t

    try:
        write_engine_weights(out / "weights", spec, groups, make_chunk, lambda g: engine_dtype(g, params_dtype),
                             workers)
        write_context(out, hf_dir, cfg, spec)
        rep = verify_groups(out / "weights", hf, spec, groups, "import", workers=workers, progress=verify_progress)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if rep.bad:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(
            f"Import verification failed: {len(rep.bad)} of {len(rep.checks)} Hugging Face tensors did not land "
            f"bit-exact in the engine checkpoint (nothing was written to {out}). This is a converter bug or an "
            "unsupported architecture; report it with the list below.",
            problems=rep.problems(),
        )
    return rep


def model_bytes(hf_dir: Path) -> int:
    hf = HFWeights(hf_dir)
    return sum(hf.nbytes(n) for n in hf.names())


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def load_model_context(ckpt: Path, subpath: str = "model"):
    """Build the checkpoint's saved model (or sub-object) with TE-only fusions turned off where TE is absent."""
    import fiddle as fdl
    from nemo.lightning.io.api import load_context

    try:
        cfg = load_context(Path(ckpt), subpath=subpath, build=False)
    except Exception as exc:  # noqa: BLE001 - fiddle/yaml/io errors all mean "unreadable context"
        raise UserError(
            f"Cannot read {ckpt}/context ({type(exc).__name__}: {exc}); the checkpoint is partial or corrupt."
        ) from exc
    overrides = te_free_overrides()
    target = cfg.config if subpath == "model" else cfg
    if overrides and subpath in ("model", "model.config"):
        for k, v in overrides.items():
            setattr(target, k, v)
    return fdl.build(cfg)


@dataclass
class ExportPlan:
    ckpt: Path
    spec: dict
    groups: list[Group]
    dtype: torch.dtype
    config: Any  # the saved Llama31Config
    tokenizer_dir: Path

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(s).numel() * self.dtype.itemsize for g in self.groups for s in g.hf_shapes)


def plan_export(ckpt: Path) -> ExportPlan:
    """Config, tokenizer and tensor groups of an engine checkpoint, checked against its metadata (no tensor read)."""
    ckpt = Path(ckpt)
    config = load_model_context(ckpt, "model.config")
    tok = load_model_context(ckpt, "model.tokenizer")
    hf_tok = getattr(tok, "tokenizer", None)
    if not hasattr(hf_tok, "save_pretrained"):
        raise UserError(
            f"{ckpt} carries a {type(tok).__name__}, not a Hugging Face tokenizer, so an export would have no "
            "tokenizer files (a run started without --from?). Export runs that continued from `ellama import-hf`."
        )
    if getattr(config, "num_moe_experts", None) or getattr(config, "add_bias_linear", False) or \
            getattr(config, "add_qkv_bias", False):
        raise UserError(f"{ckpt} is not a Llama-3.1-architecture model (MoE or linear biases); it has no HF "
                        "Llama equivalent.")
    tok_dir = Path(getattr(hf_tok, "name_or_path", "") or "/nonexistent")
    source = json.loads((tok_dir / SOURCE_CONFIG_NAME).read_text()) if (tok_dir / SOURCE_CONFIG_NAME).is_file() \
        else None
    spec = bridge.spec_from_nemo(config, source)
    spec.setdefault("max_position_embeddings", config.seq_length)
    _, meta = _dcp_reader(ckpt / "weights")
    shapes = engine_shapes(meta)
    rows = shapes.get("embedding.word_embeddings.weight", ([spec["vocab_size"]],))[0][0]
    groups = bridge.expand(spec, vocab_rows=rows)
    check_engine_shapes(shapes, spec, groups, where=ckpt)
    return ExportPlan(ckpt, spec, groups, config.params_dtype, config, tok_dir)


def check_engine_shapes(shapes: dict[str, tuple[list[int], str]], spec: dict, groups: list[Group], *,
                        where: Path) -> None:
    """Every tensor the table expects is in the checkpoint with the right shape, and nothing else is."""
    want: dict[str, tuple[tuple[int, ...], bool]] = {}
    for g in groups:
        k = g.key[len("module."):]
        want[k] = (((spec["num_layers"],) if g.stacked else ()) + g.engine_shape, g.row.kind == "vocab")
    problems = []
    for k, (shp, vocab) in want.items():
        if k not in shapes:
            problems.append(f"{k}: missing from the checkpoint")
            continue
        got = shapes[k][0]
        if vocab:  # Megatron may pad rows, never fewer than the tokenizer's
            if len(got) != 2 or got[1] != shp[1] or got[0] < spec["vocab_size"]:
                problems.append(f"{k}: shape {got}, expected [>= {spec['vocab_size']}, {shp[1]}]")
        elif got != list(shp):
            problems.append(f"{k}: shape {got}, expected {list(shp)} from the checkpoint's config")
    if problems:
        raise UserError(
            f"{where} does not hold a complete Llama model matching its own config ({spec['num_layers']} layers, "
            f"hidden {spec['hidden_size']}, {spec['num_attention_heads']} heads / {spec['num_query_groups']} KV "
            f"groups, vocab {spec['vocab_size']}); exporting it would drop or misplace tensors. Use an intact "
            "checkpoint.", problems=problems)
    unmapped = sorted(set(shapes) - set(want))
    if unmapped:
        raise UserError(
            f"{len(unmapped)} engine tensor(s) have no Hugging Face Llama counterpart, so exporting would drop "
            "them. Is this a Llama-3.1-architecture checkpoint (no biases, no MoE, no extra adapters)? "
            "Merge adapters first or export with the tool that produced these weights.", problems=unmapped[:50])


def export_mapping_table(ckpt: Path) -> list[dict]:
    """The dry-run table: engine name -> HF name, shape, dtype (from checkpoint metadata; no tensors loaded)."""
    plan = plan_export(ckpt)
    dt = str(plan.dtype).replace("torch.", "")
    return [{"engine": g.megatron, "hf": h, "engine_shape": list(g.engine_shape), "shape": list(s), "dtype": dt}
            for g in plan.groups for h, s in zip(g.hf, g.hf_shapes)]


def write_hf_config(plan: ExportPlan, out: Path) -> None:
    """config.json (the source's, with the architecture from the checkpoint), generation_config.json, tokenizer."""
    from transformers import GenerationConfig, LlamaConfig

    source = json.loads((plan.tokenizer_dir / SOURCE_CONFIG_NAME).read_text()) \
        if (plan.tokenizer_dir / SOURCE_CONFIG_NAME).is_file() else {}
    fields = {k: v for k, v in source.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    fields.update(bridge.hf_from_spec(plan.spec))
    fields["dtype"] = str(plan.dtype).replace("torch.", "")
    cfg = LlamaConfig(**fields)
    cfg.save_pretrained(str(out))
    gen = getattr(plan.config, "generation_config", None) or GenerationConfig.from_model_config(cfg)
    gen.save_pretrained(str(out))
    if (plan.tokenizer_dir / "tokenizer_config.json").is_file():
        # The files the importer staged verbatim from the HF source (special tokens, chat template intact)
        for f in plan.tokenizer_dir.iterdir():
            if f.is_file() and f.name != SOURCE_CONFIG_NAME:
                shutil.copy2(f, out / f.name)
    else:
        load_model_context(plan.ckpt, "model.tokenizer").tokenizer.save_pretrained(str(out))


DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default


def export_engine_to_hf(ckpt: Path, out: Path, *, workers: int = 1, shard_bytes: int = DEFAULT_SHARD_BYTES,
                        progress: Progress | None = None, verify_progress: Progress | None = None,
                        plan: ExportPlan | None = None) -> VerifyReport:
    """Stream an engine checkpoint into the existing empty dir ``out`` as an HF Llama and verify every tensor."""
    plan = plan or plan_export(ckpt)
    wdir = Path(ckpt) / "weights"
    shards = SafetensorsShards(Path(out), [(h, s, plan.dtype) for g in plan.groups for h, s in zip(g.hf, g.hf_shapes)],
                               shard_bytes)

    written = HFWeights(Path(out))  # the headers are on disk already

    def one(g: Group) -> list[TensorCheck]:
        engine = read_group(wdir, g)
        for name, t in zip(g.hf, bridge.to_hf(g, engine, plan.spec, plan.dtype)):
            shards.write(name, t)
            if progress:
                progress(t.numel() * t.dtype.itemsize)
            del t
        # read back what was just written and check it against the same engine tensor, split independently
        return verify_group(g, engine, written, plan.spec, "export", verify_progress)

    checks = _map_groups(one, plan.groups, workers)
    shards.finish()
    write_hf_config(plan, Path(out))
    return VerifyReport([c for cs in checks for c in cs] + _unmapped(HFWeights(Path(out)), plan.groups))


def verify_export_tensors(ckpt: Path, hf_dir: Path) -> VerifyReport:
    """Every engine tensor maps to exactly one HF tensor, bit-exact; no HF tensor without an engine source."""
    plan = plan_export(ckpt)
    return verify_groups(Path(ckpt) / "weights", HFWeights(hf_dir), plan.spec, plan.groups, "export")


# ----------------------------------------------------------------------------------------------------------------
# Logits check: the engine's own forward pass (instantiates the model: small models only)
# ----------------------------------------------------------------------------------------------------------------


def load_engine_model(ckpt: Path):
    """(LightningModule, trainer) for a NeMo 2 checkpoint on this host (CPU when there is no GPU)."""
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import MegatronStrategy, Trainer, _strategy_lib

    from ellama_recipes.engine import cpu_compat

    cpu_compat.apply_conversion_redirects()
    model = load_model_context(ckpt, "model")
    model.config.fp8 = None
    model.config.fp8_param = False
    model.config.perform_initialization = False
    if getattr(model, "model_transform", None) is not None:
        raise UserError(f"{ckpt} is a PEFT/adapter checkpoint; merge the adapters before exporting.")
    cpu = _cpu_only()
    trainer = Trainer(devices=1, accelerator="cpu" if cpu else "gpu", logger=False, enable_checkpointing=False,
                      strategy=MegatronStrategy(ddp="pytorch", setup_optimizers=False))
    # Inference-only: TESTING skips MegatronParallel.init_ddp, which needs torch.cuda.Stream.
    trainer.state.fn = TrainerFn.TESTING
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    if not model.state_dict():
        if cpu:
            with _strategy_lib.megatron_cpu_init_context(model.config):
                model.configure_model()
        else:
            model.configure_model()
    trainer.strategy.setup(trainer)
    try:
        trainer.strategy.load_checkpoint(Path(ckpt))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        raise UserError(
            f"Loading {ckpt} into the model its context describes failed ({type(exc).__name__}: {exc}). The "
            "checkpoint is partial, corrupt, or its weights do not match its context/; use an intact checkpoint."
        ) from exc
    return model, trainer


def _mcore_gpt(model):
    from megatron.core.models.gpt import GPTModel

    m = model
    for _ in range(6):
        if isinstance(m, GPTModel):
            return m
        m = getattr(m, "module", None)
        if m is None:
            break
    raise RuntimeError(f"no megatron GPTModel inside {type(model).__name__}")


def fixed_batch(vocab_size: int, seq_length: int) -> torch.Tensor:
    """The fixed batch the logits check uses: 2 x min(32, seq) token ids from a seeded generator."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, min(32, seq_length)), generator=g)


@torch.no_grad()
def engine_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The engine's own forward pass (megatron GPTModel), in float32, on CPU or the current GPU."""
    gpt = _mcore_gpt(model)
    gpt.eval()
    if _cpu_only():
        # megatron's DotProductAttention forks the 'model-parallel-rng' CUDA RNG state even in eval; on CPU the
        # strategy never registers it. The inference tracker's fork is a no-op (no dropout at eval anyway).
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    dev = next(gpt.parameters()).device
    gpt.float()
    b, s = input_ids.shape
    ids = input_ids.to(dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    # TE-free DotProductAttention needs an explicit causal mask (True = masked); TE's fused attention builds its
    # own from attn_mask_type=causal and is given none, as in megatron's own training/inference paths.
    mask = None if have_transformer_engine() else \
        torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), diagonal=1)[None, None]
    return gpt(input_ids=ids, position_ids=pos, attention_mask=mask).float().cpu()


def engine_batch_logits(ckpt: Path, vocab_size: int) -> dict:
    """{"batch", "engine_logits"} of the engine checkpoint on the fixed batch (loads the whole model)."""
    with _scoped_dist_env():
        model, trainer = load_engine_model(Path(ckpt))
        try:
            batch = fixed_batch(vocab_size, model.config.seq_length)
            return {"batch": batch, "engine_logits": engine_logits(model, batch)}
        finally:
            from nemo.lightning import teardown

            teardown(trainer, model)


# float32 on both sides; the remaining differences come from op order (megatron's fused QKV GEMM and
# fc1 GEMM vs three/two separate HF GEMMs, different softmax/RMSNorm kernels): ~1e-6 relative in practice.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4


@torch.no_grad()
def compare_logits(engine_out: dict, hf_dir: Path) -> dict:
    """Reload the export with transformers (float32) and compare logits with the engine's on the fixed batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.eval()
    ids = engine_out["batch"]
    hf_logits = model(input_ids=ids).logits.float()
    eng = engine_out["engine_logits"][..., : hf_logits.shape[-1]]
    if eng.shape != hf_logits.shape:
        return {"max_logit_diff": float("inf"), "logit_tolerance": LOGIT_ATOL, "logits_ok": False,
                "logit_shapes": [list(eng.shape), list(hf_logits.shape)]}
    diff = (eng - hf_logits).abs()
    tol = LOGIT_ATOL + LOGIT_RTOL * hf_logits.abs()
    return {
        "max_logit_diff": diff.max().item(),
        "logit_tolerance": LOGIT_ATOL,
        "logit_rtol": LOGIT_RTOL,
        "logits_ok": bool((diff <= tol).all()),
        "batch_shape": list(ids.shape),
        "argmax_agreement": (eng.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
    }
