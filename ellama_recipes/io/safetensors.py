"""The one streaming safetensors codec: HF weights read and written one tensor at a time (import, export, merge).

- :class:`HFWeights`: the tensors of an HF checkpoint directory (``*.safetensors`` through their headers, read with
  positional reads straight into a buffer, no whole-file mmap; ``pytorch_model*.bin`` mmapped), one at a time, and
  compared with a tensor in memory slice by slice (:meth:`HFWeights.equals`, memcmp: no second copy).
- :class:`SafetensorsShards`: safetensors files whose headers are written first, each tensor's bytes then written
  at its offset (any order, several threads), fsynced once at the end, plus the shard index.
- :class:`Buffers`: tensor buffers reused from tensor to tensor (first-touching fresh memory costs a page fault per
  4 KiB page; on the VMs measured ~10x a copy from the page cache), and :func:`bits_equal`.

The format: an 8-byte little-endian header length, the JSON header (``{name: {"dtype", "shape", "data_offsets"}}``
plus ``__metadata__``, padded with spaces to 8 bytes), then the tensors' bytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from ellama_recipes.errors import UserError


class Buffers:
    """Tensor buffers reused across groups (the same shapes repeat every layer).

    A fresh allocation of hundreds of MB costs a page fault per 4 KiB page on first touch (on a VM several times
    the cost of the copy itself) and glibc hands anything over 32 MiB back to the kernel on free, so the read
    buffers of one group are given back here and taken again by the next group of the same size. Holds at most
    what was in use at once (per byte size), so the bound stays a small multiple of the largest group.
    """

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._out: dict[int, torch.Tensor] = {}  # data_ptr -> the uint8 buffer it came from
        self._lock = threading.Lock()
        self.nbytes = self.peak = 0  # bytes allocated (free + handed out); their high-water mark

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        with self._lock:
            free = self._free.get(n)
            buf = free.pop() if free else None
            if buf is None:
                self.nbytes += n
                self.peak = max(self.peak, self.nbytes)
        if buf is None:
            buf = torch.empty(n, dtype=torch.uint8)
        t = buf.view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)
        if n:
            with self._lock:
                self._out[t.data_ptr()] = buf
        return t

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Return buffers from :meth:`take` (anything else is ignored); their contents may be overwritten."""
        with self._lock:
            for t in tensors:
                buf = self._out.pop(t.data_ptr(), None) if t is not None and t.numel() else None
                if buf is not None:
                    self._free.setdefault(buf.numel(), []).append(buf)


_libc = ctypes.CDLL(None)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and the sign of zero included). Contiguous tensors are compared
    with memcmp (no GIL held, no temporaries); strided views as integer views of the same bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    if a.is_contiguous() and b.is_contiguous():
        return _libc.memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    if a.element_size() in _INT and a.dtype != torch.bool:
        return torch.equal(a.view(_INT[a.element_size()]), b.view(_INT[b.element_size()]))
    return torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ the format
DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """``(header, data offset)`` of a safetensors file: the JSON header (names -> dtype, shape, data_offsets) and
    where the tensor bytes start."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def weight_files(model_dir: str | Path) -> list[str]:
    """The safetensors files of an HF model directory: the index's files, else every ``*.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


def tensor_table(model_dir: str | Path) -> dict[str, tuple[str, str, list[int]]]:
    """tensor name -> (file, dtype name, shape), from the headers only (no weights read)."""
    table = {}
    for fname in weight_files(model_dir):
        for name, info in read_header(Path(model_dir) / fname)[0].items():
            if name != "__metadata__":
                table[name] = (fname, info["dtype"], list(info["shape"]))
    return table


def pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Read ``len(buf)`` bytes at ``offset`` of ``fd`` into ``buf`` (positional: no shared file position, so
    threads may share a file); returns the bytes read, fewer only at the end of the file."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if not n:
            break
        done += n
    return done


def readinto(path: Path, offset: int, t: torch.Tensor, hint: str = "") -> torch.Tensor:
    """Fill ``t`` with the bytes at ``offset`` of ``path``; a short file is a UserError (``hint`` appended)."""
    buf = memoryview(t.view(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        done = pread_full(fd, buf, offset)
    finally:
        os.close(fd)
    if done < len(buf):
        raise UserError(f"{path} is truncated (read {done} of {len(buf)} bytes at offset {offset}){hint}.")
    return t


class HFWeights:
    """The tensors of an HF checkpoint directory, read one at a time (safetensors; pytorch_model*.bin mmapped)."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int]] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        files = [self.dir / f for f in weight_files(self.dir)]
        for f in files:
            header, base = read_header(f)
            for name, e in header.items():
                if name != "__metadata__":
                    self.entries[name] = (f, DTYPES[e["dtype"]], tuple(e["shape"]), base + e["data_offsets"][0])
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

    def get(self, name: str, buffers: Buffers | None = None) -> torch.Tensor:
        """A fresh copy of one tensor (read into a buffer of ``buffers`` when given: give it back after use)."""
        path, dt, shape, offset = self.entries[name]
        if offset < 0:
            return self._bins[str(path)][name].clone()
        return readinto(path, offset, buffers.take(shape, dt) if buffers is not None else torch.empty(shape, dtype=dt))

    def equals(self, name: str, t: torch.Tensor, buffers: Buffers, step: int = 64 << 20) -> bool | None:
        """Whether the stored bytes of ``name`` are the bytes of the contiguous tensor ``t`` (same dtype and shape),
        read and compared ``step`` bytes at a time (no copy of the whole tensor). None: not comparable this way."""
        path, dt, shape, offset = self.entries[name]
        if offset < 0 or dt != t.dtype or shape != tuple(t.shape) or not t.is_contiguous():
            return None
        n = t.numel() * t.element_size()
        if not n:
            return True
        buf = buffers.take((min(step, n),), torch.uint8)
        try:
            mv = memoryview(buf.numpy())
            fd = os.open(path, os.O_RDONLY)
            try:
                pos = 0
                while pos < n:
                    k = min(len(mv), n - pos)
                    if pread_full(fd, mv[:k], offset + pos) < k:
                        return False  # truncated
                    if _libc.memcmp(buf.data_ptr(), t.data_ptr() + pos, k):
                        return False
                    pos += k
            finally:
                os.close(fd)
            return True
        finally:
            buffers.give(buf)

    def read_all(self) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self.names()}


class SafetensorsShards:
    """HF safetensors shards written at known offsets (headers first), so tensors may arrive in any order.

    ``tensors`` ``[(name, shape, dtype)]`` are split into shards of at most ``max_shard_bytes`` (transformers'
    names: ``model.safetensors`` alone, else ``model-0000k-of-0000n.safetensors`` + the index); or ``shards`` gives
    the layout itself (``[(file name, [(name, shape, dtype), ...]), ...]``, e.g. another checkpoint's). Each file is
    created at its full size with its header; :meth:`write` puts a tensor's bytes at its offset; :meth:`finish`
    fsyncs and writes the index. ``safetensors.safe_open`` / ``transformers`` read the result.
    """

    def __init__(self, out: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
                 max_shard_bytes: int | None = None, *,
                 shards: list[tuple[str, list[tuple[str, tuple[int, ...], torch.dtype]]]] | None = None,
                 metadata: dict[str, Any] | None = None):
        if shards is None:
            shards = plan_shards(tensors or [], max_shard_bytes or DEFAULT_SHARD_BYTES)
        self.out, self.where, self.weight_map = Path(out), {}, {}
        self.total = 0
        for fname, shard in shards:
            header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
            pos = 0
            for name, shape, dt in shard:
                nb = torch.Size(shape).numel() * dt.itemsize
                header[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [pos, pos + nb]}
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
        self.sharded = len(shards) > 1

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
        for f in set(self.weight_map.values()):
            with open(self.out / f, "rb+") as fh:
                os.fsync(fh.fileno())
        if self.sharded:
            (self.out / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))


DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default


def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
    """Split ``tensors`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own), named
    as transformers names them."""
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for t in tensors:
        nb = torch.Size(t[1]).numel() * t[2].itemsize
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    n = len(shards)
    return [("model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors", s)
            for k, s in enumerate(shards)]
