"""GPU-host shim (run.sh puts this folder on PYTHONPATH): megatron-core 0.15.3 pins numpy<2 and still calls
``np.product`` (removed in numpy 2.0) in dist_checkpointing (mapping.py, validation.py, exchange_utils.py), i.e. on
every checkpoint save/load. The GPU image's numpy is 2.x and its pandas / scipy / pyarrow are built against it, so
numpy 1.x cannot be carried; ``np.product`` is restored as ``np.prod`` (same function) instead. proof.py reports it."""

try:
    import numpy as _np

    if not hasattr(_np, "product"):
        _np.product = _np.prod
except ImportError:  # pragma: no cover
    pass
