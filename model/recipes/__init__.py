"""Recipes that build complete model directories with xllm's own pipeline.

`python -m xllm.model.recipes.default_model --out DIR [--install]` builds the packaged default:
real pretrained parts (fetched by `xllm.model.pretrained`), frozen, bridged by X2L interfaces
that `xllm train` trains. `python -m xllm.model.recipes.toy_world --out DIR` builds a model whose
every part, the LLM included, is trained from nothing on the toy world.
"""
