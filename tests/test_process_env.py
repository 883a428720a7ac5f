"""A model built in this process leaves the process environment as it found it (issue 21's "small things").

megatron-core's ``LanguageModule._set_attention_backend`` writes ``NVTE_{FLASH,FUSED,UNFUSED}_ATTN`` into
``os.environ`` for the model's attention backend and asserts them in the next model built; Lightning exports the
rendezvous variables of its one-process group. A caller that builds a model in process (the export's logits check,
an in-process run) and then launches a child with another attention backend (or builds a second model with one)
must not inherit them: :func:`ellama_recipes.engine.process_env.in_process_model` restores both.
"""

from __future__ import annotations

import os

import pytest

from ellama_recipes.engine.process_env import ATTENTION_ENV, DIST_ENV, in_process_model, scoped_env


def test_scoped_env_restores_set_changed_and_removed(monkeypatch):
    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    monkeypatch.delenv("NVTE_FLASH_ATTN", raising=False)
    with scoped_env(("NVTE_FUSED_ATTN", "NVTE_FLASH_ATTN")):
        os.environ["NVTE_FUSED_ATTN"] = "0"
        os.environ["NVTE_FLASH_ATTN"] = "1"
    assert os.environ["NVTE_FUSED_ATTN"] == "1" and "NVTE_FLASH_ATTN" not in os.environ


@pytest.mark.engine
def test_in_process_model_leaves_no_attention_or_rendezvous_variables(tiny_base, monkeypatch):
    """The export's logits check builds the engine model here (megatron sets NVTE_* for it); afterwards the
    environment is the one before, so a launched child or a second model with another backend is not refused."""
    from ellama_recipes.engine.checkpoint.parity import engine_batch_logits, load_engine_model

    for k in ATTENTION_ENV + DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    seen = {}

    def watching(ckpt):
        out = load_engine_model(ckpt)
        seen.update({k: os.environ.get(k) for k in ATTENTION_ENV})
        return out

    monkeypatch.setattr("ellama_recipes.engine.checkpoint.parity.load_engine_model", watching)
    out = engine_batch_logits(tiny_base, 4096)
    assert out["engine_logits"].shape[0] == 2
    assert any(v is not None for v in seen.values()), f"megatron set no NVTE_* variable while the model lived: {seen}"
    leaked = {k: os.environ[k] for k in ATTENTION_ENV + DIST_ENV if k in os.environ}
    assert not leaked, f"left in the environment after the in-process model: {leaked}"
