"""The files every stage shares: atomic writes, the run folder contract, metrics.jsonl, the safetensors codec.

Plain Python (no NeMo, no torch at import): every floor of the package may import it, and it imports nothing of
the package but :mod:`ellama_recipes.errors`.
"""
