"""Blocks of input files: the unit of work the Ray stages hand to their tasks and actors.

A block is a byte range of one JSONL file that starts and ends on a line boundary (or a row range of one Parquet
file), with the number of its first line, so a task that reads only its block still names every line ``file:line``
exactly as the sequential reader (:func:`ellama_recipes.data.records.iter_objects`) does.

Each line also gets a global order id ``gid = file_index << 40 | line`` (int64; smaller = earlier in the corpus, what
the dedup keeps as a cluster's representative and what the sequential pipeline's "first occurrence wins" means).

Splitting is a sequential newline count of each file (``bytes.count`` over 1 MiB reads, about 1-2 GB/s); nothing of
the content is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

BLOCK_BYTES = 4 << 20  # default JSONL block size
GID_SHIFT = 40


@dataclass
class Block:
    path: str
    file_index: int
    offset: int  # byte offset of the block's first line (Parquet: first row, 0-based)
    nbytes: int  # bytes in the block (Parquet: rows)
    first_line: int  # 1-based number of the block's first line / row
    lines: int
    parquet: bool = False

    def as_row(self) -> dict:
        return asdict(self)


def gid(file_index: int, line: int) -> int:
    return (int(file_index) << GID_SHIFT) | int(line)


def split_file(path: Path, file_index: int, block_bytes: int = BLOCK_BYTES) -> list[Block]:
    """Blocks of about ``block_bytes`` (whole lines) covering ``path``; a file without a final newline keeps its
    last line."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        md = pq.ParquetFile(path).metadata
        out, row = [], 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n:
                out.append(Block(str(path), file_index, row, n, row + 1, n, parquet=True))
            row += n
        return out
    blocks: list[Block] = []
    start = 0  # byte offset of the current block
    first = 1
    pos = 0  # bytes read so far
    lines_in_block = 0
    last_nl = -1  # offset just past the last newline seen in the current block
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            base = pos
            pos += len(chunk)
            i = 0
            while True:
                j = chunk.find(b"\n", i)
                if j < 0:
                    break
                lines_in_block += 1
                last_nl = base + j + 1
                i = j + 1
                if last_nl - start >= block_bytes:
                    blocks.append(Block(str(path), file_index, start, last_nl - start, first, lines_in_block))
                    first += lines_in_block
                    start, lines_in_block = last_nl, 0
    if pos > start:  # trailing lines (the last one may lack its newline)
        tail = lines_in_block + (1 if pos > max(last_nl, start) else 0)
        blocks.append(Block(str(path), file_index, start, pos - start, first, tail))
    return blocks


def split_files(paths: list[Path], block_bytes: int = BLOCK_BYTES) -> list[Block]:
    return [b for i, p in enumerate(paths) for b in split_file(p, i, block_bytes)]


def read_lines(block: dict | Block) -> list[bytes]:
    """The raw lines of a JSONL block (with their line endings, as ``for raw in f`` yields them)."""
    b = block if isinstance(block, dict) else block.as_row()
    with open(b["path"], "rb") as f:
        f.seek(b["offset"])
        data = f.read(b["nbytes"])
    lines = [ln + b"\n" for ln in data.split(b"\n")]  # split on \n only, exactly as `for raw in f` does
    if data.endswith(b"\n"):
        lines.pop()
    else:
        lines[-1] = lines[-1][:-1]
    return lines


def iter_block_objects(block: dict):
    """``(object, "file:line", line, reject)`` for every line/row of a block (records.iter_objects' rules)."""
    import json

    from ellama_recipes.data.records import BLANK_LINE, INVALID_UTF8, MALFORMED_JSON, Reject

    path = block["path"]
    if block["parquet"]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        row, start, end = 0, block["offset"], block["offset"] + block["nbytes"]
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n <= start or row >= end:
                row += n
                continue
            for obj in pf.read_row_group(g).to_pylist():
                row += 1
                if start < row <= end:
                    yield {k: v for k, v in obj.items() if v is not None}, f"{path}:{row}", row, None
        return
    for k, raw in enumerate(read_lines(block)):
        lineno = block["first_line"] + k
        src = f"{path}:{lineno}"
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            yield None, src, lineno, Reject(BLANK_LINE, src, "blank line")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield None, src, lineno, Reject(INVALID_UTF8, src, f"invalid UTF-8 at byte {exc.start}")
            continue
        try:
            yield json.loads(text), src, lineno, None
        except json.JSONDecodeError as exc:
            yield None, src, lineno, Reject(MALFORMED_JSON, src, f"{exc.msg} at column {exc.colno}")
