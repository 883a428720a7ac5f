"""`ellama quickstart`: the whole chain on the tiny size and the bundled sample data, on CPU, with the answer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ellama_recipes.cli.app import app
from ellama_recipes.cli.common import console, print_json
from ellama_recipes.workflows.quickstart import QUICKSTART_BASE_STEPS, QUICKSTART_EVAL_LIMIT

HELP = """The whole chain on the tiny model and the bundled sample data, on CPU, in minutes, with the answer.

tiny base (built locally, pretrained briefly on the bundled general text minus every 10th document, which is held
out; cached) -> import-hf -> data build (clean, graph mix, tokenize, blend 1:1) -> pretrain (continued pretraining,
1:1 replay) and the same CPT without replay (the control arm) -> export-hf (verified) -> align (SFT then DPO) ->
export-hf -> eval (base, CPT, CPT without replay, aligned, on held-out text and the bundled task suites) -> the
aligned model answering held-out instructions through its chat template. Prints each stage's wall time, the
perplexity and task tables, the replay comparison, DPO's held-out reward accuracy and margin, and writes
OUT/report.json (docs/quickstart.md). NeMo / Lightning / megatron-core output goes to OUT/logs/NN-<stage>.log
(--verbose shows it). Completed stages under --out are reused; --fresh starts over.

Example:  ellama quickstart --out .quickstart
"""


def _reflow(text: str) -> str:
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


def _f(x, fmt="{:+.2f}") -> str:
    return "-" if x is None else fmt.format(x)


@app.command("quickstart", help=_reflow(HELP))
def quickstart(
    out: Path = typer.Option(Path(".quickstart"), "--out", help="Working directory for every stage's output."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Continued-pretraining steps (default: the tiny recipe's)."),
    base_steps: int = typer.Option(QUICKSTART_BASE_STEPS, "--base-steps", help="Steps of the tiny base's general-text pretraining."),
    align_steps: Optional[int] = typer.Option(None, "--align-steps", help="SFT and DPO steps each (default: the recipes')."),
    eval_limit: int = typer.Option(QUICKSTART_EVAL_LIMIT, "--eval-limit",
                                   help="At most N examples per eval task (0: every example)."),
    align: bool = typer.Option(True, "--align/--no-align", help="Run SFT + DPO after CPT (when `ellama align` exists)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete --out first and run every stage."),
    dryrun: bool = typer.Option(False, "--dryrun", help="Print the stages and their commands; run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    no_replay_arm: bool = typer.Option(False, "--no-replay-arm", help="Skip the CPT-without-replay comparison arm."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show NeMo / Lightning / megatron-core log lines "
                                 "(by default they go to OUT/logs/NN-<stage>.log)."),
) -> None:
    from ellama_recipes.workflows.quickstart import describe, run_quickstart

    if dryrun:
        stages = describe(out, steps, align, not no_replay_arm)
        if as_json:
            print_json({"out": str(out), "stages": stages})
            return
        table = Table(title="ellama quickstart --dryrun")
        for col in ("stage", "output", "command"):
            table.add_column(col, overflow="fold")
        for st in stages:
            table.add_row(st["stage"], st["output"], st["command"])
        console.print(table)
        console.print("[dim]Dry run: nothing was run.[/]")
        return

    echo = (lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True)) if not as_json \
        else (lambda msg: None)
    summary = run_quickstart(out, steps=steps, base_steps=base_steps, align_steps=align_steps,
                             eval_limit=eval_limit or None,
                             align=align, fresh=fresh, replay_arm=not no_replay_arm, verbose=verbose, echo=echo)
    if as_json:
        print_json(summary)
        return
    show_summary(summary)


def _table(title: str, cols: list[str]) -> Table:
    t = Table(title=title, title_justify="left", pad_edge=False)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    return t


def show_summary(summary: dict) -> None:
    """The final tables, each under 80 columns (numbers rounded deliberately, never cut)."""
    out = Path(summary["out"])
    if not console.is_terminal:  # piped (| tee): lay the tables out for a 100-column screen, not rich's 80
        console.width = 100
    m = summary["metrics"]
    for key in ("val_loss_domain", "val_loss_general"):
        if key in m:
            console.print(f"CPT {key}: {m[key]['first']:.4f} (step {m[key]['first_step']}) -> "
                          f"{m[key]['last']:.4f} (step {m[key]['last_step']})", highlight=False)
    st = _table("stages (wall s; logs under OUT/logs)", ["stage", "output", "wall s"])
    total = 0.0
    for d in summary["stage_details"]:
        total += d["seconds"]
        rel = Path(d["output"]).relative_to(out) if Path(d["output"]).is_relative_to(out) else d["output"]
        st.add_row(d["name"], str(rel), "reused" if d["reused"] else f"{d['seconds']:.1f}")
    st.add_row("total", "", f"{total:.1f}", style="bold")
    console.print(st)
    ppl = _table("perplexity on held-out text (lower is better; % vs base)",
                 ["model", "ppl domain", "ppl general", "domain gain %", "general regr. %"])
    for r in summary["eval"]:
        ppl.add_row(r["model"], _f(r.get("ppl_domain"), "{:.2f}"), _f(r.get("ppl_general"), "{:.2f}"),
                    _f(r.get("ppl_domain_gain_pct")), _f(r.get("ppl_general_regression_pct")))
    console.print(ppl)
    tasks = _table("task suites (macro-average score; % vs base)",
                   ["model", "domain score", "general score", "domain gain %", "general regr. %"])
    for r in summary["eval"]:
        tasks.add_row(r["model"], _f(r["domain_score"], "{:.3f}"), _f(r["general_score"], "{:.3f}"),
                      _f(r["domain_gain_pct"]), _f(r["general_regression_pct"]))
    console.print(tasks)
    sp = summary.get("splits") or {}
    if sp:
        console.print(f"measured on held-out text only: general = {sp['general_eval']['documents']} bundled general "
                      f"documents the base and CPT never trained on (every 10th of each file); domain = the blend's "
                      f"validation documents; details: report.json eval_documents", highlight=False)
    rep = summary.get("replay")
    if rep:
        rt = _table(f"replay vs none (% vs base): same {rep['same']['train_steps']} steps, LR "
                    f"{rep['same']['max_lr']:g}, {rep['same']['tokens']:,} tokens",
                    ["CPT arm", "ppl dom. gain", "ppl gen. regr.", "task dom. gain", "task gen. regr."])
        for name, arm in (("1:1 replay", rep["with_replay"]), ("no replay", rep["without_replay"])):
            rt.add_row(name, _f(arm["ppl_domain_gain_pct"]), _f(arm["ppl_general_regression_pct"]),
                       _f(arm["domain_gain_pct"]), _f(arm["general_regression_pct"]))
        console.print(rt)
        console.print(f"replay: {rep['verdict']}", highlight=False)
    if summary.get("dpo"):
        d, a = summary["dpo"], summary["alignment"]
        console.print(f"DPO held-out ({d.get('val_pairs')} pairs): reward accuracy {_f(d.get('val_reward_accuracy'), '{:.3f}')}, "
                      f"margin {_f(d.get('first_val_margin'), '{:+.4f}')} -> {_f(d.get('val_margin'), '{:+.4f}')}",
                      highlight=False)
        console.print(f"aligned vs CPT: general ppl {_f(a.get('ppl_general_regression_vs_cpt_pct'))} %, "
                      f"general task score regression {_f(a.get('general_regression_vs_cpt_pct'))} %", highlight=False)
    for g in summary.get("generation") or []:
        how = "chat template" if g["chat_template"] else "raw text"
        prompt = " / ".join(g["prompt"].splitlines())
        console.print(f"{g['model']} ({how}) <- {prompt}", highlight=False, markup=False)
        console.print(f"    -> {g['text']!r}   (reference: {g.get('reference')!r})", highlight=False, markup=False)
    acc = summary.get("generation_accuracy")
    if acc and acc.get("questions"):
        console.print(f"aligned answers to {acc['questions']} held-out product-category questions (greedy, chat "
                      f"template): exact match {acc['correct']}/{acc['questions']} = {100 * acc['exact_match']:.1f} % "
                      f"(chance {100 * acc['chance']:.1f} %, majority class {100 * acc['majority_rate']:.1f} %; CPT "
                      f"model before alignment {100 * acc['cpt']['exact_match']:.1f} %)", highlight=False)
    console.print(f"[bold]{summary['final_model']} vs base: domain_gain_pct {_f(summary['domain_gain_pct'])} %, "
                  f"general_regression_pct {_f(summary['general_regression_pct'])} %[/]")
    console.print(f"[bold green]done:[/] Hugging Face model in {summary['hf_dir']}; report {out / 'report.json'}")
