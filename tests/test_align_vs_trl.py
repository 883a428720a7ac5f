"""The first SFT and DPO update of `ellama align` equals TRL 1.16's (SFTTrainer, DPOTrainer) from the same weights on
the same batch with the same settings, on CPU: in one process and across 4 ranks (TP2 x DP2).

Loss values and layout equivalence (tests/test_dpo.py, tests/test_align_parallel.py) do not see how the gradient is
reduced over micro batches, how it is scaled, which parameters get weight decay or which LR a step runs with; the
parameters after one optimizer step do. Each case:

- ellama: ``ellama align --sft-steps 1 --dpo-steps 1`` from the tiny base (an HF Llama built locally, imported with
  ``ellama import-hf``) on the bundled samples, global batch 8 (SFT rows / DPO pairs), micro batch 2, LR 1e-3, AdamW
  (0.9, 0.95), eps 1e-8, weight decay 0.1 (SFT too, so the decay groups count), clip 1.0, DPO sigmoid beta 0.1 +
  0.2 x chosen NLL; both stages exported with ``ellama export-hf``.
- TRL: SFTTrainer from the same HF base on the same 8 rows (ellama's token ids and assistant mask, ellama's order),
  DPOTrainer from ellama's exported SFT result (= the reference of both) on the same 8 pairs,
  ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]``, one pair per micro batch x 8 accumulation steps; TRL's
  own AdamW and parameter groups, the LR as a LambdaLR of ellama's documented schedule (benchmarks/bench_align_vs_trl.py).
- checked: step-1 loss, gradient norm and LR equal; every parameter tensor within ``REL_TOL`` of TRL's, relative
  to the step itself (||ellama - TRL|| / ||ellama - start||), and every element within ``ATOL`` = 0.25 x LR, while
  one step moves them by ~LR. Adam's first step is ~ LR x sign(g): a wrong reduction or gradient scale moves many
  elements by up to 2 x LR (measured: megatron-core's default per-micro-batch mean for SFT, what ellama ran before
  issue 22: 2.0e-3 = 2 x LR), weight decay on the norms moves them by LR x 0.1 x w (~0.1 of the step). The power
  of the check is pinned here too: TRL changed those ways (per-micro-batch mean; decay on every parameter) lands
  outside ``REL_TOL``.

Measured (Dec 2026, 2 cores shared with other jobs, load ~5): SFT / DPO max |param - TRL| 2.2e-5 / 5.4e-5 (1
process), 1.7e-5 / 1.7e-5 (TP2 x DP2); worst tensor ||diff|| / ||update|| <= 6.9e-4 (1 process), 1.1e-4 (TP2 x
DP2); the two TRL mutants 0.98 and 0.11. Runtime there: the one-process chain + exports + TRL + mutants 131-165 s
(module setup incl. the shared tiny base), TP2 x DP2 183 s (two 4-process torchrun launches + two exports; the
separate TP2 and DP2 cases it replaces took 124 + 136 s in the full suite) -- all @slow.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine]

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_align_vs_trl", REPO / "benchmarks" / "bench_align_vs_trl.py")
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)

SEED = 1234
S = dict(B.SETTINGS, warmup=0)  # one step: the peak LR (the warmup's own LRs: tests below and the benchmark)
# Adam's first step moves each element by ~LR x g/(|g| + eps): elements whose gradient is near eps amplify float
# noise (measured worst element 5.4e-5 = 0.054 x LR, DPO), so the per-element bound is loose and the per-tensor one
# tight: ||ellama - TRL|| / ||ellama - start|| (measured <= 5e-4 on every tensor, SFT and DPO).
ATOL = 0.25 * S["lr"]  # an element moved the other way by Adam's sign-like step is off by 2 x LR
REL_TOL = 5e-3
# TP2 x DP2 (4 processes): the tensor-parallel split of each layer and the data-parallel gradient reduction in one
# launch (two separate 2-process launches cost twice the engine start-ups for the same two properties)
LAYOUTS = {"single": [], "tp2dp2": ["--gpus-per-node", "4", "parallel.tensor_parallel=2"]}

trl = pytest.importorskip("trl", reason="TRL is a test dependency (pyproject [test]); pip install -e '.[test]'")


def _ellama(tiny_base, root: Path, layout: str) -> dict:
    out = root / layout
    B.ellama_align(tiny_base, out, sft_steps=1, dpo_steps=1, settings=S, seed=SEED, extra=LAYOUTS[layout])
    return {"out": out, "sft": B.export_hf(out / "sft", root / f"{layout}_hf_sft"),
            "dpo": B.export_hf(out / "dpo", root / f"{layout}_hf_dpo")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align_vs_trl")


@pytest.fixture(scope="module")
def single(tiny_base, root) -> dict:
    return _ellama(tiny_base, root, "single")


@pytest.fixture(scope="module")
def trl_sft(single, tiny_hf, root):
    rows = B.sft_order(single["out"] / "sft", S["global_batch"], SEED)
    return B.trl_sft(tiny_hf, rows, S, root / "trl_sft", train_steps=1, seed=SEED)


def _trl_dpo(run: dict, out: Path, **kw):
    pairs = B.dpo_order(run["out"] / "dpo", S["global_batch"], SEED)
    return B.trl_dpo(run["sft"], pairs, S, out, train_steps=1, seed=SEED, **kw)


def _check(name: str, ell_hf: Path, start: Path, model, ell_row: dict, trl_row: dict) -> dict:
    c = B.compare(ell_hf, model, start)
    worst_abs = max(c, key=lambda k: c[k]["max_abs"])
    worst_rel = max(c, key=lambda k: c[k]["rel_l2"])
    got = {"max_abs": c[worst_abs]["max_abs"], "rel_l2": c[worst_rel]["rel_l2"],
           "moved": max(v["moved"] for v in c.values())}
    print(f"{name}: max |param - TRL| {got['max_abs']:.3g} ({worst_abs}), worst per-tensor ||diff||/||update|| "
          f"{got['rel_l2']:.3g} ({worst_rel}); one step moved them by up to {got['moved']:.3g}; loss "
          f"{ell_row['loss']:.6f} vs {trl_row['loss']:.6f}, grad norm {ell_row['grad_norm']:.6f} vs "
          f"{trl_row['grad_norm']:.6f}")
    assert got["moved"] > 0.5 * S["lr"], got  # the step did move the weights
    assert abs(ell_row["loss"] - trl_row["loss"]) < 1e-3, (ell_row, trl_row)  # TRL logs 4 decimals
    assert abs(ell_row["grad_norm"] - trl_row["grad_norm"]) < 1e-4 * trl_row["grad_norm"], (ell_row, trl_row)
    assert abs(ell_row["lr"] - trl_row["used_lr"]) < 1e-9, (ell_row, trl_row)
    assert got["rel_l2"] <= REL_TOL, f"{name}: {worst_rel} differs from TRL's by {c[worst_rel]}"
    assert got["max_abs"] <= ATOL, f"{name}: {worst_abs} differs from TRL's by {c[worst_abs]}"
    return got


@pytest.mark.slow
def test_sft_first_update_equals_trl(single, trl_sft, tiny_hf):
    model, logs = trl_sft
    _check("SFT, 1 process", single["sft"], tiny_hf, model, B.metrics(single["out"] / "sft")[1], logs[0])


@pytest.mark.slow
def test_dpo_first_update_equals_trl(single, root):
    model, logs = _trl_dpo(single, root / "trl_dpo")
    row = B.metrics(single["out"] / "dpo")[1]
    _check("DPO, 1 process", single["dpo"], single["sft"], model, row, logs[0])
    assert abs(row["dpo_loss"] - 0.6931471805599453) < 1e-6 and row["margin"] == 0  # policy == reference


@pytest.mark.slow
@pytest.mark.parametrize("mutant", ["per_micro_batch_mean", "decay_everything"])
def test_the_check_sees_a_changed_reduction_or_decay_groups(single, trl_sft, tiny_hf, root, mutant):
    """TRL changed the way an engine bug would change ellama: the parameters land outside TOL of ellama's (which
    equal unchanged TRL's, tests above). per_micro_batch_mean = megatron-core's default SFT reduction (each micro
    batch's token mean, averaged over micro batches; what ellama trained with before issue 22); decay_everything =
    weight decay on the norms too (megatron-core and HF both exclude norms and biases)."""
    rows = B.sft_order(single["out"] / "sft", S["global_batch"], SEED)
    model, _ = B.trl_sft(tiny_hf, rows, S, root / f"trl_sft_{mutant}", train_steps=1, seed=SEED, mutant=mutant)
    c = B.compare(single["sft"], model, tiny_hf)
    worst = max(c, key=lambda k: c[k]["rel_l2"])
    print(f"TRL {mutant}: worst per-tensor ||param - ellama|| / ||update|| {c[worst]['rel_l2']:.3g} ({worst}), "
          f"max |param - ellama| {max(v['max_abs'] for v in c.values()):.3g}")
    assert c[worst]["rel_l2"] > 4 * REL_TOL, (mutant, worst, c[worst])


@pytest.mark.slow
def test_first_update_equals_trl_across_ranks(tiny_base, root, single, trl_sft, tiny_hf):
    layout = "tp2dp2"
    run = _ellama(tiny_base, root, layout)
    console = (root / f"{layout}.console.txt").read_text()
    assert console.count("launched (SUCCEEDED), job folder") == 2, console[-3000:]  # both stages via torchrun
    model, logs = trl_sft
    d_sft = _check(f"SFT, {layout}", run["sft"], tiny_hf, model, B.metrics(run["out"] / "sft")[1], logs[0])
    model, logs = _trl_dpo(run, root / f"trl_dpo_{layout}")
    d_dpo = _check(f"DPO, {layout}", run["dpo"], run["sft"], model, B.metrics(run["out"] / "dpo")[1], logs[0])
    (root / f"{layout}.json").write_text(json.dumps({"sft": d_sft, "dpo": d_dpo}))
