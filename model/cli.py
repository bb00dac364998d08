"""`xllm init-tiny` and `xllm generate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from xllm.model.config import LLM_BACKENDS, QUANTIZE_CHOICES

DEVICES = ("auto", "cpu", "cuda")


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init-tiny", help="write a tiny random-weight model directory (for tests and trials)"
    )
    init.add_argument("--out", required=True, type=Path, help="directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--speech-interface", choices=("cformer", "frame_stack"), default="cformer")
    init.set_defaults(func=run_init_tiny)

    gen = subparsers.add_parser("generate", help="answer one prompt with media, streamed to stdout")
    add_model_arguments(gen)
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--image", action="append", default=[], type=Path, metavar="FILE")
    gen.add_argument("--audio", action="append", default=[], type=Path, metavar="FILE")
    gen.add_argument("--video", action="append", default=[], type=Path, metavar="FILE")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=run_generate)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (default: the packaged default model)",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, default="none", help="quantize the LLM"
    )
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto"
    )
    parser.add_argument(
        "--llm-backend",
        choices=LLM_BACKENDS,
        default="torch",
        help="what runs the frozen LLM: PyTorch, or llama.cpp on the CPU (as xllm serve)",
    )


def run_init_tiny(args: argparse.Namespace) -> int:
    from xllm.model.tiny import init_tiny

    path = init_tiny(args.out, seed=args.seed, speech_interface=args.speech_interface)
    print(f"tiny model written to {path}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from xllm.main import UserError
    from xllm.model.checkpoint import default_model_dir, load_model
    from xllm.model.config import torch_load_for_backend
    from xllm.model.generate import generate
    from xllm.model.preprocess import MediaPreparer
    from xllm.model.sampling import sampling_params

    try:
        device, dtype, quantize = torch_load_for_backend(
            args.llm_backend, args.device, args.dtype, args.quantize
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = args.model or default_model_dir()
    preparer = MediaPreparer.from_pretrained(model_dir)
    try:
        params = sampling_params(
            preparer.config.sampling,
            max_tokens=args.max_tokens,
            min_tokens=args.min_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # Media are prepared (video sampled as the model was trained, as the server does) before the
    # model loads, so a bad file fails fast.
    files = [("image", p) for p in args.image] + [("audio", p) for p in args.audio]
    files += [("video", p) for p in args.video]
    try:
        prepared = [preparer.prepare_file(path, kind) for kind, path in files]
    except ValueError as exc:
        raise UserError(str(exc)) from None

    model = load_model(model_dir, device=device, dtype=dtype, quantize=quantize)
    turns = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
    with torch.inference_mode():
        prompt = model.prompt_embeddings(turns, prepared)
    if len(prompt) + params.max_tokens > model.max_model_len:
        raise UserError(
            f"prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"model's context ({model.max_model_len} tokens)"
        )
    slots = None  # generate's default: PyTorch
    if args.llm_backend == "llamacpp":
        from xllm.model.llamacpp import LlamaCppSlots, gguf_weights_for

        weights = gguf_weights_for(model.llm.dtype, args.quantize)
        length = len(prompt) + params.max_tokens
        slots = LlamaCppSlots(model.llm, 1, length, weights, torch.get_num_threads())
    for delta in generate(model.llm, model.tokenizer, prompt.embeds, params, slots=slots):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
