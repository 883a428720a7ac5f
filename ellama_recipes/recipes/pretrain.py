"""Continued pretraining of Llama 3.1 (e-Llama recipe), one shared base for every size.

Tuned for: H100 80GB SXM nodes, 8 GPUs per node with NVLink, InfiniBand between nodes (see sizes.py for the per-size
parallelism and its memory justification). CLI:

    ellama pretrain --size 70b --nodes 60 --dryrun
    ellama pretrain --size 8b --fp8 --executor slurm slurm_account=... --dryrun
    ellama pretrain --size tiny --from checkpoints/tiny --data data/manifest.json --out runs/cpt

``pretrain_recipe(cfg)`` returns the ``nemo_run.Partial`` wrapping ``nemo.collections.llm.pretrain``; the engine
(ellama_recipes.engine.nemo_recipe) owns every NeMo object in it.
"""

from __future__ import annotations

from typing import Any

from ellama_recipes.recipe import PretrainConfig
from ellama_recipes.recipes import register


@register("pretrain")
def pretrain_recipe(cfg: PretrainConfig) -> Any:
    from ellama_recipes.engine.nemo_recipe import build_pretrain_partial

    return build_pretrain_partial(cfg)
