"""The data pipeline (`ellama data ...`, issue 3): raw listings, reviews and open text to a token-exact blended
Megatron dataset.

Stages (each a module and a subcommand; :func:`ellama_recipes.data.pipeline.build` runs them all):

- :mod:`~ellama_recipes.data.records`  reading JSONL/Parquet, schema validation, rendering records to text
- :mod:`~ellama_recipes.data.clean`    NFKC, HTML/boilerplate strip, filters, exact + MinHash-LSH dedup, language id
  (imports records; records imports nothing of the pipeline)
- :mod:`~ellama_recipes.data.serialize` EcomGPT-CT graph mix / separate samples
- :mod:`~ellama_recipes.data.classify` domain classifier (scikit-learn hashed 1-2 grams + MultinomialNB, cross-fitted)
- :mod:`~ellama_recipes.data.mine`    streaming mining by budget (fraction / tokens / threshold), report, histogram
- :mod:`~ellama_recipes.data.tokenize` HF tokenizer -> Megatron .bin/.idx (streaming, multi-process)
- :mod:`~ellama_recipes.data.blend`    token-aware weights, realized ratios via Megatron's blending index
- :mod:`~ellama_recipes.data.manifest` ``manifest.json`` and ``*.source.json``: write, read, validate
- :mod:`~ellama_recipes.data.tokenizer_train` the Llama-3-style tokenizer for the tiny size
- :mod:`~ellama_recipes.data.bundled`  where the bundled sample lives (``sample_dir()``; generator: ``tools/make_sample.py``)

Python::

    from ellama_recipes.data.pipeline import build
    manifest = build([Path("raw/domain")], [Path("raw/general")], "tok/", Path("data"), ratio="1:1")
"""
