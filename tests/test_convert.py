"""HF import / export (streamed, table-driven) on CPU, verified tensor by tensor (issues 4, 5, 8 and 15).

Three Llama-3.1-architecture shapes with randomised RMSNorm weights, each through a different source path:
  tiny  - `ellama import-hf --size tiny` (builds the base itself; in-process CLI)
  deep  - 6 layers, MQA (1 KV group), vocab 3000, other llama3 RoPE factors; through the Hub code path
          (huggingface_hub.snapshot_download against a pre-populated offline cache, in a subprocess), no --size:
          the architecture comes from the source
  wide  - 2 layers, hidden 192, MHA (KV groups = heads), vocab 5120, bfloat16 weights;
          `import_hf(None, ..., source=<local dir>, workers=2)`
then `export_hf` of each (deep with 2 workers), and the export of a 2-step `ellama pretrain` run from the tiny
import. Streaming (memory bounded by one tensor group) is tested in tests/test_convert_stream.py.
Runtime about 4 minutes on 2 cores (session-scoped artifacts, built once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ellama_recipes.cli.main import main
from ellama_recipes.workflows.import_export import export_hf, import_hf, resolve_checkpoint
from ellama_recipes.errors import UserError
from ellama_recipes.model.sizes import SIZES
from ellama_recipes.model.tiny import build_tiny_base

pytestmark = pytest.mark.engine

TINY = SIZES["tiny"].arch
SHAPES = {
    "tiny": TINY,
    "deep": replace(TINY, num_layers=6, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                    num_query_groups=1, vocab_size=3000, rope_scaling_factor=16.0,
                    original_max_position_embeddings=128, rope_theta=10000.0),
    "wide": replace(TINY, num_layers=2, hidden_size=192, ffn_hidden_size=512, num_attention_heads=6,
                    num_query_groups=6, vocab_size=5120, low_freq_factor=2.0, high_freq_factor=8.0),
}
HUB_REPO = "ellama-test/deep-base"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def hf_sources(work) -> dict[str, Path]:
    # seed 0 for tiny: the same weights `import-hf --size tiny` builds for itself
    # wide is stored in bfloat16 like the released Llama 3.1 weights (exercises fp32 local-RMSNorm <-> bf16)
    return {name: build_tiny_base(work / "src" / name, arch=arch, seed=0 if name == "tiny" else 7,
                                  dtype="bfloat16" if name == "wide" else "float32")
            for name, arch in SHAPES.items()}


@pytest.fixture(scope="session")
def hub_cache(work, hf_sources) -> Path:
    """A Hugging Face cache laid out as snapshot_download leaves it (refs/main -> snapshots/<commit>/)."""
    repo = work / "hub" / ("models--" + HUB_REPO.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in hf_sources["deep"].iterdir():
        shutil.copy2(f, snap / f.name)
    return work / "hub"


@pytest.fixture(scope="session")
def imported(work, hf_sources, hub_cache) -> dict[str, Path]:
    out = {}
    # tiny: the CLI builds the base itself
    out["tiny"] = work / "ckpt" / "tiny"
    assert main(["import-hf", "--size", "tiny", "--out", str(out["tiny"]), "--no-progress"]) == 0
    # deep: the Hub path, offline against the prepared cache, exactly as a user would run it
    out["deep"] = work / "ckpt" / "deep"
    # a fresh process: drop the torch.distributed rendezvous vars the in-process import above exported
    drop = ("HF_TOKEN", "HF_HOME", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache))
    proc = subprocess.run(
        [sys.executable, "-m", "ellama_recipes", "import-hf", "--from", HUB_REPO,
         "--out", str(out["deep"]), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # wide: Python API with a local directory
    out["wide"] = import_hf(None, work / "ckpt" / "wide", source=hf_sources["wide"], progress=False, workers=2)
    return out


@pytest.fixture(scope="session")
def exported(work, imported) -> dict[str, tuple[Path, dict]]:
    res = {}
    for name, ckpt in imported.items():
        out = work / "export" / name
        res[name] = (out, export_hf(ckpt, out, progress=False, workers=2 if name == "deep" else 1))
    return res


# ---------------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------------


def test_import_exact_per_tensor_with_randomised_norms(imported, hf_sources):
    from ellama_recipes.engine.checkpoint.read import read_engine_weights

    for name, ckpt in imported.items():
        rep = json.loads((ckpt / "ellama_import.json").read_text())
        hf = _weights(hf_sources[name])
        assert rep["all_equal"] and rep["tensors"] == len(hf), name
        assert {c["hf_name"] for c in rep["checks"]} == set(hf)
        assert all(c["status"] == "equal" for c in rep["checks"])
        # Independent of the report: the RMSNorms (the tensors NeMo 2.7.3 drops on CPU) are the HF values, not 1.0.
        eng = read_engine_weights(ckpt)
        for i in range(SHAPES[name].num_layers):
            e_in = eng.get(f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
                           eng.get(f"decoder.layers.{i}.input_layernorm.weight"))
            h_in = hf[f"model.layers.{i}.input_layernorm.weight"]
            # bf16 HF norms are widened (exactly) into megatron's float32 TE-free RMSNorm
            assert not torch.all(h_in == 1.0) and torch.equal(e_in.to(h_in.dtype), h_in), (name, i)
            assert torch.equal(e_in, h_in.to(e_in.dtype)), (name, i)
        assert torch.equal(eng["decoder.final_layernorm.weight"].to(hf["model.norm.weight"].dtype), hf["model.norm.weight"])
        assert torch.equal(eng["embedding.word_embeddings.weight"][: SHAPES[name].vocab_size],
                           hf["model.embed_tokens.weight"])


def test_import_source_recorded(imported):
    kinds = {n: json.loads((c / "ellama_import.json").read_text())["source"]["kind"] for n, c in imported.items()}
    assert kinds == {"tiny": "built", "deep": "hub", "wide": "local"}


UPSTREAM_IMPORT = """
import json, sys
from pathlib import Path
from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaModel
from ellama_recipes.engine import cpu_compat
from ellama_recipes.engine.checkpoint.write import te_free_overrides
from ellama_recipes.engine.bridge import llama31_config
from ellama_recipes.model.architecture import from_hf as spec_from_hf
src, out, stage = map(Path, sys.argv[1:4])

class CpuConfigImporter(HFLlamaImporter):
    def init(self):
        spec = spec_from_hf(json.loads((src / "config.json").read_text()))
        return LlamaModel(llama31_config(spec, **te_free_overrides()), tokenizer=self.tokenizer)

    def nemo_setup(self, model, trainer=None, *args, **kwargs):  # a synchronous save: no writer process
        return super().nemo_setup(model, trainer, *args, **{**kwargs, "ckpt_async_save": False})

    def save_hf_tokenizer_assets(self, name_or_path, save_path=None):
        return super().save_hf_tokenizer_assets(name_or_path, save_path=str(stage))  # not the shared /tmp

if __name__ == "__main__":
    cpu_compat.apply_conversion_redirects()
    CpuConfigImporter(str(src))(output_path=out, overwrite=False)
"""


def test_upstream_norm_mapping_is_caught(work, hf_sources):
    """NeMo 2.7.3's own importer (its mapping untouched; only its config made TE-free so it runs on CPU) silently
    leaves the RMSNorms at 1.0 under the local layer spec; the verifier must catch that on NeMo's checkpoint.
    In a fresh process: megatron's checkpoint writer keeps a multiprocessing manager alive for the process."""
    from conftest import subprocess_env

    from ellama_recipes.engine.checkpoint.verify import verify_engine_against_hf

    src, out = hf_sources["tiny"], work / "upstream-bug"
    script = work / "upstream_import.py"
    script.write_text(UPSTREAM_IMPORT)
    proc = subprocess.run([sys.executable, str(script), str(src), str(out), str(work / "upstream-tok")],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = "\n".join(verify_engine_against_hf(out, src).problems())
    assert "model.layers.0.input_layernorm.weight" in msg and "post_attention_layernorm" in msg
    assert "values differ" in msg
    assert "q_proj" not in msg and "embed_tokens" not in msg  # what upstream maps right passes the same check


def test_unmapped_hf_tensor_fails_import_and_leaves_nothing(work, hf_sources, capsys):
    from safetensors.torch import save_file

    src = work / "src-extra"
    shutil.copytree(hf_sources["tiny"], src)
    w = _weights(src)
    w["model.layers.1.self_attn.q_proj.bias"] = torch.ones(TINY.hidden_size)
    save_file(w, str(src / "model.safetensors"), metadata={"format": "pt"})
    out_parent = work / "extra-out"
    out_parent.mkdir()
    rc = main(["import-hf", "--size", "tiny", "--from", str(src), "--out", str(out_parent / "ck"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model.layers.1.self_attn.q_proj.bias" in err and "absent from the engine checkpoint (unmapped)" in err
    assert list(out_parent.iterdir()) == []


def test_wrong_size_for_shape_is_user_error(hf_sources, work, capsys):
    rc = main(["import-hf", "--size", "8b", "--from", str(hf_sources["tiny"]), "--out", str(work / "nope")])
    assert rc == 2 and "not a Llama 3.1 8b model" in capsys.readouterr().err
    assert not (work / "nope").exists()


# ---------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------


def test_roundtrip_bit_exact_every_weight(exported, hf_sources):
    for name, (out, report) in exported.items():
        src, dst = _weights(hf_sources[name]), _weights(out)
        assert set(src) == set(dst), name
        for k in src:
            assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), (name, k)
        assert all(t["status"] == "equal" for t in report["tensors"]) and len(report["tensors"]) == len(src)


def test_export_config_and_tokenizer(exported, hf_sources):
    from transformers import AutoTokenizer

    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rope_scaling", "rope_theta", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id")
    for name, (out, _) in exported.items():
        a = json.loads((hf_sources[name] / "config.json").read_text())
        b = json.loads((out / "config.json").read_text())
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, name
        assert b["rope_scaling"]["rope_type"] == "llama3"
        assert (out / "generation_config.json").exists()
        assert (out / "tokenizer.json").read_bytes() == (hf_sources[name] / "tokenizer.json").read_bytes()
        tok = AutoTokenizer.from_pretrained(out)
        assert len(tok) == b["vocab_size"]
        assert tok.chat_template == AutoTokenizer.from_pretrained(hf_sources[name]).chat_template
        assert "<|eot_id|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_logits_match_engine_forward(exported):
    for name, (_, report) in exported.items():
        # float32 on both sides; only GEMM/softmax op order differs (fused QKV/fc1 in megatron)
        assert report["logits_ok"], (name, report["max_logit_diff"])
        assert report["max_logit_diff"] < 1e-4 and report["argmax_agreement"] == 1.0, name


def test_export_loads_and_generates(exported, hf_sources):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported["tiny"]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("Title: wireless earbuds | Review:", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 12
    # the prompt survives the tokenizer round trip, and greedy decoding matches the source model token for token
    assert tok.decode(gen[0], skip_special_tokens=True).startswith("Title: wireless earbuds | Review:")
    src = AutoModelForCausalLM.from_pretrained(hf_sources["tiny"])
    assert torch.equal(gen, src.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id))


def test_export_dryrun_mapping_table(imported, hf_sources, work, capsys):
    report = export_hf(imported["deep"], work / "dry", dryrun=True)
    hf = _weights(hf_sources["deep"])
    rows = report["mapping"]
    assert sorted(r["hf"] for r in rows) == sorted(hf), "each HF tensor exactly once"
    for r in rows:
        assert list(hf[r["hf"]].shape) == r["shape"], r
    assert main(["export-hf", "--from", str(imported["tiny"]), "--out", str(work / "dry2"), "--dryrun"]) == 0
    out = capsys.readouterr().out
    assert "model.norm.weight" in out and "dry run, nothing written" in out
    assert not (work / "dry").exists() and not (work / "dry2").exists()


def _rewrite_weights(src_ckpt: Path, dst: Path, edit) -> Path:
    """Copy a checkpoint and rewrite weights/ with torch DCP after ``edit(state)`` (the planted fault)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    shutil.copytree(src_ckpt / "context", dst / "context")
    reader = dcp.FileSystemReader(str(src_ckpt / "weights"))
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in reader.read_metadata().state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    edit(state)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst / "weights")), no_dist=True)
    for f in ("common.pt", "metadata.json"):
        shutil.copy2(src_ckpt / "weights" / f, dst / "weights" / f)
    return dst


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_planted_fault_fails_export_and_leaves_nothing(imported, work, fault, capsys):
    key = "module.decoder.final_layernorm.weight"

    def edit(state):
        if fault == "missing":
            del state[key]
        else:
            state[key] = torch.ones(TINY.hidden_size + 1)

    bad = _rewrite_weights(imported["tiny"], work / f"bad-{fault}", edit)
    parent = work / f"bad-out-{fault}"
    parent.mkdir()
    rc = main(["export-hf", "--from", str(bad), "--out", str(parent / "hf"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    expected = "decoder.final_layernorm.weight: missing" if fault == "missing" else \
        f"decoder.final_layernorm.weight: shape [{TINY.hidden_size + 1}], expected [{TINY.hidden_size}]"
    assert expected in err, err
    assert list(parent.iterdir()) == []


def test_verifier_reports_dropped_and_altered_tensors(imported, exported, work):
    """The post-export check itself: a converter that drops one tensor and perturbs another is caught."""
    from safetensors.torch import save_file

    from ellama_recipes.engine.checkpoint.hf_export import verify_export_tensors

    out, _ = exported["tiny"]
    broken = work / "broken-export"
    shutil.copytree(out, broken)
    w = _weights(broken)
    del w["model.layers.2.mlp.up_proj.weight"]
    w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"] + 1e-3
    save_file(w, str(broken / "model.safetensors"), metadata={"format": "pt"})
    rep = verify_export_tensors(imported["tiny"], broken)
    probs = "\n".join(rep.problems())
    assert len(rep.bad) == 2
    assert ("model.layers.2.mlp.up_proj.weight <- decoder.layers.2.mlp.linear_fc1.weight: in the engine checkpoint, "
            "absent from the HF weights (dropped)") in probs
    assert "model.layers.0.self_attn.k_proj.weight <- decoder.layers.0.self_attention.linear_qkv.weight" in probs


# ---------------------------------------------------------------------------------------------------------------
# export of a continued-pretraining run (the trainer's RUN/checkpoints/<name>-last layout)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_run(work, imported, hf_sources) -> Path:
    """`ellama pretrain --size tiny --from <imported tiny> --steps 2` on the bundled sample (a fresh process)."""
    import ellama_recipes
    from ellama_recipes.data.pipeline import build

    sample = Path(ellama_recipes.__file__).parent / "sample_data"
    build(domain=[sample / "domain"], general=[sample / "general"], tokenizer=hf_sources["tiny"], out=work / "data",
          progress=False)
    run = work / "run-cpt"
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
    proc = subprocess.run(
        [sys.executable, "-m", "ellama_recipes", "pretrain", "--size", "tiny", "--from", str(imported["tiny"]),
         "--data", str(work / "data" / "manifest.json"), "--out", str(run), "--steps", "2"],
        env={k: v for k, v in os.environ.items() if k not in drop}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return run


def test_export_of_trained_run(trained_run, exported, work, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = work / "export-run"
    assert main(["export-hf", "--from", str(trained_run), "--out", str(out), "--no-progress"]) == 0
    assert "bit-exact" in capsys.readouterr().out
    rep = json.loads((out / "ellama_export.json").read_text())
    assert "/checkpoints/" in rep["checkpoint"]
    assert rep["logits_ok"] and rep["max_logit_diff"] < 1e-4
    assert all(t["status"] == "equal" for t in rep["tensors"])
    cfg = json.loads((out / "config.json").read_text())
    # the base's context length, not the run's training seq_length (256) that NeMo's exporter would write
    assert cfg["max_position_embeddings"] == TINY.max_position_embeddings
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["vocab_size"] == TINY.vocab_size
    base, trained = _weights(exported["tiny"][0]), _weights(out)
    assert set(base) == set(trained)
    assert any(not torch.equal(base[k], trained[k]) for k in base), "training changed no weight?"
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|start_header_id|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("Title: running shoes | Review:", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 10 and tok.decode(gen[0, ids["input_ids"].shape[1]:])


# ---------------------------------------------------------------------------------------------------------------
# checkpoint discovery (trainer layout) and CLI
# ---------------------------------------------------------------------------------------------------------------


def test_run_dir_picks_latest_complete_checkpoint(imported, work):
    run = work / "run"
    ckdir = run / "checkpoints"
    for step in (3, 5, 7, 9):
        shutil.copytree(imported["tiny"], ckdir / f"tiny--reduced_train_loss=1.0-step={step}-consumed_samples=8.0")
    newest = ckdir / "tiny--reduced_train_loss=1.0-step=9-consumed_samples=8.0"
    Path(str(newest) + "-unfinished").touch()  # NeMo's marker: the save of step 9 never finished
    (ckdir / "tiny--reduced_train_loss=1.0-step=7-consumed_samples=8.0" / "weights" / ".metadata").unlink()
    shard = sorted((ckdir / "tiny--reduced_train_loss=1.0-step=5-consumed_samples=8.0" / "weights").glob("*.distcp"))[-1]
    shard.write_bytes(b"")  # a truncated shard
    msgs = []
    got = resolve_checkpoint(run, echo=msgs.append)
    assert got.name.endswith("step=3-consumed_samples=8.0")
    assert len(msgs) == 3 and all("skipping incomplete checkpoint" in m for m in msgs)
    assert any(shard.name in m and "truncated" in m for m in msgs)
    with pytest.raises(UserError, match="partial or corrupt"):
        resolve_checkpoint(newest)


def test_export_of_missing_or_empty_source_is_user_error(work, capsys):
    assert main(["export-hf", "--from", str(work / "does-not-exist"), "--out", str(work / "x")]) == 2
    (work / "empty-run").mkdir()
    assert main(["export-hf", "--from", str(work / "empty-run"), "--out", str(work / "x")]) == 2
    assert main(["export-hf", "--from", str(work / "empty-run"), "--out", str(work / "empty-run")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "No checkpoint under" in err and "already exists" in err


@pytest.mark.parametrize("cmd", ["import-hf", "export-hf"])
def test_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example:" in out and f"ellama {cmd}" in out and "--dryrun" in out


def test_import_dryrun_writes_nothing(work, capsys, monkeypatch):
    out = work / "dry-import"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["import-hf", "--size", "8b", "--out", str(out), "--dryrun"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["source"] == {"kind": "hub", "repo": "meta-llama/Llama-3.1-8B",
                              "allow_patterns": ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"],
                              "token": "HF_TOKEN unset"}
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    assert main(["import-hf", "--size", "8b", "--out", str(out), "--dryrun"]) == 0
    assert json.loads(capsys.readouterr().out)["source"]["token"] == "HF_TOKEN set"
    assert not out.exists()


def test_import_architecture_from_source(hf_sources, imported, work, capsys):
    """`--from DIR` needs no --size: the dry run and the checkpoint carry the source's architecture."""
    from ellama_recipes.model.architecture import from_checkpoint

    assert main(["import-hf", "--from", str(hf_sources["wide"]), "--out", str(work / "dry-wide"), "--dryrun"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["size"] is None and plan["architecture"]["hidden_size"] == SHAPES["wide"].hidden_size
    assert plan["architecture"]["num_key_value_heads"] == SHAPES["wide"].num_query_groups
    for name in ("deep", "wide"):
        assert SHAPES[name] == SIZES["tiny"].arch.__class__(**from_checkpoint(imported[name])), name
    assert main(["import-hf", "--out", str(work / "neither")]) == 2
    assert "needs --from" in capsys.readouterr().err and not (work / "neither").exists()


def test_run_dir_search_is_one_level_deep(tmp_path):
    """A stray checkpoint deep inside an unrelated tree is never picked (only RUN/checkpoints/* and RUN/*)."""
    (tmp_path / "a" / "b" / "ckpt" / "weights").mkdir(parents=True)
    (tmp_path / "a" / "b" / "ckpt" / "context").mkdir()
    with pytest.raises(UserError, match="No checkpoint under"):
        resolve_checkpoint(tmp_path)
