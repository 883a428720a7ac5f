"""The padded vocabulary in the engine: pad the embedding / output layer by the bridge's rule, mask the padded logits.

The rule is :func:`ellama_recipes.model.architecture.padded_vocab_size` (``ceil(V / (divisible_by x TP)) x
(divisible_by x TP)``, Megatron-LM's and NeMo's). :class:`PaddedLlama31Config` is NeMo's ``Llama31Config`` whose
``vocab_size`` stays the real one (the HF checkpoint's rows, what export writes back) and whose ``configure_model``
builds megatron's ``GPTModel`` with the padded size for the run's TP, then masks the padded columns of the output
layer's logits (each TP rank its own slice) to the dtype's lowest value: ``exp`` of it is exactly 0, so the padded
rows take no probability mass and get no gradient anywhere a softmax is taken (training loss, DPO log-probs, eval,
sampling), and no ``-inf`` can turn ``p * log p`` into NaN. The real columns' logits are the unpadded model's.

Resharding a checkpoint to a TP with another padded size works because megatron-core marks the embedding and output
layer ``allow_shape_mismatch`` (rows beyond the stored ones load as zeros, extra stored rows are not read).

Example::

    cfg = PaddedLlama31Config(**bridge.nemo_kwargs(arch))   # what bridge.llama31_config / blocks.model_config build
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nemo.collections.llm.gpt.model.llama import Llama31Config

from ellama_recipes.model.architecture import padded_vocab_size


def mask_padded_columns(logits: torch.Tensor, real_vocab: int, first_column: int) -> torch.Tensor:
    """Fill the columns of ``logits`` (last dim; global column ``first_column + j``) at or beyond ``real_vocab`` with
    the dtype's lowest value, in place (the output of a GEMM: autograd records the fill, their gradient is 0)."""
    keep = real_vocab - first_column
    if keep < logits.shape[-1]:
        logits[..., max(keep, 0):] = torch.finfo(logits.dtype).min
    return logits


def install_logit_mask(model: torch.nn.Module, real_vocab: int) -> None:
    """Mask the padded logits of megatron ``GPTModel`` ``model`` (a no-op on stages without the output layer)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return
    padded = getattr(layer, "output_size", None) or getattr(model, "vocab_size", real_vocab)
    if padded <= real_vocab:
        return

    def hook(module, args, output):
        from megatron.core import parallel_state

        logits, bias = output
        if logits.shape[-1] == padded:  # gathered output
            first = 0
        else:
            first = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        return mask_padded_columns(logits, real_vocab, first), bias

    layer.register_forward_hook(hook)
    model.ellama_real_vocab_size = real_vocab


@dataclass
class PaddedLlama31Config(Llama31Config):
    """``Llama31Config`` with the vocabulary padded per the bridge's rule for the run's TP, padded logits masked."""

    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tensor_model_parallel_size, self.make_vocab_size_divisible_by)

    def configure_model(self, tokenizer, pre_process=None, post_process=None, vp_stage=None):
        real = self.vocab_size
        if real is None:  # NeMo pads the tokenizer's size itself (nemo.lightning.base.get_vocab_size): same rule
            model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
            install_logit_mask(model, int(tokenizer.vocab_size))
            return model
        self.vocab_size = self.padded_vocab_size()
        try:
            model = super().configure_model(tokenizer, pre_process, post_process, vp_stage)
        finally:
            self.vocab_size = real  # the saved context keeps the real size (export trims to it)
        install_logit_mask(model, real)
        return model
