"""Serving with vLLM: the general plugin (docs/vllm.md).

* ``plugin``: the entry point vLLM calls in each process (``vllm.general_plugins``); inert unless the
  engine's ``additional_config`` has an ``era`` section.
* ``config``: that section read as an ERAConfig at K = 0, refusing by name what vLLM cannot honour.
* ``llava``: the processor (kept-token placeholders) and model (selection, the ``log b`` column) for
  vLLM's ``LlavaForConditionalGeneration``.
* ``selection``: ERA (and every strategy) at K = 0 through a vLLM decoder layer's own modules, calling
  the HF path's selection and recycling functions.
* ``attention``: LAR in vLLM's CPU attention, the bias carried in a padded head dimension.
* ``offline``: tiny random-init models vLLM loads from a folder, written with no network.

Only ``config`` imports without vLLM (the main suite tests it); the rest run in scripts/test-vllm.sh's
environment.
"""
