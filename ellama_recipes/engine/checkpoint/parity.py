"""The engine's own forward pass on a checkpoint: the export's logits check and the loss probes of the tests.

Instantiates the whole model (small models only: ``ellama export-hf`` runs the check up to 1 GiB of weights unless
``--check-logits``), on CPU when there is no GPU, inside :func:`ellama_recipes.engine.process_env.in_process_model`
so the process's rendezvous and attention-backend variables are what they were afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ellama_recipes.engine.checkpoint.hf_export import load_model_context
from ellama_recipes.engine.checkpoint.write import have_transformer_engine
from ellama_recipes.engine.process_env import in_process_model
from ellama_recipes.errors import UserError


def cpu_only() -> bool:
    return not torch.cuda.is_available()


def load_engine_model(ckpt: Path, **config_overrides):
    """(LightningModule, trainer) for a NeMo 2 checkpoint on this host (CPU when there is no GPU).

    ``config_overrides`` set model config fields before the model is built (e.g. ``make_vocab_size_divisible_by=1``
    builds the unpadded vocabulary: megatron loads the vocabulary tensors ``allow_shape_mismatch``)."""
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import MegatronStrategy, Trainer, _strategy_lib

    from ellama_recipes.engine import cpu_compat

    cpu_compat.apply_conversion_redirects()
    model = load_model_context(ckpt, "model")
    model.config.fp8 = None
    model.config.fp8_param = False
    model.config.perform_initialization = False
    for k, v in config_overrides.items():
        setattr(model.config, k, v)
    if getattr(model, "model_transform", None) is not None:
        raise UserError(f"{ckpt} is a PEFT/adapter checkpoint; merge the adapters before exporting.")
    cpu = cpu_only()
    trainer = Trainer(devices=1, accelerator="cpu" if cpu else "gpu", logger=False, enable_checkpointing=False,
                      strategy=MegatronStrategy(ddp="pytorch", setup_optimizers=False))
    # Inference-only: TESTING skips MegatronParallel.init_ddp, which needs torch.cuda.Stream.
    trainer.state.fn = TrainerFn.TESTING
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    if not model.state_dict():
        if cpu:
            with _strategy_lib.megatron_cpu_init_context(model.config):
                model.configure_model()
        else:
            model.configure_model()
    trainer.strategy.setup(trainer)
    try:
        trainer.strategy.load_checkpoint(Path(ckpt))
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as exc:
        raise UserError(
            f"Loading {ckpt} into the model its context describes failed ({type(exc).__name__}: {exc}). The "
            "checkpoint is partial, corrupt, or its weights do not match its context/; use an intact checkpoint."
        ) from exc
    return model, trainer


def mcore_gpt(model):
    from megatron.core.models.gpt import GPTModel

    m = model
    for _ in range(6):
        if isinstance(m, GPTModel):
            return m
        m = getattr(m, "module", None)
        if m is None:
            break
    raise RuntimeError(f"no megatron GPTModel inside {type(model).__name__}")


def fixed_batch(vocab_size: int, seq_length: int) -> torch.Tensor:
    """The fixed batch the logits check uses: 2 x min(32, seq) token ids from a seeded generator."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (2, min(32, seq_length)), generator=g)


@torch.no_grad()
def engine_logits(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's own forward pass (megatron GPTModel), in float32, on CPU or the current GPU; with ``labels``
    the per-token loss ``[b, s]`` of the training path (megatron's vocab-parallel cross entropy) instead."""
    gpt = mcore_gpt(model)
    gpt.eval()
    if cpu_only():
        # megatron's DotProductAttention forks the 'model-parallel-rng' CUDA RNG state even in eval; on CPU the
        # strategy never registers it. The inference tracker's fork is a no-op (no dropout at eval anyway).
        from megatron.core.tensor_parallel.random import initialize_rng_tracker

        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    dev = next(gpt.parameters()).device
    gpt.float()
    b, s = input_ids.shape
    ids = input_ids.to(dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    # TE-free DotProductAttention needs an explicit causal mask (True = masked); TE's fused attention builds its
    # own from attn_mask_type=causal and is given none, as in megatron's own training/inference paths.
    mask = None if have_transformer_engine() else \
        torch.triu(torch.ones(s, s, dtype=torch.bool, device=dev), diagonal=1)[None, None]
    lab = None if labels is None else labels.to(dev)
    return gpt(input_ids=ids, position_ids=pos, attention_mask=mask, labels=lab).float().cpu()


def engine_batch_logits(ckpt: Path, vocab_size: int) -> dict:
    """{"batch", "engine_logits"} of the engine checkpoint on the fixed batch (loads the whole model)."""
    with in_process_model():
        model, trainer = load_engine_model(Path(ckpt))
        try:
            batch = fixed_batch(vocab_size, model.config.seq_length)
            return {"batch": batch, "engine_logits": engine_logits(model, batch)}
        finally:
            from nemo.lightning import teardown

            teardown(trainer, model)


# float32 on both sides; the remaining differences come from op order (megatron's fused QKV GEMM and
# fc1 GEMM vs three/two separate HF GEMMs, different softmax/RMSNorm kernels): ~1e-6 relative in practice.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4


@torch.no_grad()
def compare_logits(engine_out: dict, hf_dir: Path) -> dict:
    """Reload the export with transformers (float32) and compare logits with the engine's on the fixed batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
    model.eval()
    ids = engine_out["batch"]
    hf_logits = model(input_ids=ids).logits.float()
    eng = engine_out["engine_logits"][..., : hf_logits.shape[-1]]
    if eng.shape != hf_logits.shape:
        return {"max_logit_diff": float("inf"), "logit_tolerance": LOGIT_ATOL, "logits_ok": False,
                "logit_shapes": [list(eng.shape), list(hf_logits.shape)]}
    diff = (eng - hf_logits).abs()
    tol = LOGIT_ATOL + LOGIT_RTOL * hf_logits.abs()
    return {
        "max_logit_diff": diff.max().item(),
        "logit_tolerance": LOGIT_ATOL,
        "logit_rtol": LOGIT_RTOL,
        "logits_ok": bool((diff <= tol).all()),
        "batch_shape": list(ids.shape),
        "argmax_agreement": (eng.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
    }
