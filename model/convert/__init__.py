"""Converters from the formats small pretrained models are shipped in to HF model directories.

One module per source format, each a few plain functions (read, map names, save):

    gguf_llm      GGUF causal LM (llama.cpp)          -> HF causal LM + tokenizer
    ct2_whisper   CTranslate2 Whisper (faster-whisper) -> WhisperForConditionalGeneration
    onnx_dinov2   ONNX export of a DINOv2 backbone    -> Blip2VisionModel (xllm's vision tower)

`xllm.model.pretrained` pins the packages these files come in and caches the converted
directories. Heavy imports (`gguf`, `onnx`) happen inside the converters, so importing this
package costs nothing.
"""
