"""The CLI surface: every command has --help with an example; user mistakes exit 2 without a traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer

REQUIRED = {"pretrain", "align", "export-hf", "import-hf", "data", "eval", "plan", "quickstart"}


def _all_commands():
    import ellama_recipes.cli.main  # noqa: F401  (registers the command modules on the app)
    from ellama_recipes.cli.app import app

    root = typer.main.get_command(app)
    paths = []

    def walk(cmd, prefix):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, prefix + [name])
        if prefix:
            paths.append(prefix)

    walk(root, [])
    return paths


def test_root_help_lists_required_commands(cli):
    r = cli("--help")
    assert r.code == 0
    for name in REQUIRED:
        assert name in r.out, name


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p))
def test_every_command_help_has_an_example(cli, path):
    r = cli(*path, "--help")
    assert r.code == 0, r.err
    assert "Example" in r.out, f"`ellama {' '.join(path)} --help` shows no example"
    # each example on its own line (the help formatter joins lines that are not separated by a blank line)
    paragraphs = re.split(r"\n\s*\n", r.out)
    joined = [" ".join(p.split()) for p in paragraphs if len(re.findall(r"Examples?:", p)) > 1]
    assert not joined, f"`ellama {' '.join(path)} --help` runs examples together: {joined}"


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ellama_recipes", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "ellama-recipes" in out.stdout


def test_unknown_size_exit_2(cli):
    r = cli("pretrain", "--size", "13b", "--dryrun")
    assert r.code == 2 and "Valid sizes: tiny, 8b, 70b, 405b" in r.err and "Traceback" not in r.err


def test_invalid_parallelism_exit_2_lists_every_problem(cli):
    r = cli("pretrain", "--size", "70b", "--dryrun", "parallel.pipeline_parallel=3", "schedule.seq_length=8190")
    assert r.code == 2
    assert "num_layers=80" in r.err and "2*CP" in r.err
    assert "Traceback" not in r.err


def test_unknown_override_key_exit_2_with_close_match(cli):
    r = cli("pretrain", "--size", "8b", "--dryrun", "schedule.lr_fractoin=0.2")
    assert r.code == 2 and "schedule.lr_fraction" in r.err


def test_launch_without_manifest_is_a_clear_error(cli):
    r = cli("pretrain", "--size", "tiny")
    assert r.code == 2 and "data.manifest is not set" in r.err


@pytest.mark.parametrize("capability,needle", [(None, "no CUDA device is visible"), ((8, 0), "this GPU is sm_80")])
def test_fp8_launch_without_hopper_is_a_clear_error(cli, tmp_path, monkeypatch, capability, needle):
    """Independent of the host's GPU: the launch check reads the probed capability (None = no CUDA device)."""
    from ellama_recipes.config import rules

    monkeypatch.setattr(rules, "local_gpu_capability", lambda: capability)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    r = cli("pretrain", "--size", "8b", "--fp8", "--data", manifest, "--from-scratch")
    assert r.code == 2 and "precision.mode=fp8 needs" in r.err and needle in r.err, r.err
    assert "Traceback" not in r.err


def test_missing_manifest_file_exit_2(cli, tmp_path):
    r = cli("pretrain", "--size", "tiny", "--data", tmp_path / "nope.json", "--from", tmp_path)
    assert r.code == 2 and "no such file" in r.err


def test_usage_error_exit_2(cli):
    r = cli("pretrain", "--nodes", "2")  # --size missing
    assert r.code == 2


def test_bad_paths_fail_fast_before_nemo_is_imported(tmp_path):
    """A real launch with a missing --data / --from fails in a fresh process in < 2 s, without importing NeMo."""
    import time

    code = (
        "import sys, time; t = time.time(); from ellama_recipes.cli.main import main; "
        f"rc = main(['pretrain', '--size', 'tiny', '--data', {str(tmp_path / 'no.json')!r}, "
        f"'--from', {str(tmp_path / 'nockpt')!r}, '--out', {str(tmp_path / 'run')!r}]); "
        "print('RC', rc, 'NEMO', 'nemo' in sys.modules, 'T', time.time() - t)"
    )
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    words = out.stdout.split()
    assert words[:4] == ["RC", "2", "NEMO", "False"], out.stdout + out.stderr
    assert float(words[5]) < 2.0 and time.time() - t0 < 10
    assert "no such file" in out.stderr and "no such checkpoint" in out.stderr
    assert not (tmp_path / "run").exists()


def test_model_override_with_from_exit_2(cli, tmp_path):
    r = cli("pretrain", "--size", "tiny", "--from", tmp_path, "--dryrun", "model.hidden_size=256")
    assert r.code == 2 and "model.hidden_size=256" in r.err and "--from checkpoint" in r.err


def test_local_multi_node_launch_needs_the_rendezvous_env(cli, tmp_path, monkeypatch):
    for key in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    r = cli("pretrain", "--size", "tiny", "--nodes", "2", "--data", manifest, "--from-scratch", "--out", tmp_path / "r")
    assert r.code == 2 and "NODE_RANK, MASTER_ADDR, MASTER_PORT is not set" in r.err and "--executor slurm" in r.err
    assert not (tmp_path / "r").exists()
