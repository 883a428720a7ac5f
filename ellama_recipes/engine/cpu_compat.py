"""CPU redirects for NeMo 2.7.3 / megatron-core 0.15.3 on a host without CUDA.

Shared by the converter (HF import/export) and the CPU continued-pretraining path. Every function here is a
no-op when ``torch.cuda.is_available()``; each names the upstream code it works around. Edit with small,
targeted changes only (several engineers own functions in this file).
"""

from __future__ import annotations

import torch

# The versions every patch below was written against and is tested against (tests/test_cpu_compat.py checks that
# the upstream code each one replaces still looks the way it assumes). Another version: refuse, never guess.
WRITTEN_FOR = {"nemo_toolkit": "2.7.3", "megatron-core": "0.15.3"}
_checked = False


def _installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_engine_versions() -> None:
    """Refuse (UserError) unless the installed NeMo / megatron-core are the versions these patches were written for.

    Called by every function here that patches something (only on CUDA-less hosts: with CUDA nothing is patched).
    """
    global _checked
    if _checked:
        return
    found = {dist: _installed_version(dist) for dist in WRITTEN_FOR}
    wrong = {d: v for d, v in found.items() if v != WRITTEN_FOR[d]}
    if wrong:
        from ellama_recipes.errors import UserError

        have = ", ".join(f"{d} {v or 'not installed'}" for d, v in found.items())
        want = ", ".join(f"{d} {v}" for d, v in WRITTEN_FOR.items())
        raise UserError(
            f"The CPU path (ellama_recipes/engine/cpu_compat.py) patches NeMo and megatron-core internals and was "
            f"written for {want}; this environment has {have}. On other versions the patches could silently do the "
            f"wrong thing, so nothing was run. Fix: install the pinned versions (pip install -c constraints.txt -e .), "
            f"or run on a CUDA GPU (nothing is patched there), or port cpu_compat.py and its upstream-shape checks in "
            f"tests/test_cpu_compat.py to the new versions and update WRITTEN_FOR."
        )
    _checked = True


def redirect_cuda_synchronize() -> None:
    """``torch.cuda.synchronize()`` -> no-op without CUDA.

    Works around megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.preload_tensors
    (``if non_blocking: torch.cuda.synchronize()``), hit by every torch_dist checkpoint save, and the
    synchronize calls in nemo.lightning's checkpoint IO. There is nothing to synchronize on a CPU-only host.
    """
    if torch.cuda.is_available() or getattr(torch.cuda.synchronize, "_ellama_cpu", False):
        return
    check_engine_versions()

    def synchronize(device=None) -> None:  # noqa: ARG001
        return None

    synchronize._ellama_cpu = True  # type: ignore[attr-defined]
    torch.cuda.synchronize = synchronize


def redirect_cuda_current_device() -> None:
    """``torch.cuda.current_device()`` -> ``"cpu"`` without CUDA (it is used as a ``device=`` argument).

    Works around megatron.core.dist_checkpointing.strategies.state_dict_saver.save_state_dict_async_finalize
    (``torch.tensor(..., device=torch.cuda.current_device())`` for the all-reduce of save failures), hit by every
    torch_dist checkpoint save, and the same idiom in megatron.core's RotaryEmbedding / GlobalMemoryBuffer.
    """
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_ellama_cpu", False):
        return
    check_engine_versions()

    def current_device() -> str:
        return "cpu"

    current_device._ellama_cpu = True  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device


def redirect_fix_tensors_device() -> None:
    """``nemo.lightning.io.pl._fix_tensors_device`` -> identity without CUDA.

    Works around nemo/lightning/io/pl.py MegatronCheckpointIO.load_checkpoint, which ends with
    ``_fix_tensors_device(checkpoint)`` = ``assert torch.cuda.is_initialized()`` and a move to the current CUDA
    device. Hit by every torch_dist checkpoint load (export, resume). On a CPU host the tensors already are where
    they belong.
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from nemo.lightning.io import pl as nemo_io_pl

    if getattr(nemo_io_pl._fix_tensors_device, "_ellama_cpu", False):
        return

    def _fix_tensors_device(ckpt):
        return ckpt

    _fix_tensors_device._ellama_cpu = True  # type: ignore[attr-defined]
    nemo_io_pl._fix_tensors_device = _fix_tensors_device


def apply_conversion_redirects() -> None:
    """Redirects the HF import/export path needs on a CUDA-less host (idempotent; no-op with CUDA)."""
    if torch.cuda.is_available():
        return
    check_engine_versions()
    redirect_cuda_synchronize()
    redirect_cuda_current_device()
    redirect_fix_tensors_device()


# ============================================================================ continued pretraining on CPU
# Owned by the CPT path (engine/train.py). `adapt_pretrain_partial` changes config fields of the recipe's
# partial for a CPU-only local run; `apply_training_redirects` installs the runtime redirects. Both are called
# only by engine.runner.run_local and only when `not torch.cuda.is_available()`; the recipe built by
# engine.blocks (what GPU launches run) is never changed.

_TE_FUSIONS = (
    "apply_rope_fusion",  # megatron.core.models.common.embeddings.rope_utils: fused RoPE needs TE/apex kernels
    "persist_layer_norm",  # megatron.core.fusions.fused_layer_norm: apex persistent LN kernel
    "bias_activation_fusion",  # megatron.core.fusions.fused_bias_swiglu: torch.jit CUDA fusion
    "masked_softmax_fusion",  # megatron.core.fusions.fused_softmax: CUDA kernel
    "bias_dropout_fusion",  # megatron.core.fusions.fused_bias_dropout
    "cross_entropy_loss_fusion",  # megatron.core.fusions.fused_cross_entropy
    "gradient_accumulation_fusion",  # fused_weight_gradient_mlp_cuda (apex)
)


def adapt_pretrain_partial(partial) -> None:
    """Make the recipe's ``run.Partial(llm.pretrain, ...)`` runnable in one CPU process (in place).

    - model config: every TE/apex/CUDA fusion off (``_TE_FUSIONS``), ``use_cpu_initialization=True``
      (megatron.core.tensor_parallel.layers.VocabParallelEmbedding/ColumnParallelLinear allocate on
      ``torch.cuda.current_device()`` otherwise), ``data_step_fn=cpu_gpt_data_step``.
    - trainer: accelerator cpu, 1 device, 1 node; synchronous checkpoint saves.
    - precision: must be fp32 (MegatronMixedPrecision bf16 -> megatron Float16OptimizerWithFloat16Params asserts
      ``torch.cuda.FloatTensor``); a bf16/fp8 recipe here is a UserError.
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from ellama_recipes.errors import UserError

    plugin = partial.trainer.plugins
    if getattr(plugin, "precision", "32") != "32" or getattr(plugin, "fp8", None):
        raise UserError(
            f"precision {getattr(plugin, 'precision', '?')!r} (fp8={getattr(plugin, 'fp8', None)}) needs a CUDA GPU and "
            "none is visible. Fix: run on a GPU machine, or set precision.mode=fp32 for a CPU smoke run."
        )
    mc = partial.model.config
    for name in _TE_FUSIONS:
        setattr(mc, name, False)
    mc.use_cpu_initialization = True
    mc.data_step_fn = cpu_gpt_data_step
    tr = partial.trainer
    tr.accelerator = "cpu"
    tr.devices = 1
    tr.num_nodes = 1
    tr.strategy.ckpt_async_save = False


def cpu_gpt_data_step(dataloader_iter, use_mtp: bool = False):
    """Device-aware copy of nemo.collections.llm.gpt.model.base.gpt_data_step.

    Upstream moves the batch with ``val.cuda(non_blocking=True)``; this moves it to CUDA when there is one and
    leaves it on the CPU otherwise. Same keys, same context-parallel slicing (megatron.core.utils.
    get_batch_on_this_cp_rank).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(dataloader_iter)
    _batch = batch[0] if isinstance(batch, tuple) and len(batch) == 3 else batch
    device_keys = {"attention_mask"}
    host_keys: set[str] = set()
    if "cu_seqlens" in _batch:
        device_keys.add("cu_seqlens")
        host_keys.update(("cu_seqlens_argmin", "max_seqlen"))
    if parallel_state.is_pipeline_first_stage() or use_mtp:
        device_keys.update(("tokens", "position_ids"))
    if parallel_state.is_pipeline_last_stage():
        device_keys.update(("labels", "loss_mask"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for key, val in _batch.items():
        if key in device_keys:
            out[key] = val.to(dev, non_blocking=True) if val is not None else None
        elif key in host_keys:
            out[key] = val.cpu()
        else:
            out[key] = None
    return get_batch_on_this_cp_rank(out)


def _cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int) or str(dev).startswith("cuda"):
        return "cpu"
    return dev


class _HostTensor(torch.Tensor):
    """A CPU tensor whose ``.to("cuda", ...)`` stays on the CPU (for ``torch.tensor(x, pin_memory=True).to("cuda")``)."""

    def to(self, *args, **kwargs):  # type: ignore[override]
        args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "full_like")


class _CudaToCpuTorch:
    """Stands in for ``torch`` inside ONE upstream module: tensor factories called with ``device='cuda'`` (or a
    CUDA index) allocate on the CPU, ``pin_memory=True`` is dropped (and the result's ``.to('cuda')`` stays on the
    CPU); every other attribute is the real ``torch``."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            pinned = kwargs.pop("pin_memory", False)
            out = attr(*args, **kwargs)
            return out.as_subclass(_HostTensor) if pinned else out

        return factory


def _redirect_module_cuda_factories(module) -> None:
    if not isinstance(getattr(module, "torch", None), _CudaToCpuTorch):
        module.torch = _CudaToCpuTorch()


def redirect_cuda_stream() -> None:
    """``torch.cuda.Stream()`` -> None without CUDA (``torch.cuda.stream(None)`` is a no-op context).

    Works around nemo/lightning/megatron_parallel.py MegatronParallel.init_model_parallel:
    ``with torch.cuda.stream(torch.cuda.Stream()): self.init_ddp()``.
    """
    if torch.cuda.is_available() or getattr(torch.cuda.Stream, "_ellama_cpu", False):
        return
    check_engine_versions()

    def Stream(*args, **kwargs):  # noqa: N802, ARG001
        return None

    Stream._ellama_cpu = True  # type: ignore[attr-defined]
    torch.cuda.Stream = Stream  # type: ignore[assignment]


def redirect_fp32_optimizer_scale() -> None:
    """megatron/core/optimizer/optimizer.py FP32Optimizer.__init__ allocates ``self._scale`` with
    ``device='cuda'``; this runs the same constructor with the scale on the CPU."""
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from megatron.core.optimizer import optimizer as mo

    if getattr(mo.FP32Optimizer.__init__, "_ellama_cpu", False):
        return

    def __init__(self, optimizer, config, init_state_fn):
        mo.MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self._scale = torch.tensor([1.0], dtype=torch.float)
        self.is_stub_optimizer = optimizer is None

    __init__._ellama_cpu = True  # type: ignore[attr-defined]
    mo.FP32Optimizer.__init__ = __init__


def redirect_grad_clipping() -> None:
    """CPU versions of megatron/core/optimizer/clip_grads.py get_grad_norm_fp32 / clip_grad_by_total_norm_fp32.

    Upstream asserts ``param.grad.type() == 'torch.cuda.FloatTensor'`` and uses apex/TE multi-tensor kernels on
    ``device='cuda'`` buffers. The replacements compute the same global L2 (or inf) norm, all-reduced over the
    same process group, and scale the grads by ``max_norm / (norm + 1e-6)`` when that is < 1, so gradient
    clipping stays ON for CPU runs (the recipe's clip_grad=1.0 keeps its meaning).
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from megatron.core.optimizer import optimizer as mo
    from megatron.core.utils import to_local_if_dtensor

    if getattr(mo.get_grad_norm_fp32, "_ellama_cpu", False):
        return

    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        grads = [to_local_if_dtensor(g).float() for g in grads_for_norm]
        norm_type = float(norm_type)
        if norm_type == float("inf"):
            total = torch.tensor([max((g.abs().max().item() for g in grads), default=0.0)])
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX, group=grad_stats_parallel_group)
            return total.item()
        total = torch.zeros(1)
        for g in grads:
            total += torch.norm(g, norm_type) ** norm_type
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=grad_stats_parallel_group)
        return total.item() ** (1.0 / norm_type)

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            for p in parameters:
                g = getattr(p, attr, None)
                if g is not None:
                    to_local_if_dtensor(g).detach().mul_(coeff)

    get_grad_norm_fp32._ellama_cpu = True  # type: ignore[attr-defined]
    mo.get_grad_norm_fp32 = get_grad_norm_fp32
    mo.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def redirect_schedule_buffers() -> None:
    """megatron/core/pipeline_parallel/schedules.py forward_backward_no_pipelining (and the pipelined schedules)
    allocate ``total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")``: CPU there."""
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from megatron.core.pipeline_parallel import schedules

    _redirect_module_cuda_factories(schedules)


def redirect_step_logging() -> None:
    """``torch.tensor(x, pin_memory=True).to("cuda", non_blocking=True)`` -> CPU tensors.

    Works around nemo/lightning/pytorch/strategies/megatron_strategy.py MegatronStrategy.training_step (logging
    global_step / reduced_train_loss / grad norm) and nemo/lightning/pytorch/plugins/data_sampler.py
    MegatronDataSampler.on_megatron_step_end (global batch size).
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from nemo.lightning.pytorch.plugins import data_sampler
    from nemo.lightning.pytorch.strategies import megatron_strategy

    _redirect_module_cuda_factories(data_sampler)
    _redirect_module_cuda_factories(megatron_strategy)


def redirect_rng_tracker() -> None:
    """Use megatron-core's inference RNG tracker (``fork()`` is a no-op) without CUDA.

    Works around nemo/lightning/megatron_init.py _set_random_seed, which only calls
    ``tensor_parallel.model_parallel_cuda_manual_seed`` when a CUDA device exists, so the ``model-parallel-rng``
    state is never added and megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork raises
    ``cuda rng state model-parallel-rng is not added`` at the first init/dropout. The CPU generator seeded by
    ``torch.manual_seed(seed)`` (same function) is used instead, so runs stay reproducible.
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from nemo.lightning import megatron_init

    if getattr(megatron_init._set_random_seed, "_ellama_cpu", False):
        return
    upstream = megatron_init._set_random_seed

    def _set_random_seed(seed_):
        upstream(seed_)
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    _set_random_seed._ellama_cpu = True  # type: ignore[attr-defined]
    megatron_init._set_random_seed = _set_random_seed


def redirect_progress_timers() -> None:
    """(helper B, multi-process CPU runs) ``ProgressPrinter.log_megatron_timers`` -> None when no megatron timer
    is registered.

    Works around nemo/lightning/pytorch/callbacks/progress_printer.py ProgressPrinter.on_train_batch_end, which
    runs only on global rank 0 (the progress bar is disabled elsewhere) and calls
    megatron/core/timers.py Timers.get_all_timers_string -> _get_elapsed_time_all_ranks, an all_gather over the
    world even for zero timers. Under NCCL an empty all_gather is harmless; under gloo the unmatched collective
    pairs with the other ranks' next one (a TP all-reduce) and the launch hangs. Nothing is lost: with no timer
    registered upstream returns None too.
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    from nemo.lightning.pytorch.callbacks import progress_printer

    upstream = progress_printer.ProgressPrinter.log_megatron_timers
    if getattr(upstream, "_ellama_cpu", False):
        return

    def log_megatron_timers(self, timers):
        if not getattr(timers, "_timers", None):
            return None
        return upstream(self, timers)

    log_megatron_timers._ellama_cpu = True  # type: ignore[attr-defined]
    progress_printer.ProgressPrinter.log_megatron_timers = log_megatron_timers


def apply_training_redirects() -> None:
    """Every runtime redirect ``llm.pretrain`` needs in one CPU process (idempotent; no-op with CUDA)."""
    if torch.cuda.is_available():
        return
    check_engine_versions()
    apply_conversion_redirects()  # loading/saving checkpoints happens in training too
    redirect_cuda_stream()
    redirect_fp32_optimizer_scale()
    redirect_grad_clipping()
    redirect_schedule_buffers()
    redirect_step_logging()
    redirect_rng_tracker()
    redirect_progress_timers()


def prepare_cpu_process() -> None:
    """Everything a CPU run needs in THIS process, in one call: the version guard, then every runtime redirect
    (training + checkpoint load/save). Call it first thing in each process that runs engine code on a CUDA-less
    host, e.g. in every torchrun-launched rank before the partial is built and run; idempotent; a no-op with CUDA.

    The partial's own CPU changes (fusions off, CPU init, the device-aware data step, cpu accelerator) are
    :func:`adapt_pretrain_partial`, applied once where the partial is built; they travel inside it.
    """
    if torch.cuda.is_available():
        return
    check_engine_versions()
    apply_training_redirects()
