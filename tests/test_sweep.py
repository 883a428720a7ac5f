"""`ellama sweep` without training: grid parsing, re-blending, Pareto front and recommendation, chart, dry run.

The end-to-end 2 x 2 CPU sweep (real training, interruption, resume) is tests/test_sweep_cpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ellama_recipes.workflows import sweep as S
from ellama_recipes.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "ellama_recipes" / "sample_data"


# --------------------------------------------------------------------------------------------------------- grid
def test_grid_flags_parse_and_name_points():
    assert S.parse_lr_fractions("0.05,0.1,0.2") == [0.05, 0.1, 0.2]
    assert S.parse_lr_fractions(["0.05", "0.1,0.2"]) == [0.05, 0.1, 0.2]
    assert S.parse_ratios("4:1,1:1,1:4") == ["4:1", "1:1", "1:4"]
    assert S.parse_ratios(["4:1", " 1:4 "]) == ["4:1", "1:4"]
    assert S.point_name(0.05, "4:1") == "lr0.05_r4-1"
    assert S.point_name(0.1, "1:1") == "lr0.1_r1-1"
    assert S.parse_max_regression("1%") == 1.0 and S.parse_max_regression("0.5") == 0.5
    for bad in ("0", "1.5", "x", "0.1,0.1", ""):
        with pytest.raises(UserError):
            S.parse_lr_fractions(bad)
    for bad in ("4", "4:0", "1:1,2:2", "a:b", "-1:1"):
        with pytest.raises(UserError):
            S.parse_ratios(bad)
    with pytest.raises(UserError):
        S.parse_max_regression("-1")


def test_grid_points_change_exactly_the_two_knobs(tmp_path):
    spec = S.SweepSpec(size="8b", restore_from=None, out=tmp_path / "sw", lr_fractions=[0.05, 0.2],
                       ratios=["4:1", "1:4"], data_domain=[SAMPLE / "domain"], data_general=[SAMPLE / "general"],
                       tokenizer=tmp_path, steps=100)
    base = S.recipe_config(spec)
    points = S.grid(spec)
    assert [p.name for p in points] == ["lr0.05_r4-1", "lr0.05_r1-4", "lr0.2_r4-1", "lr0.2_r1-4"]
    for p in points:
        diff = S.config_differences(base, p.cfg)
        assert set(diff) == {"schedule.lr_fraction", "schedule.lr (derived)", "data.manifest", "checkpoint.out_dir"}
        assert diff["schedule.lr_fraction"][1] == p.lr_fraction
        assert p.cfg.schedule.lr == pytest.approx(p.lr_fraction * base.schedule.base_max_lr)
        assert p.cfg.data.manifest == str(tmp_path / "sw" / "blends" / S.ratio_slug(p.ratio) / "manifest.json")
        assert p.cfg.checkpoint.out_dir == str(tmp_path / "sw" / "runs" / p.name)
        assert p.cfg.schedule.train_steps == 100


# ------------------------------------------------------------------------------------------------------ reblend
def test_reblended_manifests_hit_their_ratios_without_retokenizing(tiny_data, tmp_path):
    from ellama_recipes.data.blend import parse_ratio
    from ellama_recipes.data.manifest import load_manifest
    from ellama_recipes.data.reblend import non_english_share, reblend
    from ellama_recipes.data.indexed import read_back

    src = load_manifest(tiny_data / "manifest.json")
    src_bins = {p: Path(p + ".bin").stat().st_mtime_ns for p in src["train_blend"][1::2]}
    q = non_english_share(json.loads((tiny_data / "manifest.json").read_text()))
    assert 0.05 < q < 0.15  # the fixture was built with --non-english 0.10
    for ratio in ("4:1", "1:1", "1:4"):
        out = tmp_path / "blends" / S.ratio_slug(ratio)
        m = reblend(tiny_data / "manifest.json", ratio, out)
        target = parse_ratio(ratio)
        got = m["realized"]["general_to_domain_token_ratio"]
        assert abs(got - target) / target <= 0.02, (ratio, got)
        assert abs(m["realized"]["non_english_share_of_general"] - q) <= 0.02
        loaded = load_manifest(out / "manifest.json")  # what training reads
        assert set(loaded["train_blend"][1::2]) == set(src_bins)  # the very same .bin/.idx files
        # the weights really are the ratio: general weight / domain weight, by side, from the written file
        side = {s["prefix"]: s["side"] for s in m["sources"]}
        w = {"domain": 0.0, "general": 0.0}
        for weight, pre in zip(m["blend"][0::2], m["blend"][1::2]):
            w[side[pre]] += weight
        assert w["general"] / w["domain"] == pytest.approx(target, rel=1e-6)
        # token counts in the manifest are the files' own (read back through megatron-core), nothing re-tokenized
        for s in m["sources"]:
            assert read_back(str((out / s["prefix"]).resolve()))["tokens"] == s["tokens"]
        assert not list(out.rglob("*.bin")) and not list(out.rglob("*.idx"))
        assert json.loads((out / "reblend.json").read_text())["ratio"] == ratio
    assert {p: Path(p + ".bin").stat().st_mtime_ns for p in src_bins} == src_bins


def test_reblend_refuses_a_manifest_whose_data_moved(tiny_data, tmp_path):
    from ellama_recipes.data.reblend import reblend

    m = json.loads((tiny_data / "manifest.json").read_text())
    m["blend"][1] = m["sources"][0]["prefix"] = "tokenized/nowhere"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="nowhere"):
        reblend(tmp_path / "manifest.json", "1:1", tmp_path / "out")


# ------------------------------------------------------------------------------------ fabricated run folders
BASE = {"val_loss_domain": 2.0, "val_loss_general": 1.0}
# name -> (final domain, final general); domain gain % = 100 * (2 - d) / 2, general regression % = 100 * (g - 1)
FABRICATED = {
    "lr0.05_r4-1": (1.90, 1.002),  # gain 5 %, regression 0.2 %
    "lr0.05_r1-4": (1.80, 1.008),  # gain 10 %, regression 0.8 %
    "lr0.2_r4-1": (1.70, 1.030),  # gain 15 %, regression 3 %
    "lr0.2_r1-4": (1.85, 1.020),  # gain 7.5 %, regression 2 %: beaten on both axes by lr0.05_r1-4
}


def _write_metrics(run: Path, recs: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def _fabricated_sweep(tmp_path: Path, unfinished: str | None = None) -> tuple[S.SweepSpec, list[S.SweepPoint]]:
    spec = S.SweepSpec(size="tiny", restore_from=None, out=tmp_path / "sw", lr_fractions=[0.05, 0.2],
                       ratios=["4:1", "1:4"], data=tmp_path / "manifest.json", steps=20)
    points = S.grid(spec)
    _write_metrics(spec.out / "base", [{"step": 0, **BASE}])
    for p in points:
        d, g = FABRICATED[p.name]
        recs = [{"step": s, "train_loss": 3.0, "lr": 1e-3, "step_time_s": 0.5} for s in range(1, 21)]
        recs[9].update(val_loss_domain=d - 0.05, val_loss_general=g + 0.01)  # step 10: best domain, worse general
        if p.name != unfinished:
            recs[19].update(val_loss_domain=d, val_loss_general=g)
        else:
            recs = recs[:15]
        _write_metrics(p.run_dir, recs)
    return spec, points


def test_recommendation_and_pareto_front_on_fabricated_metrics(tmp_path):
    spec, points = _fabricated_sweep(tmp_path)
    result = S.sweep_result(spec, points, S.base_values(spec.out / "base"))
    assert result["base"]["val_loss_domain"] == 2.0 and result["unfinished"] == []
    assert result["pareto_front"] == ["lr0.05_r4-1", "lr0.05_r1-4", "lr0.2_r4-1"]
    assert result["recommended"] == "lr0.05_r1-4"
    e = {x["name"]: x for x in result["points"]}["lr0.05_r1-4"]
    assert e["knobs"] == {"lr_fraction": 0.05, "lr": pytest.approx(0.05 * points[0].cfg.schedule.base_max_lr),
                          "ratio": "1:4", "general_to_domain": 0.25}
    assert e["val_loss_domain"]["final"] == 1.80 and e["val_loss_domain"]["best"] == pytest.approx(1.75)
    assert e["val_loss_general"]["final"] == 1.008 and e["val_loss_general"]["best"] == 1.008
    assert e["val_loss_domain"]["change"] == pytest.approx(-0.2)
    assert e["domain_gain_pct"] == pytest.approx(10.0) and e["general_regression_pct"] == pytest.approx(0.8)
    assert e["tokens_seen"] == 20 * points[0].cfg.schedule.tokens_per_step
    assert e["wall_time_s"] == pytest.approx(10.0) and e["status"] == "finished"
    # the budget moves the pick
    finished = result["points"]
    assert S.recommend(finished, 0.5)[0] == "lr0.05_r4-1"
    assert S.recommend(finished, 5.0)[0] == "lr0.2_r4-1"
    name, why = S.recommend(finished, 0.1)
    assert name is None and "0.20%" in why and "lr0.05_r4-1" in why


def test_unfinished_point_is_reported_not_ranked(tmp_path):
    spec, points = _fabricated_sweep(tmp_path, unfinished="lr0.05_r1-4")
    result = S.sweep_result(spec, points, S.base_values(spec.out / "base"))
    assert result["unfinished"] == ["lr0.05_r1-4"]
    assert S.point_status(spec.out / "runs" / "lr0.05_r1-4", 20) == ("partial", 15)
    assert result["recommended"] == "lr0.05_r4-1"  # the next best within 1 %
    assert "lr0.05_r1-4" not in result["pareto_front"]


# ---------------------------------------------------------------------------------------------------- chart
def _markers(png: Path, color: str) -> int:
    from PIL import Image
    from scipy import ndimage

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    mask = np.abs(img - rgb).sum(axis=2) <= 30
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return int((sizes >= 20).sum())  # whole markers, not antialiased specks of a line


@pytest.mark.parametrize("unfinished", [None, "lr0.2_r1-4"])
def test_chart_is_a_png_with_one_marker_per_finished_run(tmp_path, unfinished):
    spec, points = _fabricated_sweep(tmp_path, unfinished=unfinished)
    result = S.sweep_result(spec, points, S.base_values(spec.out / "base"))
    png = tmp_path / "sweep.png"
    drawn = S.write_chart(result, png)
    expected = 4 - (unfinished is not None)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == expected
    assert _markers(png, S.POINT_COLOR) == expected + 1  # one marker per run, plus the legend's


# ------------------------------------------------------------------------------------------------------ CLI
def test_dryrun_prints_grid_differences_tokens_and_gpu_hours(cli, tmp_path):
    from ellama_recipes.workflows.plan import compute_plan

    out = tmp_path / "sw"
    r = cli("sweep", "--size", "8b", "--data-domain", SAMPLE / "domain", "--data-general", SAMPLE / "general",
            "--tokenizer", tmp_path, "--out", out, "--lr-fraction", "0.05,0.1,0.2", "--ratio", "4:1,1:1,1:4",
            "--steps", "100", "--dryrun")
    assert r.code == 0, r.err
    text = " ".join(r.out.split())
    for name in ("lr0.05_r4-1", "lr0.1_r1-1", "lr0.2_r1-4"):
        assert name in r.out
    spec = S.SweepSpec(size="8b", restore_from=None, out=out, lr_fractions=[0.1], ratios=["1:1"],
                       data_domain=[SAMPLE / "domain"], data_general=[SAMPLE / "general"], tokenizer=tmp_path,
                       steps=100)
    plan = compute_plan(S.grid(spec)[0].cfg)
    assert f"total tokens: {9 * plan['tokens']:,}" in text
    assert f"{9 * plan['gpu_hours']:,.6g}" in text
    assert "schedule.lr_fraction: 0.1 -> 0.05" in text
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, needle", [
    (["--data", "M", "--data-domain", "D"], "not both"),
    ([], "no data"),
    (["--data", "M", "schedule.lr_fraction=0.3"], "schedule.lr_fraction is set by the sweep"),
    (["--data", "M", "--ratio", "4:0"], "4:0"),
])
def test_bad_sweep_input_exits_2(cli, tmp_path, args, needle):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    args = [str(manifest) if a == "M" else a for a in args]
    r = cli("sweep", "--size", "tiny", "--out", tmp_path / "sw", *args, "--dryrun")
    assert r.code == 2
    assert needle in " ".join(r.err.split())


def test_help_has_an_example(cli):
    r = cli("sweep", "--help")
    assert r.code == 0 and "ellama sweep --size" in r.out


def test_slurm_dryrun_materializes_one_sbatch_job_per_point_plus_the_base_pass(tmp_path):
    spec = S.SweepSpec(size="8b", restore_from=None, out=tmp_path / "sw", lr_fractions=[0.05, 0.2],
                       ratios=["4:1", "1:4"], data_domain=[SAMPLE / "domain"], data_general=[SAMPLE / "general"],
                       tokenizer=tmp_path, steps=100, executor="slurm", overrides=["cluster.slurm_account=llm"])
    plan = S.dryrun_plan(spec)
    assert list(plan["launch"]) == ["base", "lr0.05_r4-1", "lr0.05_r1-4", "lr0.2_r4-1", "lr0.2_r1-4"]
    nodes = S.grid(spec)[0].cfg.cluster.num_nodes
    for name, script in plan["launch"].items():
        assert script.startswith("#!/bin/bash") and f"#SBATCH --nodes={nodes}" in script
        assert f"fdl_runner -n {name} " in script  # its own task
        assert str(spec.out.absolute() / "nemo_run") in script  # the sweep's NeMo-Run folder
    assert not spec.out.exists()
    # the base pass is the recipe's own partial with llm.validate in place of llm.pretrain, nothing else changed
    from ellama_recipes.engine import experiment as E
    from ellama_recipes.recipes import get_recipe

    cfg = S.base_point(spec, S.grid(spec)).cfg
    train = get_recipe("pretrain").build_partial(cfg)
    val = E.validate_partial(cfg, get_recipe("pretrain").build_partial(cfg))
    assert val.__fn_or_cls__ is E.validate and train.__fn_or_cls__ is not E.validate
    assert set(val.__arguments__) == set(train.__arguments__)
    for key in train.__arguments__:
        assert repr(val.__arguments__[key]) == repr(train.__arguments__[key]), key


def test_rerun_on_slurm_does_not_resubmit_points_still_in_the_queue(tiny_data, tmp_path):
    spec, points = _fabricated_sweep(tmp_path, unfinished="lr0.2_r1-4")
    ckpt = tmp_path / "ckpt"
    (ckpt / "weights").mkdir(parents=True)
    (ckpt / "context").mkdir()
    spec.restore_from, spec.executor, spec.data = ckpt, "slurm", tiny_data / "manifest.json"
    (spec.out / S.SUBMITTED).write_text(json.dumps({"jobs": {"lr0.2_r1-4": "ellama-sweep_123"}}))
    messages = []
    result = S.run_sweep(spec, echo=messages.append)
    assert result["launched"] == {"jobs": [], "waiting": ["lr0.2_r1-4"]}  # nothing submitted
    assert result["unfinished"] == ["lr0.2_r1-4"] and result["recommended"] == "lr0.05_r1-4"
    assert any("ellama-sweep_123" in m and S.SUBMITTED in m for m in messages)
    assert (spec.out / "sweep.png").is_file()


def test_build_mode_builds_the_data_once_then_reblends_each_ratio(tiny_hf, tmp_path):
    spec = S.SweepSpec(size="tiny", restore_from=None, out=tmp_path / "sw", lr_fractions=[0.1], ratios=["4:1", "1:4"],
                       data_domain=[SAMPLE / "domain"], data_general=[SAMPLE / "general"], tokenizer=tiny_hf, steps=4)
    points = S.grid(spec)
    S.prepare_blends(spec, points, echo=lambda m: None)
    built = spec.out / "data" / "manifest.json"
    assert built.is_file() and spec.source_manifest == built
    stamp = built.stat().st_mtime_ns
    for p in points:
        m = json.loads(p.manifest.read_text())
        assert json.loads((p.manifest.parent / "reblend.json").read_text())["from"] == str(built.absolute())
        assert abs(m["realized"]["general_to_domain_token_ratio"] - p.general_to_domain) / p.general_to_domain <= 0.02
    S.prepare_blends(spec, points, echo=lambda m: None)  # a re-run reuses the built data
    assert built.stat().st_mtime_ns == stamp
