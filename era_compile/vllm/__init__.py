"""Serving with vLLM (issue 29, in progress): the pieces built so far.

* ``config``: the ``era`` section of vLLM's ``additional_config``, read as an ERAConfig at K = 0.
* ``offline``: tiny random-init models vLLM loads from a folder, written with no network.
* ``selection``: ERA (and every strategy) at K = 0 through a vLLM decoder layer's own modules, the
  same anchors as the Hugging Face path (tests_vllm/test_selection.py). Not yet called by vLLM.

No vLLM plugin is registered yet: nothing here changes what vLLM does. scripts/test-vllm.sh runs the
vLLM tier (tests_vllm/) in its own environment.
"""
