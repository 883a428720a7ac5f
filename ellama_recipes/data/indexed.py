"""Megatron indexed datasets (``.bin`` / ``.idx``): writing with megatron-core's builder, reading back, and
Megatron's blending index. The only module of the data pipeline that imports ``megatron.core`` (its dataset code, lazily: no training code).

Writing uses :class:`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` (its ``.bin`` stream and its
``_IndexWriter`` header/dtype codes). Two changes keep memory flat on big corpora, with byte-identical output
(checked in tests/test_data_pipeline.py against the stock builder):

- per-document lengths are kept in compact ``array('i')`` / ``array('q')`` buffers (4 + 8 bytes per document) instead
  of Python lists of ints (about 36 bytes per entry);
- ``finalize`` computes the sequence byte offsets with a numpy cumulative sum instead of a Python loop that
  materialises one Python int per sequence.

Documents can be added in batches (one flat token array plus lengths): one ``write`` call per batch.
"""

from __future__ import annotations

import struct
from array import array
from pathlib import Path

import numpy as np


def _idx_mod():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def optimal_dtype(vocab_size: int):
    """Megatron's choice of token dtype for a vocabulary size (uint16 below 65500, else int32)."""
    return _idx_mod().DType.optimal_dtype(vocab_size)


class TokenWriter:
    """Streaming writer of one Megatron indexed dataset at ``prefix`` (``prefix.bin`` + ``prefix.idx``).

    One sequence per document (GPT-style, what Megatron-LM's ``tools/preprocess_data.py`` writes without
    sentence splitting).
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        mod = _idx_mod()
        self.prefix = str(prefix)
        self.dtype = optimal_dtype(vocab_size)
        self._builder = mod.IndexedDatasetBuilder(mod.get_bin_path(self.prefix), dtype=self.dtype)
        self._lengths = array("i")
        self.documents = 0
        self.tokens = 0
        self._closed = False

    def add_batch(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        flat = np.asarray(flat, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"lengths sum {int(lengths.sum())} != tokens {flat.size}")
        self._builder.data_file.write(flat.tobytes(order="C"))
        self._lengths.frombytes(lengths.tobytes())
        self.documents += int(lengths.size)
        self.tokens += int(flat.size)

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.add_batch(arr, np.array([arr.size], dtype=np.int32))

    def finalize(self) -> None:
        """Close the ``.bin`` and write the ``.idx`` (same bytes as ``IndexedDatasetBuilder.finalize``)."""
        mod = _idx_mod()
        self._builder.data_file.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        n = lengths.size
        itemsize = mod.DType.size(self.dtype)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        doc_idx = np.arange(n + 1, dtype=np.int64)  # one sequence per document
        with mod._IndexWriter(mod.get_idx_path(self.prefix), self.dtype) as w:
            w.idx_writer.write(struct.pack("<Q", n))
            w.idx_writer.write(struct.pack("<Q", doc_idx.size))
            w.idx_writer.write(lengths.tobytes(order="C"))
            w.idx_writer.write(pointers.tobytes(order="C"))
            w.idx_writer.write(doc_idx.tobytes(order="C"))
        self._closed = True

    def abort(self) -> None:
        if not self._closed:
            self._builder.data_file.close()
            self._closed = True


def write_with_stock_builder(prefix: str | Path, docs: list[list[int]], vocab_size: int) -> None:
    """Write ``docs`` with megatron-core's unmodified ``IndexedDatasetBuilder`` (reference for tests)."""
    import torch

    mod = _idx_mod()
    b = mod.IndexedDatasetBuilder(mod.get_bin_path(str(prefix)), dtype=optimal_dtype(vocab_size))
    for d in docs:
        b.add_document(torch.tensor(d), [len(d)])
    b.finalize(mod.get_idx_path(str(prefix)))


def read_back(prefix: str | Path) -> dict:
    """Open ``prefix`` with megatron-core's ``IndexedDataset``: documents, total tokens, token dtype."""
    ds = _idx_mod().IndexedDataset(str(prefix), mmap=True)
    lengths = ds.sequence_lengths
    return {"documents": len(ds.document_indices) - 1, "sequences": len(ds), "tokens": int(np.sum(lengths, dtype=np.int64)),
            "dtype": str(np.dtype(ds.index.dtype))}


def read_document(prefix: str | Path, i: int) -> np.ndarray:
    ds = _idx_mod().IndexedDataset(str(prefix), mmap=True)
    return np.array(ds[i])


def blending_counts(weights: list[float], num_samples: int) -> np.ndarray:
    """Samples drawn from each dataset in the first ``num_samples`` of Megatron's ``BlendedDataset``.

    Runs megatron-core's own ``helpers.build_blending_indices`` (the greedy "largest deficit first" assignment that
    ``BlendedDataset`` uses when weights and a size are given) and counts the result.
    """
    from megatron.core.datasets import helpers

    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    dataset_index = np.zeros(num_samples, dtype=np.int16)
    dataset_sample_index = np.zeros(num_samples, dtype=np.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index, w, len(w), num_samples, False)
    return np.bincount(dataset_index, minlength=len(w))
