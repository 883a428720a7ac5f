"""Run `python -m ellama_recipes ARGS...`, but SIGKILL the run's own process group right after the metrics record of
step KILL_AFTER is written: a node failure at an exact step (the trainer, its data-loader workers and
multiprocessing's resource tracker all at once). Polling metrics.jsonl from outside could miss the step on a fast
host and kill later or after the run ended.

    python tools/kill_at_step.py KILL_AFTER pretrain --size tiny ...

Start it in its own session (``start_new_session=True``) so the kill takes nothing of the caller's. Used by
tests/test_pretrain_cpu.py and the GPU proof kit (benchmarks/gpu/proof.py).
"""

if __name__ == "__main__":  # a spawned child (checkpoint writer, data workers) re-imports this file: run nothing there
    import os
    import signal
    import sys

    from ellama_recipes.engine import callbacks

    kill_after = int(sys.argv[1])
    upstream = callbacks.MetricsJsonl.on_train_batch_end

    def on_train_batch_end(self, trainer, *args, **kwargs):
        upstream(self, trainer, *args, **kwargs)
        if trainer.global_step >= kill_after:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    callbacks.MetricsJsonl.on_train_batch_end = on_train_batch_end
    from ellama_recipes.cli.main import main

    sys.exit(main(sys.argv[2:]))
