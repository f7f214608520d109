"""The ``dam-compile`` command (``main``), its demo on a tiny Llama (``demo``, ``tiny_llama``) and the model
specs it builds from (``model_specs``)."""
