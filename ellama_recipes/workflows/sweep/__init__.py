"""`ellama sweep`: e-Llama's small-scale search over the max-LR fraction x the general:domain mix ratio.

CLI::

    ellama sweep --size tiny --from base/ --data data/manifest.json --out sweep/ \\
        --lr-fraction 0.05,0.1,0.2 --ratio 4:1,1:1,1:4 --steps 40

Every grid point is one continued-pretraining run of the registered ``pretrain`` recipe with exactly two knobs
changed: ``schedule.lr_fraction`` and the blend (``data.manifest``, re-weighted from the already tokenized sources
by :func:`ellama_recipes.data.reblend.reblend`, never re-tokenized). All runs form one NeMo-Run ``Experiment``
(:mod:`ellama_recipes.engine.experiment`; grid, results and runner here): on the local executor sequentially or ``--parallel K`` at a time,
on Slurm one job per point. A world-size-1 local point's task is :func:`train_point` (the base pass:
:func:`validate_point`) in a fresh process, which rebuilds the config and the recipe's partial from JSON there; every
other task is the recipe's partial built here. Output folder::

    OUT/data/                  only with --data-domain/--data-general: the data built once (`ellama data build`)
    OUT/blends/r<G>-<D>/       manifest.json (+ reblend.json) for each ratio
    OUT/base/metrics.jsonl     the --from checkpoint's per-source validation loss before any step (step 0)
    OUT/runs/<name>/           one run folder per point (checkpoints/, metrics.jsonl, logs/), name lr<F>_r<G>-<D>
    OUT/sweep.json             per point: knobs, final/best val_loss_domain and val_loss_general, their change from
                               the base values, tokens seen, wall time; the Pareto front and the recommendation
    OUT/sweep.png              general loss increase (x) vs domain loss decrease (y), Pareto front drawn

Re-running the same command skips finished points (a validation record at the final step in metrics.jsonl) and
resumes unfinished ones from their last complete checkpoint (the pretrain recipe's own resume).

The recommendation is the point with the largest domain gain (relative decrease of ``val_loss_domain`` from the
base) whose general regression (relative increase of ``val_loss_general``) stays within ``--max-regression``
(default 1 %).
"""

from ellama_recipes.io.charts import FRONT_COLOR, POINT_COLOR, RECOMMENDED_COLOR  # noqa: F401
from ellama_recipes.io.charts import sweep_front as write_chart  # noqa: F401
from ellama_recipes.io.metrics import read_metrics  # noqa: F401
from ellama_recipes.workflows.sweep.grid import (  # noqa: F401
    DEFAULT_MAX_REGRESSION_PCT, SWEPT_KEYS, SweepPoint, SweepSpec, base_point, build_config, check_spec,
    config_differences, grid, parse_lr_fractions, parse_max_regression, parse_ratios, point_name, ratio_slug,
    recipe_config,
)
from ellama_recipes.workflows.sweep.results import (  # noqa: F401
    base_values, collect_point, pareto_front, point_status, recommend, sweep_result,
)
from ellama_recipes.workflows.sweep.runner import (  # noqa: F401
    SUBMITTED, dryrun_plan, prepare_blends, run_sweep, submitted_jobs, sweep_job, train_point, validate_point,
)
