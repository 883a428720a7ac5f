"""validate()'s parallelism and batch rules, checked against what megatron-core 0.15.3 / NeMo 2.7.3 accept.

Issue 13 ("Also"): for each rule, show that the launched run fails the same way without it. Each test below
  1. builds the violating config with the real recipe (``build_config``, not validated) and checks that our
     ``problems()`` names the rule (``_our_rule``), then
  2. runs the library code a launched rank runs, with the numbers of that config, and asserts the library's OWN
     error (message and, where it is generic, the function that raised it). If megatron / NeMo stopped checking,
     the ``pytest.raises`` / the spawned outcome no longer matches and the test fails: then the rule is either
     dead (remove it) or guards a silent mis-handling (prove that instead).

Where a check is plain arithmetic on the config, it runs in this process on the objects a rank builds:
``MegatronStrategy`` from ``engine.pretrain.trainer(cfg)``, ``llm.LlamaModel(Llama31Config)`` from
``engine.blocks.model_config(cfg)``, ``MegatronStrategy.connect(model)`` (NeMo's
``set_model_parallel_attributes`` + ``TransformerConfig.__post_init__``), NeMo's ``init_parallel_ranks`` and
``MegatronDataSampler.setup``. Where a check needs process groups of size 2 (context parallel, sequence parallel,
the interleaved pipeline, ``initialize_model_parallel``, the GQA attention), the megatron code runs in two CPU
processes over gloo, spawned once for all of them (``spawned`` fixture, ~25 s).

Rule (TrainConfig.problems / SFT)      library code that rejects it (0.15.3 / 2.7.3)
-------------------------------------  ------------------------------------------------------------------------
world size % (TP*PP*CP)                nemo.lightning.megatron_init.fake_initialize_model_parallel (AssertionError),
                                       via _strategy_lib.init_parallel_ranks in MegatronStrategy.setup_distributed;
                                       then megatron parallel_state.initialize_model_parallel (RuntimeError)
heads % TP                             TransformerConfig.__post_init__ (ValueError), via MegatronStrategy.connect
KV heads (query groups) % TP           TransformerConfig.__post_init__ (ValueError), via MegatronStrategy.connect
heads % query groups                   nothing checks it: SelfAttention.get_query_key_value_tensors crashes in a
                                       tensor .view() on the first forward (RuntimeError)
layers % PP                            transformer_block.get_num_layers_to_build (AssertionError)
layers % (PP*VPP)                      transformer_block.get_num_layers_to_build (AssertionError)
VPP needs PP > 1                       parallel_state.initialize_model_parallel (RuntimeError)
global batch % (micro batch * DP)      num_microbatches_calculator.ConstantNumMicroBatchesCalculator (AssertionError),
                                       via MegatronDataSampler.setup -> nemo.lightning.data.setup_microbatch_calculator
seq % (2*CP)                           megatron.core.utils.get_batch_on_this_cp_rank (.view() RuntimeError), the data
                                       step of every rank (NeMo's gpt_data_step and our cpu_gpt_data_step)
sequence parallel needs TP > 1         ModelParallelConfig.__post_init__ (ValueError), via MegatronStrategy.connect
sequence parallel: seq % (TP*CP)       tensor_parallel.mappings._reduce_scatter_along_first_dim (AssertionError), in
                                       LanguageModelEmbedding.forward
interleaved pipeline: micro batches    schedules.forward_backward_pipelining_with_interleaving (RuntimeError)
per step % PP (was SFT-only; every stage runs this schedule, so it is a TrainConfig rule now)

At launch on CPU processes (no CUDA):
sequence parallel                      the TE-free layer spec CPU ranks build: torch_norm.WrappedTorchNorm
                                       ("sequence parallel not supported by torch LayerNorm"); gloo itself would
                                       run the reduce-scatter
context parallel                       the TE-free core attention: dot_product_attention.DotProductAttention
                                       ("Context parallelism is only supported by TEDotProductAttention!")
distributed optimizer, bf16            optimizer.MixedPrecisionOptimizer.__init__ allocates on device='cuda', after
                                       every CPU redirect (fp32 + the plain optimizer, the control, take a DDP step)
(virtual pipeline on CPU processes is not a megatron check: tests/test_parallel_cpu.py measures it)

sequence parallel: the gloo pair proves the TP split with CP=1; the CP factor follows from the data step, which
cuts each rank's sequence to seq / CP before the embedding splits it across TP. No rule was found that megatron /
NeMo do not need; none was removed. heads % query groups is the one megatron never checks (it crashes instead).
No `ellama pretrain` launch here: validate() runs before the launch and cannot be bypassed across processes; the
gloo pair runs the same megatron functions a launched rank runs.

Runtime: ~40 s on 2 cores (NeMo import ~10-20 s, shared with the other engine tests in one session; spawn ~25 s):
``.venv/bin/pytest -q tests/test_rules_vs_megatron.py``.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch

from ellama_recipes.recipes.pretrain import build_config as build_pretrain_config
from ellama_recipes.recipes.sft import build_config as build_sft_config

pytestmark = [pytest.mark.engine]

SPAWN_TIMEOUT_S = 180
CUDA = torch.cuda.is_available()

# The violating configs: tiny (CPU processes, the CPU model config), each breaking one rule.
WORLD = ("parallel.tensor_parallel=2", "cluster.gpus_per_node=3")
HEADS_TP = ("parallel.tensor_parallel=3", "cluster.gpus_per_node=3")  # 4 heads, 2 KV heads
KV_TP = ("parallel.tensor_parallel=4", "cluster.gpus_per_node=4")  # 4 heads ok, 2 KV heads not
GQA = ("model.num_query_groups=3",)  # 4 heads, 3 KV heads, TP1
LAYERS_PP = ("parallel.pipeline_parallel=3", "cluster.gpus_per_node=3")  # 4 layers
LAYERS_VPP = ("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=4", "cluster.gpus_per_node=2")
VPP_NO_PP = ("parallel.virtual_pipeline_parallel=2", "cluster.gpus_per_node=2")
GBS = ("cluster.gpus_per_node=2", "schedule.micro_batch_size=3", "schedule.global_batch_size=8")  # DP 2
CP_SEQ = ("parallel.context_parallel=2", "cluster.gpus_per_node=2", "schedule.seq_length=254")
SP_NO_TP = ("parallel.sequence_parallel=true",)
SP_SEQ = ("parallel.tensor_parallel=2", "cluster.gpus_per_node=2", "parallel.sequence_parallel=true",
          "schedule.seq_length=255")
DIST_OPT = ("optimizer.distributed_optimizer=true", "cluster.gpus_per_node=2")  # DP 2; tiny default: false
BF16 = ("precision.mode=bf16", "cluster.gpus_per_node=2")  # tiny default: fp32
VPP_MICRO = ("parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2", "cluster.gpus_per_node=2",
             "schedule.micro_batch_size=2", "schedule.global_batch_size=6")  # DP 1: 3 micro batches per step


def _cfg(*overrides: str, stage: str = "pretrain"):
    build = build_pretrain_config if stage == "pretrain" else build_sft_config
    return build("tiny", overrides=list(overrides))


def _our_rule(cfg, needle: str) -> str:
    """Our validate() reports the rule (and the config is otherwise valid enough to reach the library check)."""
    hits = [p for p in cfg.problems() if needle in p]
    assert hits, f"validate() does not report {needle!r}: {cfg.problems()}"
    return hits[0]


# ----------------------------------------------------------------------------- in-process rank objects
@pytest.fixture(scope="module")
def rank():
    """What a launched rank builds from the partial: the strategy and the model, from our engine functions."""
    import fiddle as fdl
    from nemo.collections import llm

    from ellama_recipes.engine import blocks, pretrain

    class Rank:
        @staticmethod
        def strategy(cfg):
            return fdl.build(pretrain.trainer(cfg).strategy)

        @staticmethod
        def optimizer(cfg):
            return fdl.build(blocks.optimizer(cfg))

        @staticmethod
        def connect(cfg):
            """MegatronStrategy.connect(model): copies the parallelism onto the model's TransformerConfig and
            re-runs its __post_init__ (nemo.lightning._strategy_lib.set_model_parallel_attributes)."""
            model = llm.LlamaModel(config=fdl.build(blocks.model_config(cfg)))
            Rank.strategy(cfg).connect(model)
            return model.config

    return Rank


@pytest.fixture
def app_state():
    """NeMo's AppState singleton, restored afterwards (init_parallel_ranks writes into it before it checks)."""
    from nemo.utils import AppState

    state = AppState()
    saved = dict(vars(state))
    yield state
    vars(state).clear()
    vars(state).update(saved)


# ----------------------------------------------------------------------------- spawned gloo pair
def _outcome(fn) -> dict:
    try:
        fn()
    except Exception as exc:  # the library's own error is the result
        frames = [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_tb(exc.__traceback__)]
        return {"type": type(exc).__name__, "message": str(exc), "where": frames}
    return {"type": None, "message": "", "where": []}


def _rank_main(rank: int, port: int, out: str, sc: dict) -> None:
    """One of two CPU processes over gloo. Runs megatron-core code with the numbers of each violating config;
    every check below raises before any collective, on both ranks alike, so no rank waits on the other."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ellama_recipes.engine import cpu_compat

    res: dict[str, dict] = {}

    def run_with(name, fn, **mp):
        ps.destroy_model_parallel()
        res[name] = _outcome(lambda: (ps.initialize_model_parallel(**mp), fn()))
        ps.destroy_model_parallel()

    # world size: megatron's own arithmetic (world 2, model parallel size 3)
    s = sc["world"]
    res["world"] = _outcome(lambda: ps.initialize_model_parallel(**s["mp"]))
    ps.destroy_model_parallel()

    # VPP without PP
    s = sc["vpp_no_pp"]
    res["vpp_no_pp"] = _outcome(lambda: ps.initialize_model_parallel(**s["mp"]))
    ps.destroy_model_parallel()

    # seq % 2CP: the data step's context-parallel slicing (and the same call with a seq that divides)
    from megatron.core.utils import get_batch_on_this_cp_rank

    s = sc["cp_seq"]

    def cp_slice(seq):
        t = torch.arange(s["mbs"] * seq).view(s["mbs"], seq)
        batch = {"tokens": t, "labels": t.clone(), "loss_mask": torch.ones_like(t, dtype=torch.float),
                 "position_ids": t.clone(), "attention_mask": None}
        return get_batch_on_this_cp_rank(batch)

    run_with("cp_seq", lambda: cp_slice(s["seq"]), **s["mp"])
    run_with("cp_seq_ok", lambda: cp_slice(s["seq_ok"]), **s["mp"])

    # sequence parallel: seq % TP, in the embedding's reduce-scatter
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    s = sc["sp_seq"]

    def sp_embed():
        emb = LanguageModelEmbedding(config=TransformerConfig(**s["tc"]), vocab_size=s["vocab"],
                                     max_sequence_length=s["seq"], position_embedding_type="rope")
        ids = torch.arange(s["mbs"] * s["seq"]).view(s["mbs"], s["seq"]) % s["vocab"]
        return emb(ids, None)

    run_with("sp_seq", sp_embed, **s["mp"])

    # heads % query groups: the local-spec self attention's first forward
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    s = sc["gqa"]

    def attention_forward():
        attn = build_module(get_gpt_layer_local_spec().submodules.self_attention,
                            config=TransformerConfig(**s["tc"]), layer_number=1)
        return attn(torch.randn(8, s["mbs"], s["tc"]["hidden_size"]), attention_mask=None)

    run_with("gqa", attention_forward, **s["mp"])

    # interleaved pipeline: micro batches per step % PP
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_with_interleaving

    s = sc["vpp_micro"]
    cpu_compat.redirect_schedule_buffers()  # what every CPU rank applies (the schedule allocates on "cuda")

    def interleaved_step():
        config = ModelParallelConfig(**s["mpc"])
        chunks = [torch.nn.Linear(2, 2) for _ in range(s["mpc"]["virtual_pipeline_model_parallel_size"])]
        for c in chunks:
            c.config = config

        def forward_step(*_a, **_k):  # never reached when megatron rejects the schedule up front
            raise RuntimeError("forward step reached")

        return forward_backward_pipelining_with_interleaving(
            forward_step_func=forward_step, data_iterator=[iter(()) for _ in chunks], model=chunks,
            num_microbatches=s["num_microbatches"], seq_length=s["seq"], micro_batch_size=s["mbs"])

    run_with("vpp_micro", interleaved_step, **s["mp"])

    # CPU processes: megatron's distributed optimizer, after every redirect a CPU rank applies; the same step with
    # the engine's non-distributed optimizer (the tiny default) is the control
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    s = sc["dist_opt"]
    cpu_compat.prepare_cpu_process()

    def optimizer_step(ddp_config, opt_config):
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)  # NeMo's seed setup, redirected
        tc = TransformerConfig(**s["tc"])
        model = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=s["vocab"], max_sequence_length=s["seq"], position_embedding_type="rope")
        if opt_config.bf16:  # bf16-mixed: the precision plugin hands megatron bf16 parameters
            model = model.bfloat16()
        ddp = DistributedDataParallel(tc, ddp_config, model)
        opt = get_megatron_optimizer(opt_config, [ddp])
        ids = torch.arange(s["mbs"] * s["seq"]).view(s["mbs"], s["seq"]) % s["vocab"]
        mask = torch.ones(1, 1, s["seq"], s["seq"]).tril() < 0.5
        ddp(ids, ids, attention_mask=mask, labels=ids).mean().backward()
        ddp.finish_grad_sync()
        assert opt.step()[0], "optimizer step not taken"

    run_with("dist_opt_off", lambda: optimizer_step(*s["off"]), **s["mp"])
    run_with("dist_opt", lambda: optimizer_step(*s["on"]), **s["mp"])
    run_with("bf16", lambda: optimizer_step(*s["bf16"]), **s["mp"])

    Path(out, f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


def _tc(cfg, **extra) -> dict:
    """megatron TransformerConfig kwargs for the tiny architecture of ``cfg`` (CPU weights, TE-free)."""
    m, p = cfg.model, cfg.parallel
    return dict(num_layers=1, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                tensor_model_parallel_size=p.tensor_parallel, sequence_parallel=p.sequence_parallel,
                use_cpu_initialization=True, **extra)


def _mp(cfg) -> dict:
    p = cfg.parallel
    return dict(tensor_model_parallel_size=p.tensor_parallel, pipeline_model_parallel_size=p.pipeline_parallel,
                virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
                context_parallel_size=p.context_parallel)


@pytest.fixture(scope="module")
def spawned(rank, tmp_path_factory) -> dict[str, dict]:
    """Run every process-group scenario once in a gloo pair; {scenario: rank 0's outcome} (rank 1 must agree)."""
    import torch
    import torch.multiprocessing as mp
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator

    cp, sp, gqa, vpp = _cfg(*CP_SEQ), _cfg(*SP_SEQ), _cfg(*GQA), _cfg(*VPP_MICRO, stage="sft")
    par = rank.strategy(vpp).parallelism  # what NeMo hands megatron (microbatch_group_size_per_vp_stage = PP)
    dp = vpp.data_parallel
    micro = ConstantNumMicroBatchesCalculator(vpp.schedule.global_batch_size, vpp.schedule.micro_batch_size, dp,
                                              False, 0).get()
    sc = {
        # world 2 here; the model-parallel size 3 does not divide it (the tiny config's TP2 on 3 ranks, scaled)
        "world": {"mp": dict(tensor_model_parallel_size=3)},
        "vpp_no_pp": {"mp": _mp(_cfg(*VPP_NO_PP))},
        "cp_seq": {"mp": _mp(cp), "seq": cp.schedule.seq_length, "seq_ok": cp.schedule.seq_length + 2,
                   "mbs": cp.schedule.micro_batch_size},
        "sp_seq": {"mp": _mp(sp), "tc": _tc(sp), "seq": sp.schedule.seq_length, "vocab": sp.model.vocab_size,
                   "mbs": sp.schedule.micro_batch_size},
        "gqa": {"mp": _mp(gqa), "tc": _tc(gqa), "mbs": gqa.schedule.micro_batch_size},
        "vpp_micro": {
            "mp": _mp(vpp), "seq": vpp.schedule.seq_length, "mbs": vpp.schedule.micro_batch_size,
            "num_microbatches": micro,
            "mpc": dict(pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
                        microbatch_group_size_per_vp_stage=par.microbatch_group_size_per_vp_stage,
                        pipeline_dtype=torch.float32),
        },
    }
    on, off = _cfg(*DIST_OPT), _cfg(*DIST_OPT[1:])
    assert not off.optimizer.distributed_optimizer

    def engine_configs(cfg):  # the DDP config of the engine's MegatronStrategy, its megatron OptimizerConfig
        return rank.strategy(cfg).ddp_config, rank.optimizer(cfg).config

    sc["dist_opt"] = {"mp": _mp(on), "tc": _tc(on, normalization="RMSNorm", gated_linear_unit=True,
                                              add_bias_linear=False),
                      "vocab": on.model.vocab_size, "seq": 16, "mbs": on.schedule.micro_batch_size,
                      "on": engine_configs(on), "off": engine_configs(off),
                      "bf16": engine_configs(_cfg(*BF16))}
    out = tmp_path_factory.mktemp("gloo_pair")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_main, args=(port, str(out), sc), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"the gloo pair did not finish in {SPAWN_TIMEOUT_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(10)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in r0:
        assert (r0[name]["type"], r0[name]["where"]) == (r1[name]["type"], r1[name]["where"]), name
    return r0


def _rejected(outcome: dict, exc_type: str, message: str, where: str) -> None:
    assert outcome["type"] == exc_type and message in outcome["message"], outcome
    assert where in outcome["where"], outcome


# ----------------------------------------------------------------------------- the rules
def test_world_size_divisible_by_tp_pp_cp(rank, app_state, spawned):
    """Rule: world size = TP*PP*CP*DP. Without it the rank fails in NeMo's init_parallel_ranks (called by
    MegatronStrategy.setup_distributed before any model is built), and megatron itself checks it again."""
    from nemo.lightning._strategy_lib import init_parallel_ranks

    cfg = _cfg(*WORLD)
    _our_rule(cfg, "world size 3 (cluster.num_nodes=1 x cluster.gpus_per_node=3) is not divisible by TP*PP*CP")
    with pytest.raises(AssertionError, match=r"world_size: 3 must be divisible by total world_size"):
        init_parallel_ranks(cfg.cluster.world_size, 0, 0, rank.strategy(cfg).parallelism)
    _rejected(spawned["world"], "RuntimeError", "world_size (2) is not divisible by 3",
              "parallel_state.py:initialize_model_parallel")


def test_heads_divisible_by_tp(rank):
    cfg = _cfg(*HEADS_TP)
    _our_rule(cfg, "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel=3")
    with pytest.raises(ValueError,
                       match=r"num_attention_heads \(4\) must be a multiple of tensor_model_parallel_size \(3\)"):
        rank.connect(cfg)


def test_kv_heads_divisible_by_tp(rank):
    """Rule: KV heads % TP (megatron splits KV heads across TP ranks, no replication)."""
    cfg = _cfg(*KV_TP)
    _our_rule(cfg, "model.num_query_groups=2 (KV heads) is not divisible by parallel.tensor_parallel=4")
    assert not any("num_attention_heads=4 is not divisible" in p for p in cfg.problems())  # only the KV rule
    with pytest.raises(ValueError,
                       match=r"num_query_groups \(2\) must be a multiple of tensor_model_parallel_size \(4\)"):
        rank.connect(cfg)


def test_heads_divisible_by_query_groups(rank, spawned):
    """Rule: heads % KV heads (GQA needs whole groups). megatron has no check: the config is accepted
    (MegatronStrategy.connect passes) and the first attention forward crashes in a reshape."""
    cfg = _cfg(*GQA)
    _our_rule(cfg, "model.num_attention_heads=4 is not divisible by model.num_query_groups=3")
    rank.connect(cfg)  # accepted: nothing upstream checks it before the forward
    _rejected(spawned["gqa"], "RuntimeError", "is invalid for input of size",
              "attention.py:get_query_key_value_tensors")


def test_layers_divisible_by_pp(rank):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    cfg = _cfg(*LAYERS_PP)
    _our_rule(cfg, "model.num_layers=4 is not divisible by parallel.pipeline_parallel=3")
    config = rank.connect(cfg)  # accepted by the configs; the layer split is checked when the block is built
    with pytest.raises(AssertionError, match="num_layers should be divisible by pipeline_model_parallel_size"):
        get_num_layers_to_build(config, pp_rank=0)


def test_layers_divisible_by_pp_times_vpp(rank):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    cfg = _cfg(*LAYERS_VPP)
    _our_rule(cfg, "model.num_layers=4 is not divisible by PP*VPP = 2*4 = 8")
    config = rank.connect(cfg)
    with pytest.raises(AssertionError, match=r"num_layers_per_pipeline_rank 2\s+should be divisible by vp_size 4"):
        get_num_layers_to_build(config, vp_stage=0, pp_rank=0)


def test_vpp_needs_pp(spawned):
    cfg = _cfg(*VPP_NO_PP)
    _our_rule(cfg, "parallel.virtual_pipeline_parallel is set but parallel.pipeline_parallel=1")
    _rejected(spawned["vpp_no_pp"], "RuntimeError",
              "pipeline-model-parallel size should be greater than 1 with interleaved schedule",
              "parallel_state.py:initialize_model_parallel")


def test_global_batch_divisible_by_micro_batch_times_dp(app_state):
    """Rule: global batch % (micro batch * DP). NeMo's sampler sets up megatron's calculator with
    decrease_batch_size_if_needed=False, so it refuses (it never silently rounds the batch)."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from nemo.lightning.megatron_init import fake_initialize_model_parallel
    from nemo.lightning.pytorch.plugins.data_sampler import MegatronDataSampler

    cfg = _cfg(*GBS)
    s, p = cfg.schedule, cfg.parallel
    _our_rule(cfg, "schedule.global_batch_size=8 is not divisible by micro_batch_size*DP = 3*2 = 6")
    # the DP size the rank computes (NeMo's pure rank arithmetic) lands in AppState, where the sampler reads it
    app_state.data_parallel_size = fake_initialize_model_parallel(
        cfg.cluster.world_size, 0, p.tensor_parallel, p.pipeline_parallel, context_parallel_size_=p.context_parallel
    )[5]
    assert app_state.data_parallel_size == 2
    sampler = MegatronDataSampler(seq_len=s.seq_length, micro_batch_size=s.micro_batch_size,
                                  global_batch_size=s.global_batch_size)
    try:
        with pytest.raises(AssertionError, match=r"global batch size \(8\) is not divisible by micro batch size \(3\) "
                                                 r"times data parallel size \(2\)"):
            sampler.setup(global_rank=0)
    finally:
        destroy_num_microbatches_calculator()


def test_seq_divisible_by_2cp(spawned):
    """Rule: seq % (2*CP) (load-balanced CP: 2*CP chunks). 254 is a multiple of CP=2 but not of 4: the data step's
    slicing fails; 256 goes through the same call."""
    cfg = _cfg(*CP_SEQ)
    _our_rule(cfg, "schedule.seq_length=254 must be divisible by 2*CP = 4")
    _rejected(spawned["cp_seq"], "RuntimeError", "is invalid for input of size", "utils.py:get_batch_on_this_cp_rank")
    assert spawned["cp_seq_ok"]["type"] is None, spawned["cp_seq_ok"]


def test_sequence_parallel_needs_tp(rank):
    cfg = _cfg(*SP_NO_TP)
    _our_rule(cfg, "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    with pytest.raises(ValueError, match="Cannot use sequence parallelism without tensor parallelism"):
        rank.connect(cfg)


def test_sequence_parallel_seq_divisible_by_tp_times_cp(rank, spawned):
    """Rule: with sequence parallel, each rank's share of the sequence (seq / CP) is split across the TP ranks."""
    cfg = _cfg(*SP_SEQ)
    _our_rule(cfg, "schedule.seq_length=255 must be divisible by TP*CP = 2*1 = 2")
    rank.connect(cfg)  # accepted by the configs
    _rejected(spawned["sp_seq"], "AssertionError",
              "First dimension of the tensor should be divisible by tensor parallel size",
              "mappings.py:_reduce_scatter_along_first_dim")


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_interleaved_pipeline_micro_batches_divisible_by_pp(stage, spawned):
    """Rule: with VPP, micro batches per step (global batch / (micro batch * DP)) % PP. megatron's interleaved
    schedule groups micro batches by PP (NeMo's default microbatch_group_size_per_vp_stage) and refuses a
    remainder. Every stage runs the same schedule, so every stage's validate() must report it."""
    cfg = _cfg(*VPP_MICRO, stage=stage)
    _our_rule(cfg, "micro batches per step (3 = global batch / (micro batch x DP)) to be a multiple of "
                   "parallel.pipeline_parallel=2")
    _rejected(spawned["vpp_micro"], "RuntimeError", "The remainder of M (the total micro-batches) divided by N",
              "schedules.py:forward_backward_pipelining_with_interleaving")


# ----------------------------------------------------------------------------- CPU processes (at launch, no CUDA)
def _cpu_layer_spec(config):
    """The layer spec NeMo builds a rank's model from (``GPTConfig.transformer_layer_spec`` = default_layer_spec):
    without Transformer Engine, megatron's local (TE-free) spec, the one every CPU process uses."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = config.transformer_layer_spec
    spec = spec if isinstance(spec, ModuleSpec) else spec(config)
    assert spec.submodules.input_layernorm.__name__ == "WrappedTorchNorm", spec  # the TE-free spec
    return spec


@pytest.mark.skipif(CUDA, reason="CPU-process rule: a CUDA host never runs ranks as CPU processes")
def test_cpu_processes_refuse_sequence_parallel(rank):
    """Rule (at launch without CUDA): sequence parallel needs CUDA. Not for the collectives (gloo runs the
    reduce-scatter): megatron's TE-free layer spec, the only one CPU processes can build, refuses it."""
    from megatron.core.transformer.spec_utils import build_module

    cfg = _cfg("parallel.tensor_parallel=2", "cluster.gpus_per_node=2", "parallel.sequence_parallel=true")
    assert cfg.problems() == []
    assert any("parallel.sequence_parallel=true needs CUDA" in p for p in cfg.problems(at_launch=True))
    config = rank.connect(cfg)  # accepted by the configs
    with pytest.raises(AssertionError, match="sequence parallel not supported by torch LayerNorm"):
        build_module(_cpu_layer_spec(config).submodules.input_layernorm, config=config,
                     hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


@pytest.mark.skipif(CUDA, reason="CPU-process rule: a CUDA host never runs ranks as CPU processes")
def test_cpu_processes_refuse_context_parallel(rank):
    """Rule (at launch without CUDA): context parallel needs Transformer Engine's attention."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    cfg = _cfg("parallel.context_parallel=2", "cluster.gpus_per_node=2")
    assert cfg.problems() == []
    assert any("parallel.context_parallel=2 needs CUDA" in p for p in cfg.problems(at_launch=True))
    config = rank.connect(cfg)
    core_attention = _cpu_layer_spec(config).submodules.self_attention.submodules.core_attention
    with pytest.raises(AssertionError, match="Context parallelism is only supported by TEDotProductAttention"):
        build_module(core_attention, config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self")


@pytest.mark.skipif(CUDA, reason="CPU-process rule: a CUDA host never runs ranks as CPU processes")
def test_cpu_processes_refuse_the_distributed_optimizer(spawned):
    """Rule (at launch without CUDA): the distributed optimizer needs CUDA. With every CPU redirect applied, the
    engine's non-distributed optimizer takes a DDP step over gloo, the distributed one cannot be built: megatron's
    DistributedOptimizer is a MixedPrecisionOptimizer, whose __init__ allocates on device='cuda' (and behind that
    _build_model_and_main_param_groups accepts only torch.cuda parameters)."""
    cfg = _cfg(*DIST_OPT)
    assert cfg.problems() == []
    assert any("optimizer.distributed_optimizer=true needs CUDA" in p for p in cfg.problems(at_launch=True))
    assert spawned["dist_opt_off"]["type"] is None, spawned["dist_opt_off"]
    _rejected(spawned["dist_opt"], "AssertionError", "Torch not compiled with CUDA enabled",
              "distrib_optimizer.py:__init__")


@pytest.mark.skipif(CUDA, reason="CPU-process rule: a CUDA host never runs ranks as CPU processes")
def test_cpu_processes_refuse_bf16(spawned):
    """Rule (at launch without CUDA): bf16 needs a CUDA GPU. The engine's bf16 OptimizerConfig on bf16 parameters:
    megatron's MixedPrecisionOptimizer.__init__ allocates its found-inf flag with device='cuda' (optimizer.py), and
    behind that Float16OptimizerWithFloat16Params accepts only torch.cuda parameters. fp32 (the control) steps."""
    cfg = _cfg(*BF16)
    assert cfg.problems() == []
    assert any("precision.mode=bf16 needs a CUDA GPU" in p for p in cfg.problems(at_launch=True))
    assert spawned["dist_opt_off"]["type"] is None, spawned["dist_opt_off"]
    _rejected(spawned["bf16"], "AssertionError", "Torch not compiled with CUDA enabled", "optimizer.py:__init__")
