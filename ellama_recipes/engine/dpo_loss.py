"""The DPO loss (like torchtune's ``rlhf/loss/dpo.py``): the formula on per-sequence log-probs, and its megatron
loss reduction over interleaved chosen/rejected micro batches.

Per preference pair (``pi`` = policy, ``ref`` = frozen reference = the SFT result; each term the SUM of the log-probs
of the pair's response tokens only, prompt and padding masked)::

    dpo  = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    nll  = mean over the chosen response tokens of -log pi(token)         (Llama 3: NLL on chosen, weight 0.2)
    loss = dpo + sft_loss_weight * nll                                   averaged over the pairs of the global batch

Logged like TRL: ``rewards_chosen = beta * (pi_c - ref_c)``, ``rewards_rejected = beta * (pi_r - ref_r)`` (means),
``reward_accuracy`` = share of pairs with ``rewards_chosen > rewards_rejected``, ``margin`` = mean of their
difference. TRL's equivalent: ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_loss_weight]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nemo.lightning.megatron_parallel import MegatronLossReduction

METRIC_KEYS = ("loss", "dpo_loss", "nll_loss", "reward_accuracy", "rewards_chosen", "rewards_rejected", "margin")


def sequence_logps(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (sum of response-token log-probs, number of response tokens) from per-token NLL ``[b, s]``."""
    mask = loss_mask.to(token_nll.dtype)
    return -(token_nll.float() * mask.float()).sum(-1), mask.float().sum(-1)


def dpo_terms(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    nll_c: torch.Tensor,
    *,
    beta: float,
    sft_loss_weight: float,
) -> dict[str, torch.Tensor]:
    """Per-pair DPO quantities (vectors over pairs): ``loss``, ``dpo_loss``, ``nll_loss``, ``rewards_chosen``,
    ``rewards_rejected``, ``margin``, ``reward_accuracy`` (see the module docstring for the formulas)."""
    rc = beta * (pi_c - ref_c)
    rr = beta * (pi_r - ref_r)
    dpo = -F.logsigmoid(rc - rr)
    return {
        "loss": dpo + sft_loss_weight * nll_c,
        "dpo_loss": dpo,
        "nll_loss": nll_c,
        "rewards_chosen": rc,
        "rewards_rejected": rr,
        "margin": rc - rr,
        "reward_accuracy": (rc > rr).float(),
    }


class DPOLossReduction(MegatronLossReduction):
    """Megatron loss reduction for interleaved pair micro batches (``forward_out`` = per-token NLL ``[2m, s]``).

    ``forward`` returns the micro batch's mean pair loss (megatron divides by the number of micro batches, DDP
    averages over DP: the global-batch mean) and per-metric sums; ``reduce`` all-reduces the sums over DP and keeps
    the global-batch means in :attr:`last` (validation: accumulated in :attr:`val_sums` until read).
    """

    def __init__(self, model, validation: bool = False) -> None:
        super().__init__()
        self.beta = float(model.beta)  # a DPOLlamaModel: its beta and sft_loss_weight
        self.sft_loss_weight = float(model.sft_loss_weight)
        self.validation = validation
        self.last: dict[str, float] = {}
        self.val_sums: torch.Tensor | None = None

    def forward(self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor):
        logps, n_tok = sequence_logps(forward_out, batch["loss_mask"])
        pi_c, pi_r = logps[0::2], logps[1::2]
        nll_c = -pi_c / n_tok[0::2].clamp(min=1)
        terms = dpo_terms(
            pi_c, pi_r, batch["ref_chosen"].to(pi_c), batch["ref_rejected"].to(pi_r), nll_c,
            beta=self.beta, sft_loss_weight=self.sft_loss_weight,
        )
        loss = terms["loss"].mean()
        sums = torch.stack([torch.tensor(float(pi_c.numel()), device=loss.device)]
                           + [terms[k].detach().sum() for k in METRIC_KEYS])
        return loss, {"dpo_sums": sums}

    def reduce(self, losses_reduced_per_micro_batch) -> torch.Tensor:
        from megatron.core import parallel_state

        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if not losses_reduced_per_micro_batch:
            return torch.tensor(0.0, device=dev)
        sums = torch.stack([x["dpo_sums"] for x in losses_reduced_per_micro_batch]).sum(0).to(dev, torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if self.validation:
            self.val_sums = sums.cpu() if self.val_sums is None else self.val_sums + sums.cpu()
        means = sums[1:] / sums[0].clamp(min=1)
        self.last = {k: float(v) for k, v in zip(METRIC_KEYS, means.tolist())}
        return means[0].to(torch.float32)
