"""build_pretrain_partial: the llm.pretrain partial for every size and precision, field by field (no GPU, no training).

Runtime: ~25 s (one NeMo import, then config objects only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ellama_recipes.errors import UserError
from ellama_recipes.data.manifest import MANIFEST_PLACEHOLDER
from ellama_recipes.recipes.pretrain import build_config as build_pretrain_config
from ellama_recipes.model.sizes import SIZES

PRECISIONS = [("bf16", None), ("fp8", "delayed"), ("fp8", "current")]


@pytest.fixture(scope="module")
def build_partial():
    """The pretraining recipe's partial builder (what every launch of `ellama pretrain` runs)."""
    from ellama_recipes.recipes import get_recipe

    return get_recipe("pretrain").build_partial


def _cfg(size, mode, recipe, **kw):
    if mode == "fp8":
        return build_pretrain_config(size, fp8=True, fp8_recipe=recipe, **kw)
    return build_pretrain_config(size, **kw)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode,recipe", PRECISIONS)
def test_partial_fields(build_partial, size, mode, recipe):
    from megatron.core.transformer.enums import AttnBackend
    from nemo.collections import llm

    from ellama_recipes.engine.pretrain import pretrain

    cfg = _cfg(size, mode, recipe)
    p = build_partial(cfg)
    assert p.__fn_or_cls__ is pretrain  # prepare_rank(), then llm.pretrain, in every rank
    assert p.run_dir == str(Path(cfg.checkpoint.out_dir).absolute())

    # model: Llama 3.1 with the size's architecture and llama3 RoPE scaling
    mc = p.model.config
    arch = SIZES[size].arch
    assert p.model.__fn_or_cls__ is llm.LlamaModel
    # NeMo's Llama31Config, vocabulary padded per TP by the bridge's rule (engine.vocab.PaddedLlama31Config)
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    assert issubclass(mc.__fn_or_cls__, Llama31Config) and mc.make_vocab_size_divisible_by == 128
    assert (mc.num_layers, mc.hidden_size, mc.ffn_hidden_size) == (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size)
    assert (mc.num_attention_heads, mc.num_query_groups, mc.vocab_size) == (
        arch.num_attention_heads, arch.num_query_groups, arch.vocab_size)
    assert mc.scale_factor == arch.rope_scaling_factor and mc.rotary_base == arch.rope_theta
    assert mc.seq_length == cfg.schedule.seq_length
    assert mc.attention_backend == getattr(AttnBackend, cfg.model.attention_backend)
    if size != "tiny":
        assert mc.attention_backend == AttnBackend.flash

    # parallelism
    st = p.trainer.strategy
    par = SIZES[size].parallelism
    assert st.tensor_model_parallel_size == par.tensor_parallel
    assert st.pipeline_model_parallel_size == par.pipeline_parallel
    assert st.virtual_pipeline_model_parallel_size == par.virtual_pipeline_parallel
    assert st.context_parallel_size == par.context_parallel
    assert st.sequence_parallel == par.sequence_parallel
    assert st.ckpt_async_save is False
    assert st.ddp.use_distributed_optimizer == cfg.optimizer.distributed_optimizer
    if size != "tiny":
        assert st.ddp.use_distributed_optimizer is True
        assert p.trainer.accelerator == "gpu"
        assert p.trainer.devices == cfg.cluster.gpus_per_node and p.trainer.num_nodes == cfg.cluster.num_nodes

    # precision plugin
    plug = p.trainer.plugins
    if size == "tiny" and mode == "bf16":
        assert plug.precision == "32"  # tiny defaults to fp32 (CPU smoke size)
    elif mode == "bf16":
        assert plug.precision == "bf16-mixed" and plug.params_dtype == torch.bfloat16
        assert getattr(plug, "fp8", None) is None
    else:
        assert plug.precision == "bf16-mixed" and plug.fp8 == "hybrid"
        if recipe == "delayed":
            assert plug.fp8_recipe == "delayed" and plug.fp8_amax_history_len == cfg.precision.fp8_amax_history_len
            assert plug.fp8_amax_compute_algo == "max"
        else:
            assert plug.fp8_recipe == "tensorwise" and plug.first_last_layers_bf16 is True

    # optimizer + schedule (e-Llama: 10% of the base max LR, warmup then cosine to min_lr)
    oc, sch = p.optim.config, p.optim.lr_scheduler
    assert oc.optimizer == "adam"
    assert oc.lr == pytest.approx(SIZES[size].base_max_lr * 0.10)
    assert oc.min_lr == pytest.approx(oc.lr * 0.10) and sch.min_lr == pytest.approx(oc.lr * 0.10)
    assert (oc.adam_beta1, oc.adam_beta2, oc.weight_decay, oc.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert oc.bf16 == (mode != "bf16" or size != "tiny")
    assert sch.__fn_or_cls__.__name__ == "CosineAnnealingScheduler"
    assert sch.warmup_steps == SIZES[size].warmup_steps and sch.max_steps == SIZES[size].train_steps
    assert p.trainer.max_steps == SIZES[size].train_steps

    # data: the manifest placeholder when none was given, batch sizes from the size table
    d = p.data
    assert d.manifest == MANIFEST_PLACEHOLDER
    assert (d.global_batch_size, d.micro_batch_size, d.seq_length) == (
        SIZES[size].global_batch_size, SIZES[size].micro_batch_size, SIZES[size].seq_length)
    # per-source validation: limit_val_batches global batches of domain text + as many of general text, in the
    # loader; the trainer runs all of it (an integer limit would be in Lightning's units, not global batches)
    assert d.val_batches_per_side == cfg.schedule.limit_val_batches
    assert p.trainer.limit_val_batches == 1.0

    # checkpoints + resume + metrics
    ck = p.log.ckpt
    assert ck.every_n_train_steps == cfg.checkpoint.save_every and ck.save_last == "link"
    assert ck.save_optim_on_train_end is True
    run_dir = Path(cfg.checkpoint.out_dir).absolute()
    assert p.log.explicit_log_dir == str(run_dir / "logs")
    assert ck.dirpath == str(run_dir / "checkpoints")
    assert p.resume.resume_from_directory == ck.dirpath
    assert p.resume.resume_if_exists is True and p.resume.restore_config is None
    assert p.resume.__fn_or_cls__.__name__ == "SafeAutoResume"
    cbs = [c.__fn_or_cls__.__name__ for c in p.trainer.callbacks]
    assert "MetricsJsonl" in cbs


def test_flags_reach_the_partial(build_partial, tmp_path):
    cfg = build_pretrain_config(
        "8b", num_nodes=2, restore_from=str(tmp_path / "base"), out_dir=str(tmp_path / "run"), train_steps=500,
        save_every=50, overrides=["schedule.lr_fraction=0.05", "schedule.warmup_steps=20", "parallel.context_parallel=2"],
    )
    p = build_partial(cfg)
    assert p.optim.config.lr == pytest.approx(3e-4 * 0.05)
    assert p.optim.lr_scheduler.warmup_steps == 20 and p.optim.lr_scheduler.max_steps == 500
    assert p.trainer.strategy.context_parallel_size == 2 and p.trainer.num_nodes == 2
    assert p.log.ckpt.every_n_train_steps == 50
    assert p.resume.restore_config.path == str(tmp_path / "base")  # tmp_path is absolute already
    assert p.resume.restore_config.load_optim_state is False
    assert p.data.tokenizer_from == str(tmp_path / "base")


def test_partial_serializes_for_executors(build_partial):
    """NeMo-Run executors ship the partial as zlib-JSON: it must round-trip."""
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    p = build_partial(build_pretrain_config("70b", fp8=True))
    ser = ZlibJSONSerializer()
    back = ser.deserialize(ser.serialize(p))
    assert back.trainer.strategy.virtual_pipeline_model_parallel_size == 5
    assert back.trainer.plugins.fp8_recipe == "delayed"
    assert back.optim.config.lr == pytest.approx(1.5e-5)


def test_manifest_errors_are_user_errors(tmp_path):
    from ellama_recipes.data.manifest import load_manifest

    with pytest.raises(UserError, match="No data manifest"):
        load_manifest(MANIFEST_PLACEHOLDER)
    with pytest.raises(UserError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(bad)
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"blend": [0.5, "a", 0.5, "b"], "sources": [{"prefix": "a", "side": "domain"}]}))
    with pytest.raises(UserError) as ei:
        load_manifest(m)
    msg = str(ei.value)
    assert "a.bin is missing" in msg and "b.idx is missing" in msg and "'b' has no entry in `sources`" in msg


def test_cpu_partial_is_what_every_rank_runs(build_partial):
    """On a host without CUDA a cpu_fallback size builds the CPU partial itself (what the dry run shows and what
    every torchrun rank deserializes); a GPU size, or any size for Slurm, keeps the GPU partial."""
    from ellama_recipes.engine import cpu_compat

    cpu_host = not torch.cuda.is_available()
    p = build_partial(build_pretrain_config("tiny", gpus_per_node=2, overrides=["parallel.tensor_parallel=2"]))
    mc = p.model.config
    assert (p.trainer.accelerator == "cpu") is cpu_host
    assert p.trainer.devices == 2 and p.trainer.strategy.tensor_model_parallel_size == 2
    if cpu_host:
        assert all(getattr(mc, name) is False for name in cpu_compat._TE_FUSIONS)
        assert mc.use_cpu_initialization is True and mc.data_step_fn is cpu_compat.cpu_gpt_data_step
    for cfg in (build_pretrain_config("8b"), build_pretrain_config("tiny", executor="slurm")):
        g = build_partial(cfg)
        assert g.trainer.accelerator == "gpu"
        assert getattr(g.model.config, "use_cpu_initialization", False) is False


def test_cpu_grad_clipping_really_clips():
    """The recipe's clip_grad=1.0 stays effective on CPU: after the redirects, megatron's clip helpers compute
    the global L2 norm over the process group and scale the gradients down to max_norm."""
    import os

    import torch.distributed as dist

    from ellama_recipes.engine import cpu_compat

    cpu_compat.apply_training_redirects()
    from megatron.core.optimizer import optimizer as mo

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])  # global norm 5
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        norm = mo.get_grad_norm_fp32([p.grad for p in params])
        if torch.cuda.is_available():
            norm = float(norm)
        assert norm == pytest.approx(5.0)
        mo.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
        total = torch.sqrt(sum((p.grad**2).sum() for p in params))
        assert total.item() == pytest.approx(1.0, rel=1e-4)
        assert params[1].grad[1].item() == pytest.approx(0.8, rel=1e-4)
    finally:
        if own:
            dist.destroy_process_group()


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["parallel.tensor_parallel=3", "cluster.gpus_per_node=3", "schedule.global_batch_size=6"],
         "not divisible by parallel.tensor_parallel=3"),
        (["parallel.tensor_parallel=4", "cluster.gpus_per_node=4", "schedule.global_batch_size=8"],
         "num_query_groups=2 (KV heads) is not divisible"),
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor_parallel > 1"),
    ],
)
def test_parallel_rules_match_what_megatron_core_refuses(overrides, needle):
    """Each rule validate() applies is one megatron-core's own TransformerConfig enforces in every rank: the config
    refused here would fail there (and a config accepted here is accepted there)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    def megatron(cfg):
        m, p = cfg.model, cfg.parallel
        return TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            tensor_model_parallel_size=p.tensor_parallel, pipeline_model_parallel_size=p.pipeline_parallel,
            sequence_parallel=p.sequence_parallel, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        )

    bad = build_pretrain_config("tiny", overrides=overrides)
    assert any(needle in p for p in bad.problems()), bad.problems()
    with pytest.raises(ValueError):
        megatron(bad)
    good = build_pretrain_config("tiny", gpus_per_node=2, overrides=["parallel.tensor_parallel=2"])
    assert good.problems() == []
    megatron(good)


def test_global_batch_rule_matches_megatron_core():
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator

    bad = build_pretrain_config("tiny", gpus_per_node=2, overrides=["schedule.global_batch_size=10"])
    assert any("global_batch_size=10 is not divisible by micro_batch_size*DP = 2*2" in p for p in bad.problems())
    with pytest.raises(AssertionError):
        ConstantNumMicroBatchesCalculator(10, 2, 2, False, 0)
    ConstantNumMicroBatchesCalculator(8, 2, 2, False, 0)  # the tiny default at DP2 is accepted
