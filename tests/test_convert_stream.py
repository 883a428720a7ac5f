"""Import / export stream one tensor group at a time (issue 15), with the memory bound checked directly.

The bound is measured on the tensors themselves, not on process RSS (which NeMo's import dominates at this size):
every tensor the HF reader or the checkpoint chunk reader hands out is tracked until it is freed, and the most
bytes alive at once must not exceed the largest tensor group - whatever the depth; the reused read buffers
(io.safetensors.Buffers) must stay a small multiple of it, the same at every depth. benchmarks/bench_convert.py
measures the RSS of the same code on a 1.5B model.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ellama_recipes.model.sizes import SIZES
from ellama_recipes.model.tiny import build_tiny_base

pytestmark = pytest.mark.engine

TINY = SIZES["tiny"].arch


class LiveBytes:
    """Bytes of tracked tensors alive right now, and the peak."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.now -= n


def _track_hf_reads(monkeypatch) -> LiveBytes:
    from ellama_recipes.io.safetensors import HFWeights

    live, get = LiveBytes(), HFWeights.get
    monkeypatch.setattr(HFWeights, "get", lambda self, name, buffers=None: live.track(get(self, name, buffers)))
    return live


def _track_buffers(monkeypatch) -> list:
    """Every Buffers pool the conversions create from now on (their .peak: bytes allocated at most)."""
    from ellama_recipes.engine.checkpoint import hf_export, hf_import, verify
    from ellama_recipes.io.safetensors import Buffers

    pools = []

    class Tracked(Buffers):
        def __init__(self):
            super().__init__()
            pools.append(self)

    for module in (hf_import, hf_export, verify):
        monkeypatch.setattr(module, "Buffers", Tracked)
    return pools


def _largest_group_bytes(spec: dict, itemsize: int = 4) -> int:
    from ellama_recipes.engine.bridge import expand

    return max(sum(torch.Size(s).numel() for s in g.hf_shapes) * itemsize for g in expand(spec))


@pytest.fixture(scope="module")
def depth_sources(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("depth")
    return {n: build_tiny_base(root / f"hf-{n}", arch=replace(TINY, num_layers=n), seed=3) for n in (2, 8)}


@pytest.mark.slow
def test_import_peak_is_one_group_and_flat_with_depth(depth_sources, tmp_path, monkeypatch):
    from ellama_recipes.engine.checkpoint.hf_import import import_hf_to_engine, model_bytes
    from ellama_recipes.engine.checkpoint.read import read_engine_weights
    from ellama_recipes.model.architecture import from_hf as spec_from_hf

    peaks, pool_peaks = {}, {}
    for n, src in depth_sources.items():
        live = _track_hf_reads(monkeypatch)
        pools = _track_buffers(monkeypatch)
        done = {"convert": 0, "verify": 0}
        rep = import_hf_to_engine(src, tmp_path / f"ck-{n}",
                                  progress=lambda b: done.__setitem__("convert", done["convert"] + b),
                                  verify_progress=lambda b: done.__setitem__("verify", done["verify"] + b))
        assert not rep.bad and len(rep.checks) == 3 + 9 * n
        spec = spec_from_hf(json.loads((src / "config.json").read_text()))
        total = model_bytes(src)
        # progress counts every model byte once per phase
        assert done == {"convert": total, "verify": total}, (done, total)
        # the writer holds the chunk it is writing while the next is produced: at most two groups at once
        assert 0 < live.peak <= 2 * _largest_group_bytes(spec), (n, live.peak, _largest_group_bytes(spec))
        assert live.peak < total / 2
        peaks[n] = live.peak
        # the reused buffers: one per distinct size in flight (the engine chunk and its HF tensor while verifying)
        assert pools and all(0 < p.peak <= 3 * _largest_group_bytes(spec) for p in pools), [p.peak for p in pools]
        pool_peaks[n] = max(p.peak for p in pools)
        assert len(read_engine_weights(tmp_path / f"ck-{n}")) == 3 + 6 * n
    assert peaks[2] == peaks[8], peaks  # flat with depth: 4x the layers, the same peak
    assert pool_peaks[2] == pool_peaks[8], pool_peaks


def test_export_reads_chunks_never_builds_the_model(tiny_base, tiny_hf, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ellama_recipes.engine.checkpoint import hf_export, parity, read
    from ellama_recipes.workflows.import_export import export_hf

    def no_model(*a, **k):
        raise AssertionError("export instantiated the model")

    monkeypatch.setattr(parity, "load_engine_model", no_model)
    live, wants, read_region = LiveBytes(), [], read.EngineChunks.read

    def tracked(self, key, offsets, sizes, buffers=None):
        wants.append((key, offsets, sizes))
        return live.track(read_region(self, key, offsets, sizes, buffers))

    def no_generic_load(*a, **k):
        raise AssertionError("a one-chunk-per-layer checkpoint went through the generic dcp load")

    monkeypatch.setattr(read.EngineChunks, "read", tracked)
    monkeypatch.setattr(read, "read_chunks", no_generic_load)
    report = export_hf(tiny_base, tmp_path / "hf", progress=False, check_logits=False)
    assert report["logits_checked"] is False and all(t["status"] == "equal" for t in report["tensors"])
    # one layer per read of a layer-stacked key, never the whole stack
    stacked = [(k, s) for k, _, s in wants if ".layers." in k]
    assert stacked and all(s[0] == 1 for _, s in stacked)
    spec = hf_export.plan_export(tiny_base).spec
    # the group being written and the next one, read meanwhile: never more than two groups
    assert 0 < live.peak <= 2 * _largest_group_bytes(spec)
    src, out = load_file(str(tiny_hf / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(src) == set(out) and all(torch.equal(src[k], out[k]) for k in src)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None


def test_export_shards_and_workers(tiny_base, tiny_hf, tmp_path):
    """Several safetensors shards (headers written first, tensors at their offsets from 3 threads) + index."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ellama_recipes.engine.checkpoint.hf_export import export_engine_to_hf

    out = tmp_path / "hf"
    out.mkdir()
    rep = export_engine_to_hf(tiny_base, out, workers=3, shard_bytes=1_000_000)
    assert not rep.bad
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == len(set(index["weight_map"].values())) > 2
    got = {}
    for f in files:
        got.update(load_file(str(f)))
    src = load_file(str(tiny_hf / "model.safetensors"))
    assert set(got) == set(index["weight_map"]) == set(src)
    assert all(torch.equal(src[k], got[k]) for k in src)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.norm.weight"], src["model.norm.weight"])
