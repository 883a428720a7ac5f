"""Where the bundled sample data lives (package data, found with :mod:`importlib.resources`).

``ellama_recipes/sample_data/`` ships in the wheel (``[tool.setuptools.package-data]``); its generator is not
runtime code and lives outside the package, in ``tools/make_sample.py``::

    python tools/make_sample.py            # rewrites ellama_recipes/sample_data/ (deterministic)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def sample_dir() -> Path:
    """Folder of the bundled sample (``domain/``, ``general/``, ``bad/``) inside the installed package."""
    root = files("ellama_recipes") / "sample_data"
    path = Path(str(root))
    if not path.is_dir():  # e.g. a zipped install: package data has no folder on disk
        raise FileNotFoundError(f"the bundled sample is not a folder on disk ({root}); install ellama-recipes "
                                "unzipped (pip install, not a zipapp)")
    return path
