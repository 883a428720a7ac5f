"""engine/cpu_compat.py's guard: the version check, and for every patch a check that the upstream code it replaces
still looks the way the patch assumes (so a NeMo / megatron-core bump fails here, loudly, not silently in training).

Upstream sources are read from the installed module files (ast), not from the live objects, so the checks hold even
after this process applied the patches. Functions the patches re-implement are pinned by the sha256 of their whole
source: any upstream edit to them must be re-read and the replacement re-checked; the key lines each patch exists
for are asserted separately so a failure says what moved.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import subprocess
import sys

import pytest
from conftest import subprocess_env

from ellama_recipes.engine import cpu_compat
from ellama_recipes.errors import UserError

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]


def upstream(modname: str, qualname: str) -> str:
    """Source of ``qualname`` (``f`` or ``Class.method``) as written in the installed module file."""
    mod = importlib.import_module(modname)
    text = inspect.getsource(mod)
    nodes = ast.parse(text).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        assert node is not None, f"{modname}.{qualname} no longer exists (looking for {part!r})"
        nodes = node.body
    return ast.get_source_segment(text, node)


def upstream_params(modname: str, qualname: str) -> list[str]:
    fn = ast.parse(upstream(modname, qualname)).body[0]
    return [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]


def squash(text: str) -> str:
    return " ".join(text.split())


def calls_global(func, name: str, module) -> bool:
    """``func`` looks ``name`` up in ``module``'s globals at call time (so replacing the module attribute works)."""
    func = inspect.unwrap(func)
    return name in func.__code__.co_names and func.__globals__ is vars(module)


# The functions the patches re-implement or depend on line by line, pinned to nemo_toolkit 2.7.3 / megatron-core 0.15.3.
PINNED = {
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"):
        "d950fcfafebeab9773bbebe6494bbfba67b8120cd9ce46a7f79c1ec421ebf82b",
    ("nemo.lightning.megatron_init", "_set_random_seed"):
        "6245e6108b03bb6e53509ab2244bd84b8582874d69eae6696b1fad4548ac3d92",
    ("nemo.lightning.io.pl", "_fix_tensors_device"):
        "8f16549089ad6972e3816a4bf76269677cef6fcb6436863eb30457195f87d76e",
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"):
        "3ab7a7bbb25c84d7b66e53eda2a52769c4e23fcc32c555e840a4ee8fa37a6ed1",
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"):
        "d2d28092dcb2066f22c7b10e8964fa5cb02354fcd5b86f15fb4c7ab8c6dab6d3",
    ("nemo.collections.llm.gpt.model.base", "gpt_data_step"):
        "421b663c68bd95ee210842baba857894ed3ee11c05835deaeb87ccc3c835a89f",
}


# --------------------------------------------------------------------------------------------------- version guard


def test_installed_versions_are_the_ones_the_patches_were_written_for():
    assert cpu_compat.WRITTEN_FOR == {"nemo_toolkit": "2.7.3", "megatron-core": "0.15.3"}
    for dist, want in cpu_compat.WRITTEN_FOR.items():
        assert cpu_compat._installed_version(dist) == want, dist
    import megatron.core
    import nemo

    assert nemo.__version__ == cpu_compat.WRITTEN_FOR["nemo_toolkit"]
    assert megatron.core.__version__ == cpu_compat.WRITTEN_FOR["megatron-core"]


@pytest.mark.parametrize("dist,bumped", [("nemo_toolkit", "2.8.0"), ("megatron-core", "0.16.0"), ("megatron-core", None)])
def test_other_versions_are_refused_with_a_clear_message(monkeypatch, dist, bumped):
    real = cpu_compat._installed_version
    monkeypatch.setattr(cpu_compat, "_installed_version", lambda d: bumped if d == dist else real(d))
    monkeypatch.setattr(cpu_compat, "_checked", False)
    with pytest.raises(UserError) as exc:
        cpu_compat.check_engine_versions()
    msg = str(exc.value)
    assert f"{dist} {bumped or 'not installed'}" in msg
    assert "nemo_toolkit 2.7.3, megatron-core 0.15.3" in msg and "Fix:" in msg and "constraints.txt" in msg
    # every patching entry point refuses before touching anything
    for fn in (cpu_compat.prepare_cpu_process, cpu_compat.apply_conversion_redirects, cpu_compat.redirect_rng_tracker):
        monkeypatch.setattr(cpu_compat, "_checked", False)
        with pytest.raises(UserError):
            fn()


def test_every_patching_function_checks_the_versions_first():
    patchers = [f for name, f in vars(cpu_compat).items()
                if inspect.isfunction(f) and (name.startswith("redirect_") or name == "adapt_pretrain_partial")]
    assert len(patchers) >= 10
    for f in patchers:
        assert "check_engine_versions" in f.__code__.co_names, f.__name__


def test_prepare_cpu_process_applies_every_runtime_redirect():
    import torch
    from megatron.core.optimizer import optimizer as mo
    from megatron.core.pipeline_parallel import schedules
    from nemo.lightning import megatron_init
    from nemo.lightning.io import pl as nemo_io_pl
    from nemo.lightning.pytorch.plugins import data_sampler
    from nemo.lightning.pytorch.strategies import megatron_strategy

    cpu_compat.prepare_cpu_process()
    cpu_compat.prepare_cpu_process()  # idempotent
    for patched in (torch.cuda.synchronize, torch.cuda.current_device, torch.cuda.Stream, nemo_io_pl._fix_tensors_device,
                    mo.FP32Optimizer.__init__, mo.get_grad_norm_fp32, megatron_init._set_random_seed):
        assert getattr(patched, "_ellama_cpu", False), patched
    assert mo.clip_grad_by_total_norm_fp32.__module__ == cpu_compat.__name__
    for module in (schedules, data_sampler, megatron_strategy):
        assert isinstance(module.torch, cpu_compat._CudaToCpuTorch), module.__name__
    assert torch.cuda.current_device() == "cpu"


# ------------------------------------------------------------------------------------ upstream shape, patch by patch


@pytest.mark.parametrize("key", sorted(PINNED), ids=lambda k: k[1])
def test_reimplemented_upstream_functions_are_unchanged(key):
    got = hashlib.sha256(upstream(*key).encode()).hexdigest()
    assert got == PINNED[key], (
        f"{key[0]}.{key[1]} changed upstream: re-read it, re-check the replacement in engine/cpu_compat.py, then "
        f"update PINNED")


def test_synchronize_redirect_targets_the_async_writer():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    src = upstream("megatron.core.dist_checkpointing.strategies.filesystem_async", "FileSystemWriterAsync.preload_tensors")
    assert "if non_blocking: torch.cuda.synchronize()" in squash(src)
    assert filesystem_async.torch is importlib.import_module("torch")  # the process-wide torch.cuda is what it calls


def test_current_device_redirect_targets_the_save_finalize():
    src = upstream("megatron.core.dist_checkpointing.strategies.state_dict_saver", "save_state_dict_async_finalize")
    assert "dtype=torch.int, device=torch.cuda.current_device()" in squash(src)


def test_fix_tensors_device_redirect():
    from nemo.lightning.io import pl as nemo_io_pl

    src = upstream("nemo.lightning.io.pl", "_fix_tensors_device")
    assert "assert torch.cuda.is_initialized()" in src
    assert upstream_params("nemo.lightning.io.pl", "_fix_tensors_device") == ["ckpt"]
    assert "checkpoint = _fix_tensors_device(checkpoint)" in upstream("nemo.lightning.io.pl",
                                                                      "MegatronCheckpointIO.load_checkpoint")
    assert calls_global(nemo_io_pl.MegatronCheckpointIO.load_checkpoint, "_fix_tensors_device", nemo_io_pl)


def test_cuda_stream_redirect_targets_init_model_parallel():
    src = upstream("nemo.lightning.megatron_parallel", "MegatronParallel.init_model_parallel")
    assert "with torch.cuda.stream(torch.cuda.Stream()): self.init_ddp()" in squash(src)


def test_fp32_optimizer_init_replacement_matches_upstream():
    src = upstream("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__")
    assert upstream_params("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__") == [
        "self", "optimizer", "config", "init_state_fn"]
    lines = [squash(x) for x in src.splitlines()]
    assert "super(FP32Optimizer, self).__init__(optimizer, config, init_state_fn)" in lines
    assert "self._scale = torch.tensor([1.0], dtype=torch.float, device='cuda')" in lines
    assert "self.is_stub_optimizer = True if optimizer is None else False" in lines
    from megatron.core.optimizer import optimizer as mo

    assert mo.FP32Optimizer.__mro__[1] is mo.MegatronOptimizer  # the replacement calls MegatronOptimizer.__init__


def test_grad_clipping_replacements_match_upstream_signatures_and_call_sites():
    from megatron.core.optimizer import optimizer as mo

    cg = "megatron.core.optimizer.clip_grads"
    assert upstream_params(cg, "get_grad_norm_fp32") == ["grads_for_norm", "norm_type", "grad_stats_parallel_group"]
    assert upstream_params(cg, "clip_grad_by_total_norm_fp32") == [
        "parameters", "max_norm", "total_norm", "use_decoupled_grad"]
    # the reason for the patch: CUDA-only asserts and buffers upstream
    assert "assert param.grad.type() == 'torch.cuda.FloatTensor'" in upstream(cg, "clip_grad_by_total_norm_fp32")
    # the optimizer module calls both through its own globals (the patch replaces them there)
    assert calls_global(mo.MegatronOptimizer.get_grad_norm, "get_grad_norm_fp32", mo)
    assert calls_global(mo.MegatronOptimizer.clip_grad_norm, "get_grad_norm_fp32", mo)
    assert calls_global(mo.MegatronOptimizer.clip_grad_norm, "clip_grad_by_total_norm_fp32", mo)
    assert "get_grad_norm_fp32( grads_for_norm, grad_stats_parallel_group=self.get_grad_stats_parallel_group() )" in \
        squash(upstream("megatron.core.optimizer.optimizer", "MegatronOptimizer.clip_grad_norm"))
    sig = list(inspect.signature(_replacement("get_grad_norm_fp32")).parameters)
    assert sig == upstream_params(cg, "get_grad_norm_fp32")
    sig = list(inspect.signature(_replacement("clip_grad_by_total_norm_fp32")).parameters)
    assert sig == upstream_params(cg, "clip_grad_by_total_norm_fp32")


def _replacement(name: str):
    from megatron.core.optimizer import optimizer as mo

    cpu_compat.redirect_grad_clipping()
    return getattr(mo, name)


def test_schedule_buffers_redirect_targets_the_schedules():
    from megatron.core.pipeline_parallel import schedules

    for fn in ("forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
               "forward_backward_pipelining_without_interleaving"):
        src = upstream("megatron.core.pipeline_parallel.schedules", fn)
        assert 'total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")' in src, fn
        assert calls_global(getattr(schedules, fn), "torch", schedules), fn


def test_step_logging_redirect_targets_strategy_and_sampler():
    from nemo.lightning.pytorch.plugins import data_sampler
    from nemo.lightning.pytorch.strategies import megatron_strategy

    pinned_to_cuda = 'pin_memory=True).to("cuda", non_blocking=True)'
    src = upstream("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy.training_step")
    assert "torch.tensor(reduced_train_loss, " + pinned_to_cuda in src
    assert "torch.tensor(self.trainer.global_step, " + pinned_to_cuda in src
    assert "torch.tensor(grad_norm, " + pinned_to_cuda in upstream(
        "nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy.optimizer_step")
    src = upstream("nemo.lightning.pytorch.plugins.data_sampler", "MegatronDataSampler.on_megatron_step_end")
    assert "torch.tensor(self.current_global_batch_size, " + pinned_to_cuda in src
    assert calls_global(megatron_strategy.MegatronStrategy.training_step, "torch", megatron_strategy)
    assert calls_global(data_sampler.MegatronDataSampler.on_megatron_step_end, "torch", data_sampler)


def test_rng_tracker_redirect():
    from megatron.core.tensor_parallel import random as mrandom
    from nemo.lightning import megatron_init

    src = upstream("nemo.lightning.megatron_init", "_set_random_seed")
    assert "if torch.cuda.device_count() > 0: tensor_parallel.model_parallel_cuda_manual_seed(seed)" in squash(src)
    assert "torch.manual_seed(seed)" in src
    assert calls_global(megatron_init.initialize_model_parallel_for_nemo, "_set_random_seed", megatron_init)
    params = inspect.signature(mrandom.initialize_rng_tracker).parameters
    assert {"inference_rng_tracker", "force_reset"} <= set(params)


def test_cpu_data_step_mirrors_gpt_data_step():
    from nemo.collections.llm.gpt.model import base

    src = squash(upstream("nemo.collections.llm.gpt.model.base", "gpt_data_step"))
    assert upstream_params("nemo.collections.llm.gpt.model.base", "gpt_data_step") == ["dataloader_iter", "use_mtp"]
    assert list(inspect.signature(cpu_compat.cpu_gpt_data_step).parameters) == ["dataloader_iter", "use_mtp"]
    for line in ('required_device_keys.add("attention_mask")', 'required_host_keys.add("cu_seqlens_argmin")',
                 'required_host_keys.add("max_seqlen")', 'required_device_keys.update(("tokens", "position_ids"))',
                 'required_device_keys.update(("labels", "loss_mask"))',
                 "_batch_required_keys[key] = val.cuda(non_blocking=True)",
                 "output = get_batch_on_this_cp_rank(_batch_required_keys)"):
        assert line in src, line
    assert base.GPTConfig.__dataclass_fields__["data_step_fn"].default is base.gpt_data_step


def test_partial_adaptation_fields_exist_upstream():
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.collections import llm
    from nemo.lightning.pytorch.strategies.megatron_strategy import MegatronStrategy

    fields = {f.name for f in dataclasses.fields(llm.Llama31Config8B)}
    for name in (*cpu_compat._TE_FUSIONS, "use_cpu_initialization", "data_step_fn"):
        assert name in fields, name
    assert {f.name for f in dataclasses.fields(TransformerConfig)} >= set(cpu_compat._TE_FUSIONS)
    assert "ckpt_async_save" in inspect.signature(MegatronStrategy.__init__).parameters
    src = upstream("megatron.core.tensor_parallel.layers", "VocabParallelEmbedding.__init__")
    assert "if config.use_cpu_initialization:" in src and "device=torch.cuda.current_device()" in src


_CLIP_CHECK = """
import torch, torch.distributed as dist
from ellama_recipes.engine import cpu_compat
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + __import__("sys").argv[1], rank=0, world_size=1)
cpu_compat.redirect_grad_clipping()
from megatron.core.optimizer import optimizer as mo
torch.manual_seed(0)
for max_norm in (0.5, 1e6):
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p); q.grad = p.grad.clone()
    norm = mo.get_grad_norm_fp32([p.grad for p in a])
    mo.clip_grad_by_total_norm_fp32(a, max_norm, norm)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert abs(norm - float(ref)) < 1e-5 * float(ref), (norm, float(ref))
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7) for p, q in zip(a, b)), max_norm
    assert max_norm < 1e6 or all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
inf = mo.get_grad_norm_fp32([p.grad for p in a], norm_type=float("inf"))
assert inf == max(p.grad.abs().max().item() for p in a)
# the device-aware data step on a CPU host: same keys, tensors stay put, unknown keys dropped (as upstream)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
batch = {"tokens": torch.arange(8).view(1, 8), "position_ids": torch.arange(8).view(1, 8), "labels": torch.ones(1, 8),
         "loss_mask": torch.ones(1, 8), "attention_mask": None, "extra": torch.zeros(1)}
out = cpu_compat.cpu_gpt_data_step(iter([batch]))
assert set(out) == set(batch) and out["extra"] is None and out["attention_mask"] is None, out
assert all(torch.equal(out[k], batch[k]) and out[k].device.type == "cpu" for k in ("tokens", "position_ids", "labels", "loss_mask"))
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
print("ok")
"""


def test_cpu_grad_clipping_and_data_step_behave_like_upstream(tmp_path):
    """Grad clipping keeps clip_grad's meaning (same global L2 / inf norm and scaling as torch.nn.utils.clip_grad_norm_);
    the CPU data step returns upstream's keys with the tensors left on the CPU (one gloo process, real parallel_state)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "clip.py"
    script.write_text(_CLIP_CHECK)
    proc = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
