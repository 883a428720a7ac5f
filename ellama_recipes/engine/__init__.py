"""The engine room: the only package that imports NeMo (nemo.collections.llm, nemo.lightning) and megatron-core.

Importing this package imports nothing heavy; each module imports NeMo when it is imported itself.
"""
