"""HF Llama 3.1 -> engine checkpoint, streamed one tensor group at a time, then verified (``ellama import-hf``).

The HF safetensors are read tensor by tensor (:class:`ellama_recipes.io.safetensors.HFWeights`), each group is
converted with the bridge's table (NeMo's ``TransformFns`` for the QKV interleave) and written through the lazy
planner of :mod:`ellama_recipes.engine.checkpoint.write`; every HF tensor is then verified bit-exact in what was
written (:mod:`ellama_recipes.engine.checkpoint.verify`).

What NeMo 2.7.3's own importer gets wrong, and why this module does not use it: under the TE-free layer spec its
mapping leaves the per-layer RMSNorms at 1.0 (only a log line), it reads only ``rope_scaling.factor``, it stages
tokenizers in the shared /tmp/nemo_tokenizer, and it loads the whole model (import peaks at ~3.6x the model's bytes).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import torch

from ellama_recipes.engine import bridge
from ellama_recipes.engine.bridge import Group
from ellama_recipes.engine.checkpoint.verify import Progress, TensorCheck, VerifyReport, verify_groups
from ellama_recipes.engine.checkpoint.write import (
    have_transformer_engine, hf_dtype, write_context, write_engine_weights,
)
from ellama_recipes.errors import UserError
from ellama_recipes.io.safetensors import Buffers, HFWeights
from ellama_recipes.model import architecture


def engine_dtype(g: Group, params_dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine's module holds: params_dtype, except the TE-free RMSNorm (torch.nn.RMSNorm in
    megatron's WrappedTorchNorm), which megatron creates in float32 whatever params_dtype is."""
    if g.row.kind == "norm" and not have_transformer_engine():
        return torch.float32
    return params_dtype


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
    spec = architecture.from_hf(cfg, hf_dir / "config.json")
    hf = HFWeights(hf_dir)
    groups, pre = plan_import(hf, spec)
    if pre.bad:
        raise UserError(
            f"{hf_dir} does not hold exactly the tensors of the Llama its config.json describes "
            f"({spec['num_layers']} layers, hidden {spec['hidden_size']}); importing would drop or misplace "
            "weights. Nothing was written.", problems=pre.problems())
    n_tok = architecture.tokenizer_size(hf_dir)
    if n_tok is not None and n_tok > spec["vocab_size"]:
        raise UserError(
            f"{hf_dir}: the tokenizer has {n_tok} tokens but the model only {spec['vocab_size']} embedding rows "
            "(config.json vocab_size), so ids >= that have no embedding. Fix: resize the embeddings to the "
            "tokenizer (transformers: model.resize_token_embeddings(len(tokenizer)), then save_pretrained) and "
            "import again. Nothing was written.")
    params_dtype = hf_dtype(cfg)
    buffers, held = Buffers(), {}  # held: writer thread -> the buffers of the chunk it is writing

    def make_chunk(g: Group, j: int) -> torch.Tensor:
        # The writer asks for a chunk only after it has written the previous one of the same thread (serial
        # loader, see write_engine_weights), so that chunk's buffers are free again.
        me = threading.get_ident()
        buffers.give(*held.pop(me, ()))
        idx = bridge.engine_chunks(g)[j][2]
        src = [hf.get(g.hf[i], buffers) for i in idx]
        t = bridge.to_engine(g, j, src, spec, engine_dtype(g, params_dtype))
        held[me] = [x for x in src if x.data_ptr() == t.data_ptr()]  # the chunk is the HF tensor itself
        buffers.give(*[x for x in src if x.data_ptr() != t.data_ptr()])
        if progress:
            progress(sum(hf.nbytes(g.hf[i]) for i in idx))
        return t

    try:
        write_engine_weights(out / "weights", spec, groups, make_chunk, lambda g: engine_dtype(g, params_dtype),
                             workers)
        for ts in held.values():
            buffers.give(*ts)
        held.clear()
        write_context(out, hf_dir, cfg, spec)
        rep = verify_groups(out / "weights", hf, spec, groups, "import", workers=workers, progress=verify_progress,
                            buffers=buffers)
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
