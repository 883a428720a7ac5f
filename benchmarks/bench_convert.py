"""Benchmark: `ellama import-hf` / `ellama export-hf` (streamed) side by side with NeMo's own HF connectors.

Not a unit test (minutes; NeMo's side needs 1.5-2x the model's bytes). Run under the heavy-work lock::

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_convert.py                    # 1.5B, 2 rounds
    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_convert.py --deep-layers 32 --nemo-deep

It builds (in a child process) a randomly initialised Llama-3-architecture model in bf16 safetensors, 1 GB shards
(default: the 1.5B shape of issue 15: hidden 2048, 16 layers, GQA 32/8, ffn 8192, vocab 128,256, untied; a
word-level tokenizer of 128,256 entries so vocab == tokenizer), written tensor by tensor, then runs every step in a
fresh process whose peak RSS is read from ``wait4`` (ru_maxrss):

- ours:  ``ellama import-hf --from HF`` and ``ellama export-hf --from CKPT`` (both verify every tensor bit-exact
         by reading back what they wrote; export skips the logits check above 1 GiB - it would build the model);
- NeMo:  ``HFLlamaImporter`` / ``HFLlamaExporter`` (NeMo 2.7.3's, what ``llm.import_ckpt`` / ``llm.export_ckpt`` run:
         whole HF model + whole Megatron model, ``apply_transforms``, ``nemo_save`` / ``save_pretrained``) with only
         the CPU fixes the previous ellama import/export had: a TE-free config and the TE-free RMSNorm names, cast to
         and from the float32 local norm (upstream's mapping asserts on the dtype change, or skips the norms);
         NeMo's check nothing;
- base:  a process that only imports NeMo and ellama's engine (the fixed overhead of all four).

Fairness: both sides convert the same model in the same run; ``--rounds`` repeats every step, ours first in odd
rounds and NeMo's first in even ones (import steps, then export steps); each step's output is deleted right after
it, so every step writes new files from the same state. Both exporters read the same checkpoint (our import's).
The HF source is warm in the page cache (just written by the builder), outputs are cold (new files); nothing
drops the page cache. Wall is the median over rounds (min-max shown), peak RSS the largest. This process imports
no torch until every step ran: a child's ru_maxrss starts at its parent's high-water RSS (the kernel carries it
over fork + exec), which put a floor of the parent's ~2.5 GB under every row of the previous version of this bench.

It prints wall time, MB/s of model bytes, peak RSS and RSS / model bytes, then the projection of our peak RSS for
Llama 3.1 8B / 70B / 405B: ``base + k x largest tensor group`` with k measured here, and ``base + buffer_bound``
(the reused read buffers modelled from the code; the README quotes this one).

Measured 2026-11-26 (2-core shared dev machine; this exact command, 2 rounds, ``--workers 1``)::

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_convert.py --deep-layers 32 --nemo-deep --rounds 2

    step                                                  wall s (min-max)    MB/s peak RSS GB RSS/model
    base: python + NeMo + ellama engine imported          10.4 (10.3-10.5)                0.83
    ellama import-hf (16 layers, 3.00 GB)                 19.4 (17.9-21.0)   154.4        1.61      0.54
    NeMo HFLlamaImporter (16 layers, 3.00 GB)             27.9 (26.5-29.2)   107.6        4.53      1.51
    ellama export-hf (16 layers, 3.00 GB)                 19.1 (18.7-19.5)   156.8        1.57      0.52
    NeMo HFLlamaExporter (16 layers, 3.00 GB)             23.7 (22.5-24.9)   126.5        5.18      1.73
    ellama import-hf (32 layers, 4.94 GB)                 21.1 (17.3-24.8)   234.8        1.59      0.32
    NeMo HFLlamaImporter (32 layers, 4.94 GB)             32.6 (30.7-34.4)   151.9        8.17      1.65
    ellama export-hf (32 layers, 4.94 GB)                 23.5 (20.8-26.3)   210.0        1.57      0.32
    NeMo HFLlamaExporter (32 layers, 4.94 GB)             30.8 (26.7-34.9)   160.4        8.45      1.71

    largest tensor group (bf16) of the 16-layer model: 0.525 GB; base RSS 0.83 GB; measured k = 1.48
    buffer model for this shape: 0.706 GB; measured peak - base: 0.779 GB
    projection (ours)   model GB  largest group GB  k x group  buffers
    llama 3.1 8b            16.1              1.05       2.39     2.48
    llama 3.1 70b          141.1              2.10       3.94     5.04
    llama 3.1 405b         811.7              4.20       7.06    12.68
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA = {  # HF config fields: Llama 3.1 8B / 70B / 405B (for the projection)
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8),
    "405b": dict(hidden_size=16384, num_hidden_layers=126, intermediate_size=53248, num_attention_heads=128,
                 num_key_value_heads=8),
}


def spec_for(hidden: int, layers: int, ffn: int, heads: int, groups: int, vocab: int) -> dict:
    from ellama_recipes.model.architecture import from_hf as spec_from_hf

    return spec_from_hf({"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
                         "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": groups,
                         "vocab_size": vocab, "max_position_embeddings": 131072,
                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})


def largest_group_bytes(spec: dict, itemsize: int = 2) -> int:
    import torch

    from ellama_recipes.engine.bridge import expand

    return max(sum(torch.Size(s).numel() for s in g.hf_shapes) * itemsize for g in expand(spec))


def buffer_bound(spec: dict, itemsize: int = 2, slice_bytes: int = 64 << 20) -> int:
    """Bytes ellama's reused read buffers (io.safetensors.Buffers) reach for this shape, modelled on the code: per
    byte size, the most buffers of that size in use at once - while writing, one chunk's HF tensors; while
    verifying or exporting, the group being worked on, the next one (read ahead), one 64 MiB compare slice or one
    whole HF tensor (a strided QKV part) - plus the largest tensor not from the pool (the merged or split QKV)."""
    from collections import Counter

    from ellama_recipes.engine.bridge import engine_chunks, expand

    groups = expand(spec)
    nb = lambda shape, size=itemsize: torch_numel(shape) * size  # noqa: E731
    eng = lambda g: nb(g.engine_shape, 4 if g.row.kind == "norm" else itemsize)  # noqa: E731 - fp32 TE-free norms
    need: Counter = Counter()
    moments = []
    for g in groups:
        for _, _, idx in engine_chunks(g):
            moments.append(Counter(nb(g.hf_shapes[i]) for i in idx))
    for g, nxt in zip(groups, groups[1:] + [None]):
        held = Counter([eng(g)] + ([eng(nxt)] if nxt else []))
        for s in g.hf_shapes:
            moments.append(held + Counter([min(slice_bytes, nb(s)) if g.row.kind != "qkv" else nb(s)]))
    for m in moments:
        for size, n in m.items():
            need[size] = max(need[size], n)
    qkv = max(eng(g) for g in groups if g.row.kind == "qkv")
    return sum(size * n for size, n in need.items()) + qkv


def torch_numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def build_model(out: Path, spec: dict, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 Llama in 1 GB safetensors shards + config + a word-level tokenizer of vocab_size entries."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from ellama_recipes.io.safetensors import SafetensorsShards
    from ellama_recipes.engine.bridge import expand
    from ellama_recipes.model.architecture import to_hf as hf_from_spec

    out.mkdir(parents=True)
    v = spec["vocab_size"]
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, **{f"w{i}": i for i in range(2, v)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|end_of_text|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>").save_pretrained(str(out))
    LlamaConfig(**{**hf_from_spec(spec), "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
                   "initializer_range": 0.02}).save_pretrained(str(out))
    groups = expand(spec)
    shards = SafetensorsShards(out, [(h, s, torch.bfloat16) for g in groups for h, s in zip(g.hf, g.hf_shapes)],
                               shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        for h, s in zip(g.hf, g.hf_shapes):
            t = torch.randn(s, generator=gen) * (0.1 if g.row.kind == "norm" else 0.02) + (1.0 if g.row.kind == "norm" else 0.0)
            shards.write(h, t.to(torch.bfloat16))
    shards.finish()
    return shards.total


NEMO_IMPORT = r"""
import json, sys
from pathlib import Path
from ellama_recipes.engine import cpu_compat
from ellama_recipes.engine.checkpoint.write import te_free_overrides
from ellama_recipes.engine.bridge import llama31_config
from ellama_recipes.model.architecture import from_hf as spec_from_hf
from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaModel, TransformFns
from nemo.lightning import io
import torch
src, out = Path(sys.argv[1]), Path(sys.argv[2])

def cast(dtype):
    def f(weight):
        return weight.to(dtype)
    return f

class CpuImporter(HFLlamaImporter):  # NeMo's importer (HF model load, apply_transforms, nemo_save); CPU fixes only
    def init(self):  # TE-free config
        spec = spec_from_hf(json.loads((src / "config.json").read_text()))
        return LlamaModel(llama31_config(spec, params_dtype=torch.bfloat16, bf16=True, **te_free_overrides()),
                          tokenizer=self.tokenizer)
    def nemo_setup(self, model, trainer=None, *args, **kwargs):  # a synchronous save: no writer process
        return super().nemo_setup(model, trainer, *args, **{**kwargs, "ckpt_async_save": False})
    def save_hf_tokenizer_assets(self, name_or_path, save_path=None):
        return super().save_hf_tokenizer_assets(name_or_path, save_path=str(out) + "-tok")
    def convert_state(self, source, target):  # upstream's mapping with TE-free norm names, cast to fp32 RMSNorm
        m = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
             "model.layers.*.self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
             "model.layers.*.mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
             "lm_head.weight": "output_layer.weight"}
        t = [io.state_transform(source_key=s, target_key=d, fn=cast(torch.float32)) for s, d in [
                ("model.layers.*.input_layernorm.weight", "decoder.layers.*.input_layernorm.weight"),
                ("model.layers.*.post_attention_layernorm.weight", "decoder.layers.*.pre_mlp_layernorm.weight"),
                ("model.norm.weight", "decoder.final_layernorm.weight")]] + [
             io.state_transform(source_key=("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
                                            "model.layers.*.self_attn.v_proj.weight"),
                                target_key="decoder.layers.*.self_attention.linear_qkv.weight", fn=TransformFns.merge_qkv),
             io.state_transform(source_key=("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
                                target_key="decoder.layers.*.mlp.linear_fc1.weight", fn=TransformFns.merge_fc1)]
        return io.apply_transforms(source, target, mapping=m, transforms=t)

if __name__ == "__main__":
    cpu_compat.apply_conversion_redirects()
    CpuImporter(str(src))(output_path=out, overwrite=False)
"""

NEMO_EXPORT = r"""
import sys
from pathlib import Path
from ellama_recipes.engine.checkpoint.parity import load_engine_model, mcore_gpt
from nemo.collections.llm.gpt.model.llama import HFLlamaExporter, TransformFns
from nemo.lightning import io
src, out = Path(sys.argv[1]), Path(sys.argv[2])

def cast(dtype):
    def f(weight):
        return weight.to(dtype)
    return f

class CpuExporter(HFLlamaExporter):  # NeMo's exporter (init, apply_transforms, save_pretrained), TE-free norm names
    def convert_state(self, source, target, source_config=None):
        m = {"decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.self_attn.o_proj.weight",
             "decoder.layers.*.mlp.linear_fc2.weight": "model.layers.*.mlp.down_proj.weight"}
        dt = next(target.parameters()).dtype
        t = [io.state_transform(source_key=s, target_key=d, fn=cast(dt)) for s, d in [
                ("decoder.layers.*.input_layernorm.weight", "model.layers.*.input_layernorm.weight"),
                ("decoder.layers.*.pre_mlp_layernorm.weight", "model.layers.*.post_attention_layernorm.weight"),
                ("decoder.final_layernorm.weight", "model.norm.weight")]] + [
             io.state_transform(source_key="decoder.layers.*.self_attention.linear_qkv.weight",
                                target_key=("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
                                            "model.layers.*.self_attn.v_proj.weight"), fn=TransformFns.split_qkv),
             io.state_transform(source_key="decoder.layers.*.mlp.linear_fc1.weight",
                                target_key=("model.layers.*.mlp.gate_proj.weight", "model.layers.*.mlp.up_proj.weight"),
                                fn=TransformFns.split_fc1),
             io.state_transform(source_key="embedding.word_embeddings.weight", target_key="model.embed_tokens.weight",
                                fn=TransformFns.prune_padding),
             io.state_transform(source_key="output_layer.weight", target_key="lm_head.weight", fn=TransformFns.prune_padding)]
        return io.apply_transforms(source, target, mapping=m, transforms=t)

if __name__ == "__main__":
    ex = CpuExporter(str(src))
    model, trainer = load_engine_model(src)
    target = ex.init(next(mcore_gpt(model).parameters()).dtype)
    ex.convert_state(model, target, model.config).save_pretrained(out, safe_serialization=True)
"""

BASE = "import nemo.collections.llm, ellama_recipes.engine.checkpoint.hf_import, ellama_recipes.engine.checkpoint.hf_export"


def run(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(wall s, peak RSS bytes, returncode) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import threading

    err: list[bytes] = []
    th = threading.Thread(target=lambda: err.append(proc.stderr.read()))
    th.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err[0].decode(errors="replace")[-3000:])
    return wall, ru.ru_maxrss * 1024, proc.returncode


def rm(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(str(p) + "-tok", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--deep-layers", type=int, default=0, help="also run a deeper model (same tensor shapes)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of every step; ours and NeMo's alternate first")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ellama-bench-convert"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-nemo", action="store_true", help="skip NeMo's connectors (1.5-1.7x the model's bytes)")
    ap.add_argument("--nemo-deep", action="store_true", help="NeMo's connectors on the deeper model too")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # the model builder's own process
    args = ap.parse_args()
    if args.build_only:
        print(build_model(args.build_only, spec_for(2048, args.layers, 8192, 32, 8, 128256)))
        return
    # No torch in this process until every step ran: a child's ru_maxrss starts from this process's peak RSS
    # (the kernel carries the forking process's high-water mark over exec), so building the model here would put
    # a floor of its size under every measured peak.

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    py = sys.executable
    shutil.rmtree(args.workdir, ignore_errors=True)
    rows: dict[str, tuple[int, list]] = {}

    def step(name: str, nbytes: int, cmd: list[str], out: Path | None) -> None:
        res = run(cmd, env)
        rows.setdefault(name, (nbytes, []))[1].append(res)
        print(f"  {name}: {res[0]:.1f} s, {res[1] / 1e9:.2f} GB, rc {res[2]}", flush=True)
        if out is not None:
            rm(out)  # every step writes into the same state: its output dir new, the previous one's freed

    for _ in range(args.rounds):
        step("base: python + NeMo + ellama engine imported", 0, [py, "-c", BASE], None)
    depths = [args.layers] + ([args.deep_layers] if args.deep_layers else [])
    for layers in depths:
        d = args.workdir / f"L{layers}"
        built = subprocess.run([py, __file__, "--build-only", str(d / "hf"), "--layers", str(layers)], env=env,
                               check=True, capture_output=True, text=True)
        nbytes = int(built.stdout.split()[-1])  # the source is warm in the page cache (just written)
        (d / "nemo_import.py").write_text(NEMO_IMPORT)  # files, not -c: megatron's writer spawns a manager
        (d / "nemo_export.py").write_text(NEMO_EXPORT)
        tag = f"{layers} layers, {nbytes / 1e9:.2f} GB"
        w = ["--workers", str(args.workers)]
        nemo = not args.no_nemo and (layers == args.layers or args.nemo_deep)
        # the checkpoint both exporters read: our import's (NeMo's importer writes the same format)
        run([py, "-m", "ellama_recipes", "import-hf", "--from", str(d / "hf"), "--out", str(d / "ck"),
             "--no-progress"], env)
        for r in range(args.rounds):
            imports = [(f"ellama import-hf ({tag})", [py, "-m", "ellama_recipes", "import-hf", "--from", str(d / "hf"),
                                                       "--out", str(d / "ck-r"), "--no-progress"] + w, d / "ck-r")]
            exports = [(f"ellama export-hf ({tag})", [py, "-m", "ellama_recipes", "export-hf", "--from", str(d / "ck"),
                                                       "--out", str(d / "hf-out"), "--no-progress"] + w, d / "hf-out")]
            if nemo:
                imports.append((f"NeMo HFLlamaImporter ({tag})", [py, str(d / "nemo_import.py"), str(d / "hf"),
                                                                   str(d / "nemo-ck")], d / "nemo-ck"))
                exports.append((f"NeMo HFLlamaExporter ({tag})", [py, str(d / "nemo_export.py"), str(d / "ck"),
                                                                   str(d / "nemo-hf")], d / "nemo-hf"))
            for name, cmd, out in (imports if r % 2 == 0 else imports[::-1]) + \
                    (exports if r % 2 == 0 else exports[::-1]):
                step(name, nbytes, cmd, out)
        shutil.rmtree(d, ignore_errors=True)
    group = largest_group_bytes(spec_for(2048, args.layers, 8192, 32, 8, 128256))

    print(f"\n{'step':50} {'wall s (min-max)':>19} {'MB/s':>7} {'peak RSS GB':>11} {'RSS/model':>9} rc")
    table = []
    for name, (nbytes, res) in rows.items():
        walls = sorted(r[0] for r in res)
        wall = walls[len(walls) // 2] if len(walls) % 2 else (walls[len(walls) // 2 - 1] + walls[len(walls) // 2]) / 2
        rss = max(r[1] for r in res)
        table.append((name, nbytes, wall, rss))
        spread = f"{wall:6.1f} ({walls[0]:.1f}-{walls[-1]:.1f})"
        mbs = f"{nbytes / 1e6 / wall:7.1f}" if nbytes else f"{'':7}"
        ratio = f"{rss / nbytes:9.2f}" if nbytes else f"{'':9}"
        print(f"{name:50} {spread:>19} {mbs} {rss / 1e9:11.2f} {ratio} {','.join(str(r[2]) for r in res)}")
    base = table[0][3]
    ours = [r for r in table if r[0].startswith("ellama")]
    k = max((r[3] - base) / group for r in ours)
    bound = buffer_bound(spec_for(2048, args.layers, 8192, 32, 8, 128256))
    print(f"\nlargest tensor group (bf16) of the {args.layers}-layer model: {group / 1e9:.3f} GB; base RSS "
          f"{base / 1e9:.2f} GB; measured k = (peak - base) / group = {k:.2f} (workers={args.workers})")
    print(f"buffer model for this shape: {bound / 1e9:.3f} GB; measured peak - base: "
          f"{max(r[3] for r in ours) / 1e9 - base / 1e9:.3f} GB")
    print(f"{'projection (ours)':18} {'model GB':>9} {'largest group GB':>17} {'k x group':>10} {'buffers':>8}")
    for name, h in LLAMA.items():
        spec = spec_for(h["hidden_size"], h["num_hidden_layers"], h["intermediate_size"], h["num_attention_heads"],
                        h["num_key_value_heads"], 128256)
        from ellama_recipes.engine.bridge import expand
        import torch

        model = sum(torch.Size(s).numel() for g in expand(spec) for s in g.hf_shapes) * 2
        g = largest_group_bytes(spec)
        print(f"llama 3.1 {name:8} {model / 1e9:9.1f} {g / 1e9:17.2f} {(base + k * g) / 1e9:10.2f} "
              f"{(base + buffer_bound(spec)) / 1e9:8.2f}")
    print(f"\nhost: {os.cpu_count()} cores; {args.rounds} rounds (wall: median, min-max; peak RSS: the largest "
          f"ru_maxrss); python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
