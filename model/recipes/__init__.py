"""Recipes that build complete model directories from nothing with xllm's own pipeline.

`python -m xllm.model.recipes.toy_world --out DIR` pre-trains the frozen components of the toy
world (a small BLIP-2 vision tower, a small Whisper encoder, a small GLM with its tokenizer) and
then trains the X2L interfaces with `xllm train` stages 1-3; the result is the shipped demo model.
"""
