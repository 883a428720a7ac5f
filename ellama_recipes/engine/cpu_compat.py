"""CPU redirects for NeMo 2.7.3 / megatron-core 0.15.3 on a host without CUDA.

Shared by the converter (HF import/export) and the CPU continued-pretraining path. Every function here is a
no-op when ``torch.cuda.is_available()``; each names the upstream code it works around. Edit with small,
targeted changes only (several engineers own functions in this file).
"""

from __future__ import annotations

import torch


def redirect_cuda_synchronize() -> None:
    """``torch.cuda.synchronize()`` -> no-op without CUDA.

    Works around megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.preload_tensors
    (``if non_blocking: torch.cuda.synchronize()``), hit by every torch_dist checkpoint save, and the
    synchronize calls in nemo.lightning's checkpoint IO. There is nothing to synchronize on a CPU-only host.
    """
    if torch.cuda.is_available() or getattr(torch.cuda.synchronize, "_ellama_cpu", False):
        return

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

    def current_device() -> str:
        return "cpu"

    current_device._ellama_cpu = True  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device


def apply_conversion_redirects() -> None:
    """Redirects the HF import/export path needs on a CUDA-less host (idempotent; no-op with CUDA)."""
    if torch.cuda.is_available():
        return
    redirect_cuda_synchronize()
    redirect_cuda_current_device()
