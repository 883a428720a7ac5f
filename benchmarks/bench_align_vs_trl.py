"""SFT and DPO in ellama (`ellama align`: NeMo 2.7.3 + megatron-core) and in TRL 1.16 (`SFTTrainer`, `DPOTrainer`)
from the same start, on the same data in the same order, with the same settings, on CPU; side by side per step.

    flock /tmp/ellama-heavy.lock .venv/bin/python benchmarks/bench_align_vs_trl.py            # 3 seeds, 40 steps
    .venv/bin/python benchmarks/bench_align_vs_trl.py --seeds 1234 --sft-steps 10 --dpo-steps 10   # quick look

Start: the tiny HF Llama of ``model/tiny.py`` (built locally: GQA, llama3 RoPE scaling, untied output, its own
BPE tokenizer and the Llama 3.1 chat template), imported into ellama (``ellama import-hf``). Data: the bundled SFT
rows and preference pairs, tokenized ONCE by ellama (``ellama align`` writes ``RUN/<stage>/data/*.jsonl``); TRL is
given those very token ids and masks (SFT: ``input_ids`` + ``assistant_masks``; DPO: ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``) in ellama's sample order (a sequential sampler over ellama's epoch
permutation), so step k of both sees the same rows / pairs. DPO in TRL starts from ellama's SFT result (exported
with ``ellama export-hf``), which is also both sides' frozen reference.

Settings (both sides): AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1 (not on norms / biases), clip 1.0; LR
``--lr`` with ``--warmup`` steps of NeMo's linear warmup lr x (k+1)/(W+1), then cosine to 10 % (TRL gets the same
schedule as a ``LambdaLR``: HF's own warmup is k/W, which makes step 1 a zero-LR step); global batch 8 (SFT rows,
DPO pairs); DPO sigmoid, beta 0.1, + 0.2 x NLL of the chosen response = TRL ``loss_type=["sigmoid", "sft"],
loss_weights=[1.0, 0.2]``, TRL one pair per micro batch x 8 accumulation steps (TRL's "sft" term is the token mean
of ONE micro batch: with one pair per micro batch it is the per-pair mean ellama uses, see docs/alignment.md).

Printed: per step loss, DPO loss, NLL, rewards, margin, LR, grad norm (ellama | TRL), the max |parameter
difference| after each stage, and the held-out reward accuracy / margin (one independent scoring function on both
final policies vs the shared reference) over the seeds: mean and spread.

The helpers (ellama run, export, TRL run, parameter diff) are also used by tests/test_align_vs_trl.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "ellama_recipes" / "sample_data"

# the settings
SETTINGS = dict(lr=1e-3, warmup=2, min_lr_ratio=0.1, global_batch=8, micro_batch=2, weight_decay=0.1,
                beta1=0.9, beta2=0.95, eps=1e-8, clip=1.0, beta=0.1, sft_weight=0.2, seq_length=256)


# ---------------------------------------------------------------------------------------------------- schedule
def nemo_lr(step0: int, *, lr: float, warmup: int, train_steps: int, min_lr: float) -> float:
    """The LR of optimizer step ``step0`` (0-based) in NeMo's CosineAnnealing (``nemo/core/optim/lr_scheduler.py``,
    constant_steps 0): ``lr (k+1)/(W+1)`` for k <= W, then ``min + (lr - min) (1 + cos(pi (k-W)/(T-W))) / 2``."""
    if warmup > 0 and step0 <= warmup:
        return lr * (step0 + 1) / (warmup + 1)
    if step0 > train_steps:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step0 - warmup) / (train_steps - warmup)))


# ---------------------------------------------------------------------------------------------------- ellama side
_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
               "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _env() -> dict[str, str]:
    """A fresh child's environment: no torch.distributed rendezvous variables, offline hub, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], log: Path, timeout: float) -> str:
    """``cmd`` with stdout + stderr into the file ``log`` (a file, not a pipe: torchrun children inherit it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=timeout)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{text[-5000:]}")
    return text


def align_overrides(s: dict, *, seed: int) -> list[str]:
    o = []
    for st in ("sft", "dpo"):
        o += [f"{st}.schedule.max_lr={s['lr']}", f"{st}.schedule.warmup_steps={s['warmup']}",
              f"{st}.schedule.min_lr_ratio={s['min_lr_ratio']}", f"{st}.schedule.global_batch_size={s['global_batch']}",
              f"{st}.schedule.micro_batch_size={s['micro_batch']}", f"{st}.schedule.seq_length={s['seq_length']}",
              f"{st}.optimizer.weight_decay={s['weight_decay']}", f"{st}.optimizer.adam_beta1={s['beta1']}",
              f"{st}.optimizer.adam_beta2={s['beta2']}", f"{st}.optimizer.adam_eps={s['eps']}",
              f"{st}.optimizer.clip_grad={s['clip']}", f"{st}.data.seed={seed}", f"{st}.checkpoint.log_every=1"]
    o += [f"dpo.loss.beta={s['beta']}", f"dpo.loss.sft_loss_weight={s['sft_weight']}"]
    return o


def ellama_align(base: Path, out: Path, *, sft_steps: int, dpo_steps: int, settings: dict, seed: int,
                 extra: list[str] = (), log: Path | None = None, timeout: float = 1800) -> str:
    """``ellama align`` from ``base`` on the bundled samples into ``out`` (both stages); returns the console."""
    cmd = [sys.executable, "-m", "ellama_recipes", "align", "--size", "tiny", "--from", str(base),
           "--sft", str(SAMPLE_DATA / "sft"), "--dpo", str(SAMPLE_DATA / "preference"), "--out", str(out),
           "--sft-steps", str(sft_steps), "--dpo-steps", str(dpo_steps),
           "--save-every", str(max(sft_steps, dpo_steps)), *align_overrides(settings, seed=seed), *extra]
    return _run(cmd, log or out.parent / f"{out.name}.console.txt", timeout)


def export_hf(src: Path, out: Path, timeout: float = 900) -> Path:
    _run([sys.executable, "-m", "ellama_recipes", "export-hf", "--from", str(src), "--out", str(out), "--no-progress"],
         out.parent / f"{out.name}.export.txt", timeout)
    return out


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out: dict[int, dict] = {}
    for r in rows:
        out.setdefault(r["step"], {}).update(r)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def sft_order(run: Path, n: int, seed: int) -> list[dict]:
    """The first ``n`` SFT training rows in ellama's order (SFTDataModule's CycledExamples, shuffled per epoch)."""
    from ellama_recipes.engine.sft import CycledExamples

    ex = _jsonl(run / "data" / "train.jsonl")
    ds = CycledExamples(ex, n, seed=seed, shuffle=True, seq_length=1, pad_id=0)
    return [ds[i] for i in range(n)]


def dpo_order(run: Path, n: int, seed: int) -> list[dict]:
    """The first ``n`` DPO training pairs in ellama's order (PreferenceDataModule's PairDataset)."""
    from ellama_recipes.engine.dpo_data import PairDataset

    pairs = _jsonl(run / "data" / "train.jsonl")
    ds = PairDataset(pairs, n, seed=seed)
    return [pairs[ds.pair_index(i)] for i in range(n)]


# ---------------------------------------------------------------------------------------------------- TRL side
def _split_pair(p: dict) -> dict:
    """ellama pair (full sequences + response masks) -> TRL's prompt_ids / chosen_ids / rejected_ids."""
    out = {}
    for side in ("chosen", "rejected"):
        ids, mask = p[f"{side}_ids"], p[f"{side}_mask"]
        k = mask.index(1)
        assert all(mask[k:]), "the response is the tail of the sequence"
        out[side] = (ids[:k], ids[k:])
    assert out["chosen"][0] == out["rejected"][0], "chosen and rejected share the prompt"
    return {"prompt_ids": out["chosen"][0], "chosen_ids": out["chosen"][1], "rejected_ids": out["rejected"][1]}


def _trainer_bits(s: dict, train_steps: int):
    """The pieces both TRL trainers share: a sequential sampler (ellama's order) and NeMo's LR schedule."""
    import torch
    from transformers import TrainerCallback

    def sampler(self, *a, **k):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def create_scheduler(self, num_training_steps, optimizer=None):
        opt = optimizer if optimizer is not None else self.optimizer
        f = lambda k: nemo_lr(k, lr=1.0, warmup=s["warmup"], train_steps=train_steps, min_lr=s["min_lr_ratio"])  # noqa: E731
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return self.lr_scheduler

    class UsedLR(TrainerCallback):
        """The LR each optimizer step actually ran with (HF logs the one after the scheduler step)."""

        def __init__(self):
            self.lrs: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    return sampler, create_scheduler, UsedLR()


def _common_args(s: dict, out: Path, train_steps: int, seed: int) -> dict:
    return dict(output_dir=str(out), max_steps=train_steps, learning_rate=s["lr"], weight_decay=s["weight_decay"],
                adam_beta1=s["beta1"], adam_beta2=s["beta2"], adam_epsilon=s["eps"], max_grad_norm=s["clip"],
                optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True)


def _load(hf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)


MUTANTS = ("per_micro_batch_mean", "decay_everything")


def trl_sft(hf: Path, rows: list[dict], s: dict, out: Path, *, train_steps: int, seed: int, mutant: str | None = None):
    """TRL SFTTrainer (assistant-only loss via ellama's masks) on ``rows`` in order; returns (model, per-step logs).

    ``mutant`` (to show what a check against this sees): ``per_micro_batch_mean`` = each micro batch of
    ``s["micro_batch"]`` rows divided by its own token count, averaged over the accumulation steps (megatron-core's
    default reduction); ``decay_everything`` = weight decay on the norms too."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    sampler, sched, used = _trainer_bits(s, train_steps)
    assert mutant in (None, *MUTANTS), mutant

    class Trainer(SFTTrainer):
        _get_train_sampler = sampler
        create_scheduler = sched

        def get_batch_samples(self, *a, **k):
            batches, n = super().get_batch_samples(*a, **k)
            return batches, (None if mutant == "per_micro_batch_mean" else n)

        def get_decay_parameter_names(self, model):
            if mutant == "decay_everything":
                return [n for n, _ in model.named_parameters()]
            return super().get_decay_parameter_names(model)

    tok = AutoTokenizer.from_pretrained(str(hf))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "assistant_masks": r["loss_mask"]} for r in rows])
    micro = s["micro_batch"] if mutant == "per_micro_batch_mean" else s["global_batch"]
    args = SFTConfig(**_common_args(s, out, train_steps, seed), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=s["global_batch"] // micro, max_length=None, packing=False, dataset_num_proc=None)
    tr = Trainer(model=_load(hf), args=args, train_dataset=ds, processing_class=tok, callbacks=[used])
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h and "step" in h]
    for h, lr in zip(logs, used.lrs):
        h["used_lr"] = lr
    return tr.model, logs


def trl_dpo(hf: Path, pairs: list[dict], s: dict, out: Path, *, train_steps: int, seed: int,
            micro_pairs: int = 1):
    """TRL DPOTrainer (sigmoid + 0.2 sft) from ``hf`` (= the reference) on ``pairs`` in order."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    sampler, sched, used = _trainer_bits(s, train_steps)

    class Trainer(DPOTrainer):
        _get_train_sampler = sampler
        create_scheduler = sched

    tok = AutoTokenizer.from_pretrained(str(hf))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # DPOTrainer always tokenizes text pairs (no pre-tokenized path): build it on a stand-in text pair, then hand it
    # ellama's token ids (the columns its own tokenization produces and its collator reads)
    ds = Dataset.from_list([_split_pair(p) for p in pairs])
    stand_in = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    args = DPOConfig(**_common_args(s, out, train_steps, seed), per_device_train_batch_size=micro_pairs,
                     gradient_accumulation_steps=s["global_batch"] // micro_pairs, beta=s["beta"],
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, s["sft_weight"]], max_length=None)
    tr = Trainer(model=_load(hf), ref_model=_load(hf), args=args, train_dataset=stand_in, processing_class=tok,
                 callbacks=[used])
    tr.train_dataset = ds
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h and "step" in h]
    for h, lr in zip(logs, used.lrs):
        h["used_lr"] = lr
    return tr.model, logs


# ---------------------------------------------------------------------------------------------------- comparison
def param_diff(a, b) -> dict[str, float]:
    """Max |a - b| per parameter tensor of two HF models (or HF folders)."""
    import torch

    sa = (a if not isinstance(a, (str, Path)) else _load(Path(a))).state_dict()
    sb = (b if not isinstance(b, (str, Path)) else _load(Path(b))).state_dict()
    assert set(sa) == set(sb), set(sa) ^ set(sb)
    return {k: float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].is_floating_point()}


def compare(ell, other, start) -> dict[str, dict[str, float]]:
    """Per parameter tensor: ``max_abs`` = max |ell - other|, ``rel_l2`` = ||ell - other|| / ||ell - start|| (the
    difference against the size of the update itself, which is ~LR per element on Adam's first step)."""
    sa, sb, s0 = ((m if not isinstance(m, (str, Path)) else _load(Path(m))).state_dict() for m in (ell, other, start))
    out = {}
    for k in sa:
        d = sa[k].double() - sb[k].double()
        u = sa[k].double() - s0[k].double()
        out[k] = {"max_abs": float(d.abs().max()), "rel_l2": float(d.norm() / u.norm().clamp(min=1e-30)),
                  "moved": float(u.abs().max())}
    return out


def update_size(start, after) -> float:
    """Max |after - start| (how far one step moved the weights, for scale)."""
    return max(param_diff(start, after).values())


@__import__("torch").no_grad()
def score_pairs(policy, reference, pairs: list[dict], beta: float) -> dict[str, float]:
    """Held-out reward accuracy and mean margin: plain transformers forwards, summed response log-probs."""
    import torch

    def logp(model, ids, mask):
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
        return float((lp * torch.tensor(mask[1:], dtype=torch.float)).sum())

    policy.eval()
    reference.eval()
    margins = []
    for p in pairs:
        rc = logp(policy, p["chosen_ids"], p["chosen_mask"]) - logp(reference, p["chosen_ids"], p["chosen_mask"])
        rr = logp(policy, p["rejected_ids"], p["rejected_mask"]) - logp(reference, p["rejected_ids"],
                                                                         p["rejected_mask"])
        margins.append(beta * (rc - rr))
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins)}


# ---------------------------------------------------------------------------------------------------- main
def _fmt(x) -> str:
    return "-" if x is None else f"{x:.5g}"


def _table(title: str, cols: list[tuple[str, str, str]], ell: dict[int, dict], trl: list[dict]) -> None:
    print(f"\n{title}: ellama | TRL per step")
    print("step " + " ".join(f"{name:>23}" for name, _, _ in cols))
    for k, t in enumerate(trl, start=1):
        e = ell.get(k, {})
        print(f"{k:>4} " + " ".join(f"{_fmt(e.get(ek)):>11}|{_fmt(t.get(tk)):<11}" for _, ek, tk in cols))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1234,7,42", help="data-order seeds, comma separated (default: 1234,7,42)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=40)
    ap.add_argument("--work", default="/tmp/bench_align_vs_trl", help="scratch folder")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from ellama_recipes.model.tiny import build_tiny_base

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    s = dict(SETTINGS)
    hf = work / "base_hf"
    if not (hf / "model.safetensors").is_file():
        build_tiny_base(hf, seed=0)
    base = work / "base"
    if not (base / "weights").is_dir():
        subprocess.run([sys.executable, "-m", "ellama_recipes", "import-hf", "--size", "tiny", "--from", str(hf),
                        "--out", str(base), "--no-progress"], check=True, env=_env(), capture_output=True)
    results = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        run = work / f"seed{seed}"
        t0 = time.time()
        if not (run / "dpo" / "complete.json").is_file():
            ellama_align(base, run, sft_steps=a.sft_steps, dpo_steps=a.dpo_steps, settings=s, seed=seed,
                         log=work / f"seed{seed}.console.txt")
        t_ell = time.time() - t0
        hf_sft = run / "hf_sft"
        hf_dpo = run / "hf_dpo"
        if not (hf_sft / "config.json").is_file():
            export_hf(run / "sft", hf_sft)
        if not (hf_dpo / "config.json").is_file():
            export_hf(run / "dpo", hf_dpo)
        t0 = time.time()
        rows = sft_order(run / "sft", a.sft_steps * s["global_batch"], seed)
        trl_sft_model, sft_logs = trl_sft(hf, rows, s, work / f"trl_sft{seed}", train_steps=a.sft_steps, seed=seed)
        pairs = dpo_order(run / "dpo", a.dpo_steps * s["global_batch"], seed)
        trl_dpo_model, dpo_logs = trl_dpo(hf_sft, pairs, s, work / f"trl_dpo{seed}", train_steps=a.dpo_steps,
                                          seed=seed)
        # TRL's "sft" term as TRL users usually get it: 8 pairs in one micro batch -> the token mean over all 8
        # chosen responses (pairs weighed by length) instead of ellama's per-pair mean (docs/alignment.md)
        trl8_model, _ = trl_dpo(hf_sft, pairs, s, work / f"trl_dpo8_{seed}", train_steps=a.dpo_steps, seed=seed,
                                micro_pairs=s["global_batch"])
        t_trl = time.time() - t0
        e_sft, e_dpo = metrics(run / "sft"), metrics(run / "dpo")
        for k in e_sft:
            e_sft[k]["lr_doc"] = nemo_lr(k - 1, lr=s["lr"], warmup=s["warmup"], train_steps=a.sft_steps,
                                         min_lr=s["lr"] * s["min_lr_ratio"])
        for k in e_dpo:
            e_dpo[k]["lr_doc"] = nemo_lr(k - 1, lr=s["lr"], warmup=s["warmup"], train_steps=a.dpo_steps,
                                         min_lr=s["lr"] * s["min_lr_ratio"])
        print(f"\n===== data seed {seed}: ellama {t_ell:.0f} s (both stages, incl. launch), TRL {t_trl:.0f} s")
        _table("SFT", [("loss", "loss", "loss"), ("lr (used)", "lr", "used_lr"), ("lr documented", "lr_doc", "used_lr"),
                       ("grad_norm", "grad_norm", "grad_norm")], e_sft, sft_logs)
        _table("DPO", [("loss", "loss", "loss"), ("dpo_loss", "dpo_loss", "x"), ("nll", "nll_loss", "x"),
                       ("rewards_chosen", "rewards_chosen", "rewards/chosen"),
                       ("rewards_rejected", "rewards_rejected", "rewards/rejected"),
                       ("margin", "margin", "rewards/margins"), ("reward_acc", "reward_accuracy", "rewards/accuracies"),
                       ("lr (used)", "lr", "used_lr"), ("grad_norm", "grad_norm", "grad_norm")], e_dpo, dpo_logs)
        for st, ell, tl in (("SFT", e_sft, sft_logs), ("DPO", e_dpo, dpo_logs)):
            de = max(abs(ell[k]["lr"] - ell[k]["lr_doc"]) for k in ell if ell[k].get("lr") is not None)
            dt = max(abs(h["used_lr"] - ell[i + 1]["lr_doc"]) for i, h in enumerate(tl))
            print(f"{st}: max |LR - documented schedule| over the steps: ellama {de:.2e}, TRL {dt:.2e}")
        d_sft = max(param_diff(hf_sft, trl_sft_model).values())
        d_dpo = max(param_diff(hf_dpo, trl_dpo_model).values())
        held = _jsonl(run / "dpo" / "data" / "validation.jsonl")
        ref = _load(hf_sft)
        sc_e = score_pairs(_load(hf_dpo), ref, held, s["beta"])
        sc_t = score_pairs(trl_dpo_model, ref, held, s["beta"])
        sc_t8 = score_pairs(trl8_model, ref, held, s["beta"])
        print(f"\nmax |param ellama - TRL| after {a.sft_steps} SFT steps {d_sft:.3g}, after {a.dpo_steps} DPO steps "
              f"{d_dpo:.3g}")
        print(f"held-out ({len(held)} pairs): ellama acc {sc_e['accuracy']:.3f} margin {sc_e['margin']:.4f} | "
              f"TRL acc {sc_t['accuracy']:.3f} margin {sc_t['margin']:.4f}")
        print(f"TRL with 8 pairs per micro batch (token-mean NLL term): acc {sc_t8['accuracy']:.3f} margin "
              f"{sc_t8['margin']:.4f}")
        results.append({"seed": seed, "ellama": sc_e, "trl": sc_t, "trl_micro8": sc_t8, "param_diff_sft": d_sft, "param_diff_dpo": d_dpo,
                        "sft_loss": [e_sft[k].get("loss") for k in sorted(e_sft)],
                        "trl_sft_loss": [h["loss"] for h in sft_logs],
                        "dpo_loss": [e_dpo[k].get("loss") for k in sorted(e_dpo)],
                        "trl_dpo_loss": [h["loss"] for h in dpo_logs], "held_out_pairs": len(held)})

    def ms(xs):
        return (statistics.mean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)

    print(f"\n===== held-out reward accuracy / margin over seeds {a.seeds} (mean +- population std)")
    print("(trl_micro8: TRL with 8 pairs per micro batch, its NLL term the token mean over the 8 chosen responses)")
    print(f"{'':10} {'accuracy':>18} {'margin':>18}")
    for who in ("ellama", "trl", "trl_micro8"):
        acc, mar = ms([r[who]["accuracy"] for r in results]), ms([r[who]["margin"] for r in results])
        print(f"{who:10} {acc[0]:>10.3f} +- {acc[1]:.3f} {mar[0]:>10.4f} +- {mar[1]:.4f}")
    for r in results:
        print(f"seed {r['seed']}: ellama {r['ellama']['accuracy']:.3f} / {r['ellama']['margin']:.4f}   "
              f"TRL {r['trl']['accuracy']:.3f} / {r['trl']['margin']:.4f}   max |param diff| SFT "
              f"{r['param_diff_sft']:.2e} DPO {r['param_diff_dpo']:.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
