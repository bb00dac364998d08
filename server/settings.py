"""Server settings: `XLLM_*` environment variables, overridden by `xllm serve` flags."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from xllm.model.config import LLMBackend, Quantize, torch_load_for_backend

if TYPE_CHECKING:
    from xllm.server.engine.config import EngineConfig
    from xllm.server.files import FileLimits
    from xllm.server.serving import ServingLimits


def _split_list(value: object) -> object:
    """'a,b' (flag or env var) -> ['a', 'b']; lists pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XLLM_", extra="forbid", env_ignore_empty=True)

    model: Path | None = Field(
        None,
        description="model directory; default: the packaged default model (its pretrained "
        "parts are fetched into $XLLM_HOME on first use)",
    )
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    quantize: Quantize = Field("none", description="weight quantization of the LLM")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the model's compute dtype"
    )
    max_batch: int = Field(32, ge=1, description="sequences decoding together (KV slots)")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond --max-batch before 429")
    max_model_len: int | None = Field(
        None, ge=16, description="context per KV slot; default: the model's, at most 8192"
    )
    prefill_chunk: int = Field(512, ge=16, description="prompt positions per prefill step")
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="max_tokens when a request gives none; default: the model's own "
        "(xllm.json sampling.max_tokens)",
    )
    encoder_cache_mb: int = Field(256, ge=0, description="encoder output cache size in MB")
    max_encoder_batch: int | None = Field(
        None,
        ge=1,
        description="encoder inputs (images, video frames, audio windows) the requests admitted "
        "in one engine iteration may bring; the rest wait for the next, so first tokens and "
        "running streams go on between the encodings of a burst of media (a request over it "
        "alone is encoded alone). Default: no limit",
    )
    prefix_cache: bool = Field(
        True,
        description="reuse the K/V of a prompt's prefix that a KV slot still holds (a finished "
        "or running request's: earlier turns of a chat, a shared system prompt, the same media) "
        "instead of computing it again; finished requests' K/V are kept in their free slots "
        "and given up least recently used first",
    )
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' on /chat and /v1/*"
    )
    api_key_file: Path | None = Field(None, description="file with one accepted key per line")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated origins allowed by CORS; default: CORS off",
    )
    max_upload_mb: float = Field(50, gt=0, description="largest request body in MB")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest image, width x height")
    max_audio_seconds: float = Field(600, gt=0, description="longest audio")
    max_video_seconds: float = Field(600, gt=0, description="longest video")
    max_media_per_request: int = Field(16, ge=0, description="media items per request")
    request_timeout: float | None = Field(
        None, gt=0, description="seconds; then the request ends with an error"
    )
    allow_remote_media: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated hosts whose http(s) media URLs may be fetched",
    )
    drain_timeout: float = Field(30, ge=0, description="seconds SIGTERM waits for running requests")
    stall_timeout: float = Field(
        300,
        ge=0,
        description="seconds one engine step may take before the worker counts as "
        "wedged: /ready 503, exit code 3 for the supervisor; 0: never",
    )
    media_workers: int = Field(2, ge=1, description="threads decoding and preprocessing media")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads of the model worker on the CPU; default: cores - 1 "
        "(torch's one per core starves the event loop and the media pool)",
    )
    llm_backend: LLMBackend = Field(
        "torch",
        description="what runs the frozen LLM: PyTorch (any device), or llama.cpp on the CPU "
        "(a several times faster decode step; needs pip install 'xllm[llamacpp]'; Llama-"
        "architecture LLMs; --dtype auto is bfloat16 there; --quantize int8 becomes llama.cpp's "
        "Q8_0, nf4 does not apply)",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the decode step (static shapes per batch and kv-length "
        "bucket; CUDA graphs on CUDA); default: on for CUDA, off for the CPU",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="CUDA: the share of the GPU's memory this server may use (weights, "
        "activations, KV cache); the KV slots are sized from it, at most max_batch. Does not "
        "apply on the CPU. Default: max_batch slots",
    )
    kv_cache_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory for the KV cache in GiB; the KV slots (at most max_batch) are sized "
        "from it. Default: on the CPU a quarter of the memory available at start-up; on CUDA "
        "max_batch slots (or gpu_memory_utilization's share)",
    )
    engine: Literal["process", "thread"] = Field(
        "process",
        description="where the model loop runs: its own process (a core and an interpreter of "
        "its own) or a thread of the server process",
    )
    log_format: Literal["json", "text"] = Field("json", description="log lines as JSON or text")
    files_ttl: float = Field(
        3600, ge=0, description="seconds a media handle (POST /v1/files) lives; 0: until deleted"
    )
    files_max_count: int = Field(100, ge=0, description="media handles per API key")
    files_max_mb: float = Field(256, ge=0, description="MB of media handles per API key")
    files_dir: Path | None = Field(
        None,
        description="directory that keeps media handles across restarts (their bytes and "
        "metadata; decoded again at first use); default: in memory, gone at a restart",
    )

    _split = field_validator("cors_origins", "allow_remote_media", mode="before")(_split_list)

    @model_validator(mode="after")
    def _llamacpp_on_the_cpu(self) -> Settings:
        # "auto" becomes the CPU (where it would pick a GPU) and bfloat16 under llama.cpp
        self.device, self.dtype, _ = self._torch_load()
        return self

    def _torch_load(self) -> tuple[str, str, Quantize]:
        return torch_load_for_backend(self.llm_backend, self.device, self.dtype, self.quantize)

    @property
    def torch_quantize(self) -> Quantize:
        """The quantization PyTorch applies when it loads the LLM: none where llama.cpp runs
        it (llama.cpp quantizes its own copy, EngineConfig.llamacpp_quantize)."""
        return self._torch_load()[2]

    def api_keys(self) -> list[str]:
        keys = [self.api_key.get_secret_value()] if self.api_key else []
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        return keys

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def engine_config(self) -> EngineConfig:
        """The engine's part of the settings (imported late: it brings torch)."""
        from xllm.server.engine.config import EngineConfig

        gb = self.kv_cache_memory_gb
        return EngineConfig(
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            max_model_len=self.max_model_len,
            prefill_chunk=self.prefill_chunk,
            default_max_tokens=self.default_max_tokens,
            encoder_cache_mb=self.encoder_cache_mb,
            max_encoder_batch=self.max_encoder_batch,
            prefix_cache=self.prefix_cache,
            stall_timeout=self.stall_timeout or None,
            compile=self.compile,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=None if gb is None else int(gb * 2**30),
            llm_backend=self.llm_backend,
            llamacpp_quantize=self.quantize if self.llm_backend == "llamacpp" else "none",
        )

    def file_limits(self) -> FileLimits:
        from xllm.server.files import FileLimits

        return FileLimits(
            ttl=self.files_ttl or None,
            max_files=self.files_max_count,
            max_bytes=int(self.files_max_mb * 2**20),
            directory=self.files_dir,
        )

    def serving_limits(self) -> ServingLimits:
        """What the serving layer refuses before anything reaches the engine."""
        from xllm.model.media import MediaLimits
        from xllm.server.serving import ServingLimits

        media = MediaLimits(
            max_image_pixels=self.max_image_pixels,
            max_audio_seconds=self.max_audio_seconds,
            max_video_seconds=self.max_video_seconds,
            max_bytes=self.max_upload_bytes,
        )
        return ServingLimits(
            media,
            max_media_per_request=self.max_media_per_request,
            request_timeout=self.request_timeout,
        )
