"""xllm: X-LLM multimodal chat (image, video, speech into a frozen GLM) and its inference server."""

__version__ = "0.1.0"
