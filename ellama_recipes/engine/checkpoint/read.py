"""Reading Megatron distributed (``torch_dist``) checkpoints chunk by chunk, without building the model.

:class:`EngineChunks` locates each stored chunk once (``torch.load`` onto the meta device: shape, strides and the
record's offset in its file, no data read) and reads its bytes straight into a reused buffer (one copy from the page
cache); other layouts go through ``torch.distributed.checkpoint``'s own load planner asking for one layer's slice of a
stacked key (:func:`read_chunks`). :func:`read_engine_weights` loads everything (tests, small checkpoints).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from ellama_recipes.engine.bridge import Group
from ellama_recipes.errors import UserError
from ellama_recipes.io.safetensors import Buffers, readinto

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dcp_reader(wdir: Path):
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

    reader, meta = dcp_reader(wdir)
    dest = {(key, tuple(offsets)): torch.empty(sizes, dtype=meta.state_dict_metadata[key].properties.dtype)
            for key, offsets, sizes in wants}
    try:
        dcp.load({}, storage_reader=reader, planner=_chunk_planner(wants, meta, dest), no_dist=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"Reading tensors from {wdir} failed ({type(exc).__name__}: {exc}); the checkpoint is partial or corrupt."
        ) from exc
    return [dest.pop((k, tuple(o))) for k, o, _ in wants]


class EngineChunks:
    """Regions of the model tensors of a torch_dist ``weights/`` dir, read from the stored bytes.

    ``torch.distributed.checkpoint`` stores each chunk as a ``torch.save`` record; its reader ``torch.load``s a chunk
    into a new tensor and then copies it into the destination. Here each stored chunk is located once (``torch.load``
    onto the meta device: shape, strides and the record's offset in the file, no data read) and its bytes are read
    straight into the destination - one copy from the page cache, into a reused buffer. A region whose chunks are
    not contiguous row blocks of it (e.g. a column-sharded tensor parallel layout) or a chunk stored in any other
    way goes through ``torch.distributed.checkpoint``'s own load (:func:`read_chunks`).
    """

    def __init__(self, wdir: Path):
        self.wdir = Path(wdir)
        _, self.meta = dcp_reader(self.wdir)
        self._where: dict[tuple[str, tuple[int, ...]], tuple[Path, int] | None] = {}
        self._lock = threading.Lock()

    def _locate(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype):
        """(file, byte offset) of a stored chunk's data when it is a plain row-major record of that shape."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.utils import _create_file_view

        with self._lock:
            if (key, offsets) in self._where:
                return self._where[(key, offsets)]
        info = self.meta.storage_data.get(MetadataIndex(key, torch.Size(offsets)))
        where = None
        if info is not None and not info.transform_descriptors:
            path = self.wdir / info.relative_path
            try:
                with open(path, "rb") as f:
                    m = torch.load(_create_file_view(f, info.offset, info.length), map_location="meta",
                                   weights_only=True)
                st = m.untyped_storage()
                ok = (isinstance(m, torch.Tensor) and m.dtype == dtype and tuple(m.shape) == sizes
                      and m.is_contiguous() and hasattr(st, "_checkpoint_offset")
                      and st.nbytes() >= (m.storage_offset() + m.numel()) * m.element_size())
                if ok:
                    where = (path, info.offset + st._checkpoint_offset + m.storage_offset() * m.element_size())
            except Exception:  # noqa: BLE001 - not the record layout expected: the generic reader decides
                where = None
        with self._lock:
            self._where[(key, offsets)] = where
        return where

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
             buffers: Buffers | None = None) -> torch.Tensor:
        """The region ``offsets``/``sizes`` of stored tensor ``key``, in its stored dtype."""
        offsets, sizes = tuple(offsets), tuple(sizes)
        direct = self._stored_blocks(key, offsets, sizes)
        if direct is None:
            return read_chunks(self.wdir, [(key, offsets, sizes)])[0]
        dtype, parts = direct
        out = buffers.take(sizes, dtype) if buffers is not None else torch.empty(sizes, dtype=dtype)
        flat = out.view(-1)
        strides = out.stride() if out.dim() else ()
        for co, cs, path, pos in parts:
            first = sum((a - o) * st for a, o, st in zip(co, offsets, strides))
            readinto(path, pos, flat[first:first + torch.Size(cs).numel()], "; the checkpoint is partial or corrupt")
        return out

    def _stored_blocks(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        """``(dtype, [(chunk offsets, chunk sizes, file, byte offset), ...])`` when the region is covered by stored
        chunks that are contiguous row blocks of it, each a plain record in its file; None: the generic reader."""
        md = self.meta.state_dict_metadata.get(key)
        if md is None or not hasattr(md, "chunks"):
            return None
        dtype = md.properties.dtype
        end = tuple(o + n for o, n in zip(offsets, sizes))
        parts, covered = [], 0
        for c in md.chunks:
            co, cs = tuple(c.offsets), tuple(c.sizes)
            ce = tuple(o + n for o, n in zip(co, cs))
            if any(a >= e2 or b <= o2 for a, b, o2, e2 in zip(co, ce, offsets, end)):
                continue  # no overlap
            if any(a < o2 or b > e2 for a, b, o2, e2 in zip(co, ce, offsets, end)):
                return None  # straddles the region
            # a contiguous block of the region: full trailing dims after one dim d, size-1 region dims before it
            d = next((i for i, (n, r) in enumerate(zip(cs, sizes)) if n != r), None)
            if d is not None and (any(r != 1 for r in sizes[:d]) or cs[d + 1:] != sizes[d + 1:]):
                return None
            parts.append((co, cs))
            covered += torch.Size(cs).numel()
        if covered != torch.Size(sizes).numel():
            return None
        where = [self._locate(key, co, cs, dtype) for co, cs in parts]
        if any(w is None for w in where):
            return None
        return dtype, [(co, cs, *w) for (co, cs), w in zip(parts, where)]

    def group(self, g: Group, buffers: Buffers | None = None) -> torch.Tensor:
        """One group's engine tensor (one layer of a stacked key), in the stored dtype."""
        if g.stacked:
            return self.read(g.key, (g.layer,) + (0,) * len(g.engine_shape), (1,) + g.engine_shape, buffers)[0]
        return self.read(g.key, (0,) * len(g.engine_shape), g.engine_shape, buffers)


def read_group(wdir: Path, g: Group) -> torch.Tensor:
    """One group's engine tensor (one layer of a stacked key), in the stored dtype."""
    return EngineChunks(wdir).group(g)


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
    reader, meta = dcp_reader(wdir)
    shapes = engine_shapes(meta)
    if not shapes:
        raise UserError(f"{wdir} holds no model tensors (no 'module.*' entries); it is not a NeMo model checkpoint.")
    state = {"module." + k: torch.empty(s, dtype=TORCH_DTYPES.get(d, torch.float32)) for k, (s, d) in shapes.items()}
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


def checkpoint_tokenizer(tokenizer_from: str | None, vocab_size: int):
    """The tokenizer saved in the ``--from`` engine checkpoint, or a NullTokenizer for random-init smoke runs.

    The NullTokenizer's EOD id is ``vocab_size - 1`` so every id stays inside the embedding table.
    """
    if tokenizer_from:
        ctx = Path(tokenizer_from) / "context"
        if ctx.is_dir():
            from nemo.lightning.io import load_context

            tok = load_context(ctx, subpath="model.tokenizer")
            from nemo.collections.common.tokenizers import TokenizerSpec

            if isinstance(tok, TokenizerSpec):
                return tok
        raise UserError(
            f"Cannot read a tokenizer from the checkpoint {tokenizer_from!r} (expected {ctx}/ with model.tokenizer). "
            f"Fix: pass --from an engine checkpoint written by `ellama import-hf`."
        )
    from nemo.collections.common.tokenizers.null_tokenizer import NullTokenizer

    return NullTokenizer(vocab_size - 1)
