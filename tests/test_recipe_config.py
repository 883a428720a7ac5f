"""Config-only tests over every size and precision, and every validation rule with a bad config."""

from __future__ import annotations

import pytest

from ellama_recipes.errors import ConfigError, UserError
from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER
from ellama_recipes.recipes.pretrain import build_config as build_pretrain_config
from ellama_recipes.model.sizes import SIZES, get_size

BASE_LR = {"8b": 3e-4, "70b": 1.5e-4, "405b": 8e-5}
REPOS = {"8b": "meta-llama/Llama-3.1-8B", "70b": "meta-llama/Llama-3.1-70B", "405b": "meta-llama/Llama-3.1-405B"}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("fp8", [False, True])
def test_every_size_and_precision_builds_valid(size, fp8):
    cfg = build_pretrain_config(size, fp8=fp8)
    assert cfg.problems() == []
    s = cfg.summary()
    assert s["precision"] == ("fp8-delayed" if fp8 else ("32" if size == "tiny" else "bf16-mixed"))
    assert s["world_size"] == s["tensor_parallel"] * s["pipeline_parallel"] * s["context_parallel"] * s["data_parallel"]
    assert s["global_batch_size"] % (s["micro_batch_size"] * s["data_parallel"]) == 0
    assert s["lr"] == pytest.approx(0.10 * get_size(size).base_max_lr)
    assert s["min_lr"] == pytest.approx(0.1 * s["lr"])
    assert s["data_manifest"] == MANIFEST_PLACEHOLDER


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_e_llama_defaults_for_real_sizes(size):
    sz = get_size(size)
    assert sz.hf_repo == REPOS[size]
    assert sz.base_max_lr == BASE_LR[size]
    cfg = build_pretrain_config(size)
    s = cfg.summary()
    assert (s["global_batch_size"], s["seq_length"], s["train_steps"]) == (1440, 8192, 85_000)
    assert s["tokens_per_step"] == 1440 * 8192
    assert s["total_tokens"] == 1440 * 8192 * 85_000  # ~1.0T
    assert 0.99e12 < s["total_tokens"] < 1.01e12
    o = s["optimizer"]
    assert (o["betas"], o["weight_decay"], o["clip_grad"], o["distributed_optimizer"]) == ([0.9, 0.95], 0.1, 1.0, True)
    assert s["attention_backend"] == "flash"
    assert s["sequence_parallel"] is True and s["tensor_parallel"] > 1


def test_tiny_is_a_small_llama31():
    a = get_size("tiny").arch
    assert a.hidden_size <= 256 and a.num_layers <= 6
    assert a.num_query_groups < a.num_attention_heads  # GQA
    assert a.rope_scaling_factor == 8.0 and a.low_freq_factor == 1.0 and a.high_freq_factor == 4.0
    assert a.num_parameters() < 5_000_000


def test_parameter_counts_match_llama31():
    assert round(get_size("8b").arch.num_parameters() / 1e9, 2) == 8.03
    assert round(get_size("70b").arch.num_parameters() / 1e9, 2) == 70.55
    assert round(get_size("405b").arch.num_parameters() / 1e9, 1) == 405.9


def test_fp8_current_scaling_and_lr_fraction_knob():
    cfg = build_pretrain_config("8b", fp8=True, fp8_recipe="current", overrides=["schedule.lr_fraction=0.05"])
    assert cfg.summary()["precision"] == "fp8-current"
    assert cfg.schedule.lr == pytest.approx(0.05 * 3e-4)


def _problems(size, *overrides, **kw):
    return build_pretrain_config(size, overrides=list(overrides), **kw).problems()


def _one(problems, needle):
    hits = [p for p in problems if needle in p]
    assert hits, f"expected a problem mentioning {needle!r}, got {problems}"
    return hits[0]


def test_rule_world_size():
    p = _one(_problems("70b", num_nodes=3), "world size 24")
    assert "TP*PP*CP" in p and "Fix" in p


def test_rule_heads_divisible_by_tp():
    p = _one(_problems("8b", "parallel.tensor_parallel=3", num_nodes=3), "num_attention_heads=32 is not divisible by parallel.tensor_parallel=3")
    assert "Fix" in p


def test_rule_kv_heads_vs_tp():
    probs = _problems(
        "tiny", "model.num_attention_heads=12", "model.num_query_groups=4", "parallel.tensor_parallel=6",
        "cluster.gpus_per_node=6", "schedule.global_batch_size=6", "schedule.micro_batch_size=6",
    )
    _one(probs, "num_query_groups=4 (KV heads)")
    assert not any("num_attention_heads=12 is not divisible" in p for p in probs)


def test_rule_layers_divisible_by_pp():
    _one(_problems("70b", "parallel.pipeline_parallel=3", "parallel.virtual_pipeline_parallel=null", num_nodes=30),
         "num_layers=80 is not divisible by parallel.pipeline_parallel=3")


def test_rule_layers_divisible_by_pp_times_vpp():
    _one(_problems("70b", "parallel.virtual_pipeline_parallel=3"), "PP*VPP = 4*3 = 12")


def test_rule_gbs_divisible_by_mbs_times_dp():
    _one(_problems("70b", "schedule.global_batch_size=1000"), "global_batch_size=1000 is not divisible by micro_batch_size*DP = 1*15")


def test_rule_seq_divisible_by_2cp():
    _one(_problems("70b", "schedule.seq_length=8190"), "divisible by 2*CP = 4")


def test_rule_sp_needs_tp():
    _one(_problems("8b", "parallel.tensor_parallel=1", "schedule.global_batch_size=1472"), "sequence_parallel=true needs parallel.tensor_parallel > 1")


def test_rule_sp_seq_divisible_by_tp_times_cp():
    _one(_problems("8b", "schedule.seq_length=8191"), "seq_length=8191 must be divisible by TP*CP = 2*1 = 2")
    _one(_problems("70b", "schedule.seq_length=8196"), "seq_length=8196 must be divisible by TP*CP = 4*2 = 8")


def test_rule_interleaved_micro_batches_divisible_by_pp():
    # 70b: PP4 VPP5 DP15, micro batch 1: 1470 / 15 = 98 micro batches per step, not a multiple of 4
    _one(_problems("70b", "schedule.global_batch_size=1470"), "micro batches per step (98 = global batch")
    assert not any("micro batches per step" in p for p in _problems("70b", "parallel.virtual_pipeline_parallel=null",
                                                                    "schedule.global_batch_size=1470"))


def test_rule_fp8_needs_hopper_at_launch():
    cfg = build_pretrain_config("8b", fp8=True, manifest="/data/manifest.json", restore_from="/ckpt/8b")
    assert cfg.problems() == []  # dry run: fine without a GPU
    _one(cfg.problems(at_launch=True, gpu_capability=None), "Hopper")
    _one(cfg.problems(at_launch=True, gpu_capability=(8, 0)), "sm_80")
    assert cfg.problems(at_launch=True, gpu_capability=(9, 0)) == []
    bf16 = build_pretrain_config("8b", manifest="/data/manifest.json", restore_from="/ckpt/8b")
    assert bf16.problems(at_launch=True, gpu_capability=(8, 0)) == []


def test_missing_manifest_is_a_launch_error_only():
    cfg = build_pretrain_config("tiny")
    assert cfg.problems() == []
    _one(cfg.problems(at_launch=True), "data.manifest is not set")


def test_validate_gathers_every_problem():
    cfg = build_pretrain_config(
        "70b", overrides=["parallel.pipeline_parallel=3", "schedule.seq_length=8190", "parallel.tensor_parallel=3"]
    )
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    assert len(exc.value.problems) >= 3
    text = str(exc.value)
    assert "num_layers=80" in text and "2*CP" in text and "num_attention_heads=64" in text


def test_unknown_override_names_close_matches():
    with pytest.raises(UserError) as exc:
        build_pretrain_config("8b", overrides=["schedule.lr_fractoin=0.2"])
    assert "schedule.lr_fraction" in str(exc.value)


def test_override_typing_errors_are_reported():
    with pytest.raises(UserError) as exc:
        build_pretrain_config("8b", overrides=["parallel.tensor_parallel=two", "precision.mode=fp4", "nokey"])
    msg = str(exc.value)
    assert "expected an integer" in msg and "must be one of" in msg and "not a key=value" in msg


def test_overrides_apply_after_flags():
    cfg = build_pretrain_config("70b", num_nodes=30, overrides=["cluster.num_nodes=60", "parallel.sequence_parallel=false"])
    assert cfg.cluster.num_nodes == 60 and cfg.parallel.sequence_parallel is False


def test_unknown_size_lists_valid_ones():
    with pytest.raises(UserError) as exc:
        get_size("13b")
    assert "tiny, 8b, 70b, 405b" in str(exc.value)


def test_config_round_trips_through_dict():
    from ellama_recipes.recipes.pretrain import PretrainConfig

    cfg = build_pretrain_config("405b", fp8=True)
    again = PretrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_launch_without_from_needs_from_scratch():
    cfg = build_pretrain_config("8b", manifest="/data/manifest.json")
    _one(cfg.problems(at_launch=True, gpu_capability=(9, 0)), "--from is not set")
    scratch = build_pretrain_config("8b", manifest="/data/manifest.json", from_scratch=True)
    assert scratch.problems(at_launch=True, gpu_capability=(9, 0)) == []
    both = build_pretrain_config("8b", manifest="/m.json", from_scratch=True, restore_from="/ckpt")
    _one(both.problems(at_launch=True, gpu_capability=(9, 0)), "contradict")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("parallel.sequence_parallel=true", "parallel.sequence_parallel=true needs CUDA"),
        ("optimizer.distributed_optimizer=true", "optimizer.distributed_optimizer=true needs CUDA"),
        ("parallel.context_parallel=2", "parallel.context_parallel=2 needs CUDA"),
        ("precision.mode=bf16", "precision.mode=bf16 needs a CUDA GPU"),
    ],
)
def test_what_cpu_processes_cannot_run_is_a_launch_problem(override, needle):
    extra = ["parallel.tensor_parallel=2", "cluster.gpus_per_node=2"] if "sequence" in override else []
    if "context" in override:
        extra = ["cluster.gpus_per_node=2"]
    cfg = build_pretrain_config("tiny", manifest="/m.json", restore_from="/ckpt", overrides=[override, *extra])
    assert cfg.problems() == []  # valid config; only this host cannot run it
    _one(cfg.problems(at_launch=True, gpu_capability=None), needle)
    assert not any("needs CUDA" in p or "needs a CUDA" in p for p in cfg.problems(at_launch=True, gpu_capability=(9, 0)))


def test_interleaved_pipeline_runs_on_cpu_processes():
    """PP2 x VPP2 is not refused on a CPU host: it runs there (tests/test_parallel_cpu.py matches it to 1 process)."""
    cfg = build_pretrain_config("tiny", manifest="/m.json", restore_from="/ckpt", overrides=[
        "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2", "cluster.gpus_per_node=2"])
    assert cfg.problems(at_launch=True, gpu_capability=None) == []


def test_gpu_sizes_on_a_cpu_host_are_refused_at_launch():
    cfg = build_pretrain_config("8b", manifest="/m.json", restore_from="/ckpt")
    _one(cfg.problems(at_launch=True, gpu_capability=None), "cluster.cpu_fallback=false")
    slurm = build_pretrain_config("8b", manifest="/m.json", restore_from="/ckpt", executor="slurm")
    assert slurm.problems(at_launch=True, gpu_capability=None) == []  # checked on the compute nodes


def test_tiny_differs_only_by_its_size_row():
    """Everything tiny changes comes from sizes.SIZES["tiny"]: a copy of the row under another name builds the
    same config (nothing is special-cased by the name)."""
    import dataclasses

    from ellama_recipes.model import sizes

    row = dataclasses.replace(sizes.SIZES["tiny"], name="tiny-copy")
    sizes.SIZES["tiny-copy"] = row
    try:
        a, b = build_pretrain_config("tiny").to_dict(), build_pretrain_config("tiny-copy").to_dict()
        assert a.pop("size") == "tiny" and b.pop("size") == "tiny-copy"
        assert a == b
        assert a["precision"]["mode"] == "fp32" and a["cluster"]["cpu_fallback"] is True
    finally:
        del sizes.SIZES["tiny-copy"]


def test_model_overrides_with_from_are_refused(tmp_path):
    with pytest.raises(UserError, match="architecture comes from the --from checkpoint"):
        build_pretrain_config("tiny", restore_from=str(tmp_path), overrides=["model.num_layers=2"])
    # not an architecture field: allowed with --from
    cfg = build_pretrain_config("tiny", restore_from=str(tmp_path), overrides=["model.attention_backend=unfused"])
    assert cfg.model.attention_backend == "unfused"
    # without --from, architecture overrides apply
    assert build_pretrain_config("tiny", overrides=["model.num_layers=2"]).model.num_layers == 2


def test_architecture_is_read_from_the_checkpoint_without_nemo(tmp_path):
    import subprocess
    import sys

    ctx = tmp_path / "ckpt" / "context"
    ctx.mkdir(parents=True)
    (tmp_path / "ckpt" / "weights").mkdir()
    (ctx / "model.yaml").write_text(
        "_target_: nemo.collections.llm.gpt.model.llama.LlamaModel\nconfig:\n  num_layers: 6\n  hidden_size: 64\n"
        "  num_attention_heads: 8\n  num_query_groups: 4\n  rotary_base: 10000.0\n  old_context_len: 128\n"
    )
    code = (
        "import sys; from ellama_recipes.recipes.pretrain import build_config; "
        f"c = build_config('8b', restore_from={str(tmp_path / 'ckpt')!r}); "
        "print(c.model.num_layers, c.model.hidden_size, c.model.num_query_groups, c.model.rope_theta, "
        "c.model.original_max_position_embeddings, 'nemo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "64", "4", "10000.0", "128", "False"]
