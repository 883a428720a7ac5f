"""The DPO stage recipe as a config (no NeMo import): defaults and their sources, validation, registry."""

from __future__ import annotations

import json

import pytest

from ellama_recipes.errors import ConfigError, UserError
from ellama_recipes.recipes import get_recipe
from ellama_recipes.recipes.dpo import DPOConfig, build_config
from ellama_recipes.model.sizes import SIZES

CONTRACT = ("lr", "min_lr", "global_batch_size", "micro_batch_size", "seq_length", "train_steps", "tensor_parallel",
            "pipeline_parallel", "context_parallel", "data_parallel", "precision", "beta", "sft_loss_weight")


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_builds_a_valid_dpo_config(size):
    cfg = build_config(size)
    assert cfg.problems() == []
    s = cfg.summary()
    assert all(k in s for k in CONTRACT), [k for k in CONTRACT if k not in s]
    assert s["context_parallel"] == 1
    assert s["world_size"] == s["tensor_parallel"] * s["pipeline_parallel"] * s["data_parallel"]
    assert s["global_batch_size"] % (s["micro_batch_size"] * s["data_parallel"]) == 0
    json.dumps(s)


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_real_sizes_use_the_llama3_dpo_hyperparameters(size):
    s = build_config(size).summary()
    assert (s["lr"], s["beta"], s["sft_loss_weight"]) == (1e-5, 0.1, 0.2)  # Llama 3 paper 4.1.4
    # Tulu 3 DPO: 128 pairs of 2048 tokens (405b: PP18 interleaved needs whole micro batches per stage -> 144)
    assert (s["global_batch_size"], s["seq_length"]) == (144 if size == "405b" else 128, 2048)
    assert s["precision"] == "bf16-mixed"


def test_flags_and_overrides_reach_the_dpo_config(tmp_path):
    cfg = build_config("tiny", restore_from=str(tmp_path / "sft"), data_dir=str(tmp_path / "d"),
                       out_dir=str(tmp_path / "dpo"), train_steps=7, save_every=3,
                       overrides=["loss.beta=0.25", "loss.sft_loss_weight=0"])
    assert (cfg.loss.beta, cfg.loss.sft_loss_weight) == (0.25, 0.0)
    assert (cfg.schedule.train_steps, cfg.checkpoint.save_every) == (7, 3)
    assert cfg.data.data_dir == str(tmp_path / "d") and cfg.checkpoint.out_dir == str(tmp_path / "dpo")
    assert get_recipe("dpo").config_cls is DPOConfig and get_recipe("dpo").run_name == "dpo"


@pytest.mark.parametrize(
    "override, needle",
    [("loss.beta=0", "loss.beta"), ("loss.sft_loss_weight=-1", "loss.sft_loss_weight"),
     ("parallel.context_parallel=2", "context_parallel")],
)
def test_bad_dpo_settings_are_refused_with_the_fix(override, needle):
    cfg = build_config("8b", overrides=[override])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert needle in str(err.value) + " ".join(getattr(err.value, "problems", []) or [])


def test_launch_needs_the_sft_checkpoint_and_the_pairs():
    cfg = build_config("tiny")
    problems = " ".join(cfg.problems(at_launch=True))
    assert "--from" in problems and "data.data_dir" in problems
    with pytest.raises(UserError):
        build_config("tiny", overrides=["loss.betta=0.2"])


def test_val_batches_count_full_global_batches(tmp_path):
    (tmp_path / "validation.jsonl").write_text("{}\n" * 21)
    cfg = build_config("tiny", data_dir=str(tmp_path))  # global batch 8 pairs
    assert cfg.val_batches() == 2 and cfg.summary()["val_batches"] == 2
