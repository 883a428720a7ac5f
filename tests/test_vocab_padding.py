"""The padded vocabulary (issue 20): one rule, padded rows that take no probability mass, export trimmed to the
tokenizer, a user-extended tokenizer kept, and the one layout that still cannot work refused before launch.

The model: the tiny base (``tiny_hf``, 4,096 tokens) with 5 domain tokens added to its tokenizer and its
embeddings resized with transformers' ``resize_token_embeddings`` -> 4,101 rows, a size no TP > 1 divides
(Llama 3.1's 128,256 + 5 = 128,261 is the same situation). The engine pads it to 4,224 rows at TP1 (4,352 at TP2).

Measured (Dec 4 2026, ``pytest -s tests/test_vocab_padding.py`` prints them): real-column logits padded vs unpadded
max |diff| 0.0; per-token training NLL 9.5e-7 (fp32 reduction order over 4,224 vs 4,101 columns); summed DPO
reference log-probs 0.0 (sums of ~200); probability on padded columns exactly 0; export of the padded import and of
the TP2 run: every tensor bit-exact, transformers' logits within 5.4e-7. Wall time: ~60 s for the fast tests and
the shared fixtures, ~100 s for the parallel one (3 launches + an export) on 2 busy cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_DATA, subprocess_env

from ellama_recipes.model.architecture import padded_vocab_size, tokenizer_size

NEW_TOKENS = [f"<sku_{i}>" for i in range(5)]
EXTENDED = 4096 + len(NEW_TOKENS)


def extend_tokenizer(src: Path, out: Path, tokens: list[str] = NEW_TOKENS, seed: int = 7) -> Path:
    """An HF model whose tokenizer got ``tokens`` and whose embeddings were resized to it (the user's way)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(tokens)
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))  # new rows: sampled around the old rows' mean (transformers' default)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    return out


def import_hf(src: Path, out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "ellama_recipes", "import-hf", "--size", "tiny", "--from", str(src),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def extended_hf(tiny_hf, tmp_path_factory) -> Path:
    return extend_tokenizer(tiny_hf, tmp_path_factory.mktemp("vocab") / "extended_hf")


@pytest.fixture(scope="session")
def extended_base(extended_hf, tmp_path_factory) -> Path:
    return import_hf(extended_hf, tmp_path_factory.mktemp("vocab_base") / "base")


def vocab_rows(ckpt: Path) -> dict[str, list[int]]:
    from ellama_recipes.engine.checkpoint.read import dcp_reader, engine_shapes

    _, meta = dcp_reader(ckpt / "weights")
    shapes = engine_shapes(meta)
    return {k: shapes[k][0] for k in ("embedding.word_embeddings.weight", "output_layer.weight") if k in shapes}


# ----------------------------------------------------------------------------------------------- the one rule
@pytest.mark.parametrize("vocab,tp,padded", [
    (1495, 1, 1536), (1495, 2, 1536), (1495, 4, 1536), (1495, 8, 2048),
    (4101, 1, 4224), (4101, 2, 4352), (4101, 4, 4608),
    (128256, 1, 128256), (128256, 2, 128256), (128256, 4, 128512), (128256, 8, 129024),  # Llama 3.1
    (128261, 1, 128384), (128261, 2, 128512), (128261, 8, 129024),
])
def test_padding_rule_is_nemos_and_megatrons(vocab, tp, padded):
    from types import SimpleNamespace

    from nemo.lightning.base import get_vocab_size

    assert padded_vocab_size(vocab, tp) == padded
    # NeMo 2's own rule (what it applies when a config has no preset vocab_size), divisible_by 128 like GPTConfig
    assert get_vocab_size(SimpleNamespace(tensor_model_parallel_size=tp), vocab, 128) == padded
    assert padded % (128 * tp) == 0 and 0 <= padded - vocab < 128 * tp


def test_dryrun_shows_the_padded_vocabulary(cli, tmp_path):
    r = cli("pretrain", "--size", "tiny", "--from-scratch", "--gpus-per-node", "2", "parallel.tensor_parallel=2",
            "model.vocab_size=1495", "--out", tmp_path / "run", "--dryrun")
    assert r.code == 0, r.err
    assert "vocab 1495 -> padded 1536 at TP2" in r.out
    plan = cli("pretrain", "--size", "8b", "--from-scratch", "model.vocab_size=128261", "--out", tmp_path / "run",
               "--dryrun", "--json", "parallel.tensor_parallel=4").json()
    assert plan["tensor_parallel"] == 4 and plan["vocab_padding"] == "vocab 128261 -> padded 128512 at TP4"


# ----------------------------------------------------------------------------------------------- import / export
def test_extended_tokenizer_imports_padded_and_exports_trimmed(extended_hf, extended_base, cli, tmp_path):
    """import-hf pads the 4,101 rows to 4,224 (zeros; the real rows bit-exact: the importer's own verification),
    export-hf trims them back: the HF checkpoint equals the source tensor for tensor (the 5 new rows included), no
    padded row reaches it, and transformers' logits match the engine's."""
    from safetensors.torch import load_file

    hf_rows = json.loads((extended_hf / "config.json").read_text())["vocab_size"]
    assert tokenizer_size(extended_hf) == EXTENDED == hf_rows
    assert json.loads((extended_base / "ellama_import.json").read_text())["all_equal"] is True
    assert vocab_rows(extended_base) == {"embedding.word_embeddings.weight": [4224, 128],
                                         "output_layer.weight": [4224, 128]}
    out = tmp_path / "hf"
    r = cli("export-hf", "--from", extended_base, "--out", out, "--no-progress")
    assert r.code == 0, r.err
    report = json.loads((out / "ellama_export.json").read_text())
    print(f"export of the padded import: max |logit diff| vs transformers {report['max_logit_diff']:.2e}")
    assert report["logits_checked"] is True and report["logits_ok"] is True
    assert json.loads((out / "config.json").read_text())["vocab_size"] == EXTENDED
    a, b = load_file(extended_hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].equal(b[k]), k
    assert b["model.embed_tokens.weight"].shape[0] == EXTENDED
    assert b["model.embed_tokens.weight"][4096:].abs().sum() > 0  # the new rows, not padding zeros


# ----------------------------------------------------------------------------------------------- no mass on padding
def test_padded_rows_take_no_probability_mass(extended_base):
    """The same checkpoint built padded (4,224 rows, the engine's way) and unpadded (``make_vocab_size_divisible_by=1``:
    4,101 rows, megatron loads the first rows): the real columns' logits, the per-token training loss (megatron's
    vocab-parallel cross entropy, the path pretraining, SFT and DPO take) and the summed DPO reference log-probs
    are the same; the padded columns hold no probability."""
    from nemo.lightning import teardown

    from ellama_recipes.engine.checkpoint import parity
    from ellama_recipes.engine.dpo_loss import sequence_logps
    from ellama_recipes.engine.process_env import in_process_model

    ids = torch.randint(0, EXTENDED, (4, 33), generator=torch.Generator().manual_seed(0))
    ids[:, 5] = torch.arange(4096, 4100)  # the new tokens appear as inputs and targets
    inp, lab = ids[:, :-1], ids[:, 1:]
    got = {}
    for name, over in (("padded", {}), ("unpadded", {"make_vocab_size_divisible_by": 1})):
        with in_process_model():
            model, trainer = parity.load_engine_model(extended_base, **over)
            try:
                got[name] = (parity.engine_logits(model, inp), parity.engine_logits(model, inp, lab))
            finally:
                teardown(trainer, model)
    (lp, nll_p), (lu, nll_u) = got["padded"], got["unpadded"]
    assert lp.shape[-1] == 4224 and lu.shape[-1] == EXTENDED
    assert torch.softmax(lp, -1)[..., EXTENDED:].max().item() == 0.0
    logit_diff = (lp[..., :EXTENDED] - lu).abs().max().item()
    nll_diff = (nll_p - nll_u).abs().max().item()
    mask = torch.ones_like(nll_p)
    mask[:, :8] = 0  # a "prompt"
    ref_p, _ = sequence_logps(nll_p, mask)
    ref_u, _ = sequence_logps(nll_u, mask)
    logp_diff = (ref_p - ref_u).abs().max().item()
    print(f"padded vs unpadded: logits {logit_diff:.2e}, token NLL {nll_diff:.2e} (mean {nll_p.mean():.6f} vs "
          f"{nll_u.mean():.6f}), DPO reference log-probs {logp_diff:.2e} (e.g. {ref_p[0]:.4f} vs {ref_u[0]:.4f})")
    assert logit_diff <= 1e-5
    assert nll_diff <= 1e-5
    assert logp_diff <= 1e-6 * ref_u.abs().max().item()


# ----------------------------------------------------------------------------------------------- refused up front
def test_tokenizer_larger_than_the_embedding_is_refused_before_launch(tiny_base, tiny_inputs, extended_hf, cli,
                                                                      tmp_path):
    """A checkpoint whose tokenizer has more ids than embedding rows cannot train at any TP: pretrain, align (SFT +
    DPO) and sweep say so with the field and the fix, exit 2, before anything starts; import-hf refuses such a
    model too."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad, symlinks=True)
    shutil.copy2(extended_hf / "tokenizer.json", bad / "context" / "nemo_tokenizer" / "tokenizer.json")
    needle = f"model.vocab_size=4096 (the embedding rows of --from {bad}) is smaller than its tokenizer (4101 tokens)"
    runs = {
        "pretrain": ["pretrain", "--size", "tiny", "--from", bad, "--data", tiny_inputs.manifest, "--out",
                     tmp_path / "p", "--steps", "1"],
        "align": ["align", "--size", "tiny", "--from", bad, "--sft", SAMPLE_DATA / "sft", "--dpo",
                  SAMPLE_DATA / "preference", "--out", tmp_path / "a", "--sft-steps", "1", "--dpo-steps", "1"],
        "sweep": ["sweep", "--size", "tiny", "--from", bad, "--data", tiny_inputs.manifest, "--out", tmp_path / "s",
                  "--steps", "1"],
    }
    for name, args in runs.items():
        r = cli(*args)
        text = " ".join(r.err.split())
        assert r.code == 2, (name, r.out[-2000:], r.err[-2000:])
        assert needle in text and "resize_token_embeddings" in text, (name, text[-2000:])
        assert "Traceback" not in r.err
    assert not (tmp_path / "p" / "checkpoints").exists() and not (tmp_path / "s").exists()

    hf = tmp_path / "bad_hf"
    shutil.copytree(tiny_inputs.hf, hf)
    shutil.copy2(extended_hf / "tokenizer.json", hf / "tokenizer.json")
    r = cli("import-hf", "--size", "tiny", "--from", hf, "--out", tmp_path / "bad_base", "--no-progress")
    assert r.code == 2 and "resize_token_embeddings" in " ".join(r.err.split())
    assert not (tmp_path / "bad_base").exists()


# ----------------------------------------------------------------------------------------------- across ranks
STEPS = 3
TOL = 1e-4  # tests/test_parallel_cpu.py's tolerance (train / validation loss, absolute)


def _pretrain(base: Path, manifest: Path, out: Path, nproc: int, *overrides: str):
    from conftest import run_console

    cmd = [sys.executable, "-m", "ellama_recipes", "pretrain", "--size", "tiny", "--gpus-per-node", str(nproc),
           "--from", str(base), "--data", str(manifest), "--out", str(out), "--steps", str(STEPS),
           "schedule.min_lr_ratio=1.0", "schedule.limit_val_batches=1", "checkpoint.save_every=2",
           "checkpoint.keep_last=2", *overrides]
    proc = run_console(cmd, out.parent / f"{out.name}.console.txt", 900)
    assert proc.returncode == 0, proc.console[-4000:]
    return proc


def _losses(run: Path) -> dict[int, dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: {k: v for k, v in r.items() if k in ("train_loss", "val_loss_domain", "val_loss_general")}
            for r in recs}


def _worst(got: dict[int, dict], ref: dict[int, dict], steps) -> float:
    worst = 0.0
    for s in steps:
        assert ref[s].get("train_loss") is not None and got[s].get("train_loss") is not None, (s, got[s], ref[s])
        for k, v in ref[s].items():
            if k in got[s]:
                worst = max(worst, abs(got[s][k] - v))
    return worst


def _checkpoint(run: Path, step: int) -> Path:
    return next(c for c in (run / "checkpoints").iterdir() if f"--step={step}-" in c.name and c.is_dir())


@pytest.mark.slow
@pytest.mark.engine
def test_odd_vocabulary_trains_at_tp2_reshards_and_exports(extended_hf, extended_base, tiny_inputs, cli, tmp_path):
    """The 4,101-token checkpoint, imported once (4,224 rows): 3 steps in one process, the same 3 steps at TP2 x PP2
    (4 processes; padded to 4,352 rows there: 2 TP ranks x 2,176, the embedding on the first pipeline stage and the
    masked output layer on the last) with the same losses; the TP2 x PP2 run's step-2 checkpoint resumed in one
    process (4,352 -> 4,224 rows, optimizer state included) gives step 3's loss again; export-hf of the TP2 run
    has exactly the tokenizer's 4,101 rows, every tensor bit-exact with the checkpoint, transformers' logits equal
    to the engine's, the 5 added tokens' rows preserved."""
    from safetensors.torch import load_file

    single, tp2 = tmp_path / "single", tmp_path / "tp2"
    _pretrain(extended_base, tiny_inputs.manifest, single, 1)
    _pretrain(extended_base, tiny_inputs.manifest, tp2, 4, "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2")
    ref, got = _losses(single), _losses(tp2)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    worst = _worst(got, ref, range(1, STEPS + 1))
    notes = [f"TP2 x PP2 vs single process, vocab {EXTENDED} (padded 4224 / 4352): max |loss diff| {worst:.2e}; train "
             f"losses {[round(got[s]['train_loss'], 6) for s in sorted(got)]} vs "
             f"{[round(ref[s]['train_loss'], 6) for s in sorted(ref)]}"]  # printed at the end (cli reads capsys)
    assert worst <= TOL
    assert vocab_rows(_checkpoint(single, 2))["embedding.word_embeddings.weight"][0] == 4224
    assert vocab_rows(_checkpoint(tp2, 2))["embedding.word_embeddings.weight"][0] == 4352

    # reshard: the TP2 x PP2 step-2 checkpoint (4,352 rows) resumed at TP1 x PP1 (4,224 rows) for step 3
    resumed = tmp_path / "tp2_to_tp1"
    shutil.copytree(tp2, resumed, symlinks=True)
    shutil.rmtree(resumed / "launch", ignore_errors=True)
    for c in list((resumed / "checkpoints").iterdir()):
        if "--step=2-" not in c.name:
            c.unlink() if c.is_symlink() else shutil.rmtree(c)
    proc = _pretrain(extended_base, tiny_inputs.manifest, resumed, 1)
    assert "resuming from checkpoint" in proc.console
    diff = _worst(_losses(resumed), ref, [STEPS])
    notes.append(f"TP2 x PP2 step-2 checkpoint resumed at TP1, step {STEPS}: |loss diff| vs single process {diff:.2e}")
    assert diff <= TOL
    assert vocab_rows(_checkpoint(resumed, STEPS))["embedding.word_embeddings.weight"][0] == 4224

    # export trims to the tokenizer
    out = tmp_path / "hf"
    r = cli("export-hf", "--from", _checkpoint(tp2, STEPS), "--out", out, "--no-progress")
    assert r.code == 0, r.err
    report = json.loads((out / "ellama_export.json").read_text())
    assert report["tensors"] and all(t["status"] == "equal" for t in report["tensors"])
    assert report["logits_checked"] is True and report["logits_ok"] is True
    notes.append(f"export of the TP2 x PP2 run: {len(report['tensors'])} tensors bit-exact, max |logit diff| "
                 f"{report['max_logit_diff']:.2e}")
    print("\n".join(notes))
    w, src = load_file(out / "model.safetensors"), load_file(extended_hf / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == EXTENDED
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert w[k].shape == src[k].shape == (EXTENDED, 128), k
    assert not w["model.layers.0.mlp.down_proj.weight"].equal(src["model.layers.0.mlp.down_proj.weight"])  # trained
    # the added tokens never occur in the data: their embedding rows moved only by weight decay
    new, old = w["model.embed_tokens.weight"][4096:], src["model.embed_tokens.weight"][4096:]
    assert new.abs().sum() > 0 and torch.allclose(new, old, rtol=1e-2, atol=1e-6)
