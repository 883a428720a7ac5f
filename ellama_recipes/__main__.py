import sys

from ellama_recipes.cli.main import main

# Guarded: NeMo-Run's fdl_runner re-imports the launching process's __main__ in every torchrun rank
# (nemo_run.run.experiment.maybe_load_external_main); unguarded, `python -m ellama_recipes` ran the CLI there.
if __name__ == "__main__":
    sys.exit(main())
