"""Sizes and bad media: refused from headers, before decoding, never a 500."""

from __future__ import annotations

import base64
import random
import threading

import httpx

from tests.media import make_mp4, make_png, make_wav
from tests.server.reliability import (
    MB,
    assert_error,
    peak_growth_mb,
    png_bomb,
    post_media,
    wav_claiming,
    wide_mp4,
)
from tests.servers import InProcessServer


def test_decompression_bomb_png_is_413_from_the_header(server):
    bomb = png_bomb()  # 16000 x 16000: 256 M pixels; the server allows 40 M
    assert len(bomb) < 64 * 1024
    r, growth = peak_growth_mb(server, lambda: post_media(server, "image", bomb, "bomb.png"))
    assert_error(r, 413, words=("256000000 pixels", "40000000"))
    assert growth < 64, f"peak RSS rose {growth:.0f} MB for a refused image"
    # The same through the OpenAI route (a data URI).
    uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert_error(r, 413, words=("pixels",))


def test_wav_whose_header_claims_2_gb_is_decoded_for_what_is_there(server):
    lying = wav_claiming(2**31 - 64)  # 0.5 s of samples; the header says ~18.6 hours
    r, growth = peak_growth_mb(server, lambda: post_media(server, "audio", lying, "a.wav"))
    # Either refused (413, from the header) or decoded for the samples really there (200).
    assert r.status_code in (200, 413), r.text
    assert growth < 64, f"peak RSS rose {growth:.0f} MB for a 16 KB WAV"
    # Header only: claims 2 GB, has no samples at all.
    header_only = wav_claiming(2**31 - 64)[:44]
    assert_error(post_media(server, "audio", header_only, "a.wav"), 400, 413)


def test_300_images_in_one_request_are_refused_before_decoding(server):
    png = make_png()
    files = [("image", (f"{i}.png", png, "image/png")) for i in range(300)]
    decoded = server.metric("xllm_media_decode_seconds_count", modality="image")
    r = httpx.post(f"{server.url}/chat", data={"prompt": "hi"}, files=files, timeout=60)
    assert_error(r, 413, words=("300 media items", "--max-media-per-request"))
    # OpenAI route: counted before any data URI is decoded (or any URL fetched).
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}] * 300
    body = {"messages": [{"role": "user", "content": content}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert_error(r, 413, words=("300 media items",))
    assert server.metric("xllm_media_decode_seconds_count", modality="image") == decoded


def bad_media_cases() -> list[tuple[str, str, bytes]]:
    png, wav, mp4 = make_png(), make_wav(), make_mp4(frames=3, fps=3)
    rng = random.Random(7)
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'
    cases = []
    for field in ("image", "audio", "video"):
        cases += [
            (field, "zero bytes", b""),
            (field, "random bytes", rng.randbytes(4096)),
            (field, "svg", svg),
            (field, "html", b"<!doctype html><html><body>hi</body></html>"),
            (field, "pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"),
            (field, "text", b"just some text, not media at all\n" * 10),
        ]
    cases += [
        ("image", "truncated png", png[: len(png) // 2]),
        ("image", "png magic, garbage after", b"\x89PNG\r\n\x1a\n" + rng.randbytes(512)),
        ("image", "a wav", wav),
        ("image", "an mp4", mp4),
        ("image", "jpeg magic only", b"\xff\xd8\xff"),
        ("audio", "truncated header", wav[:30]),
        ("audio", "no samples", make_wav(0.0)),
        ("audio", "a png", png),
        ("audio", "an mp4 without audio", mp4),
        ("audio", "riff garbage", b"RIFF\xff\xff\xff\xffWAVE" + rng.randbytes(256)),
        ("video", "truncated mp4", mp4[: len(mp4) // 3]),
        ("video", "mp4 header only", mp4[:64]),
        ("video", "a png", png),
        ("video", "a wav", wav),
        ("video", "ftyp garbage", b"\0\0\0\x18ftypisom" + rng.randbytes(1024)),
    ]
    return cases


def test_bad_media_get_400_or_415_with_a_message_never_500(server):
    answers = {}
    for field, what, data in bad_media_cases():
        r = post_media(server, field, data)
        assert r.status_code in (400, 413, 415), (field, what, r.status_code, r.text)
        answers[(field, what)] = assert_error(r, 400, 413, 415)["message"]
    assert "SVG" in answers[("image", "svg")]
    assert "no samples" in answers[("audio", "no samples")]
    # Data URIs through the OpenAI route go the same way.
    for kind, data in (("image", b"\x89PNG\r\n\x1a\nxx"), ("video", b"garbage" * 10)):
        uri = f"data:{kind}/x;base64," + base64.b64encode(data).decode()
        part = {"type": f"{kind}_url", f"{kind}_url": {"url": uri}}
        body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        assert_error(
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30), 400, 415
        )
    audio = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"},
    }
    body = {"messages": [{"role": "user", "content": [audio]}], "max_tokens": 2}
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30), 400, 415)
    # No worker hung or died on the way: a good request with every kind of media still works.
    files = [
        ("image", ("a.png", make_png(), "image/png")),
        ("audio", ("a.wav", make_wav(), "audio/wav")),
    ]
    r = httpx.post(
        f"{server.url}/chat", data={"prompt": "ok?", "max_tokens": "2"}, files=files, timeout=60
    )
    assert r.status_code == 200, r.text
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_duration_resolution_pixel_and_context_limits(tiny_model):
    with InProcessServer(
        tiny_model,
        max_audio_seconds=1,
        max_video_seconds=0.5,
        max_image_pixels=10_000,
        max_model_len=64,
        default_max_tokens=512,
    ) as server:
        assert_error(
            post_media(server, "audio", make_wav(2.0), "a.wav"), 413, words=("2.0 s", "1 s")
        )
        assert_error(
            post_media(server, "video", make_mp4(frames=10, fps=10), "a.mp4"), 413, words=("0.5 s",)
        )
        assert_error(post_media(server, "video", wide_mp4(), "w.mp4"), 413, words=("4112x16",))
        assert_error(
            post_media(server, "image", make_png((200, 100)), "a.png"),
            413,
            words=("20000", "10000"),
        )
        assert post_media(server, "image", make_png((100, 100)), "a.png").status_code == 200
        url = f"{server.url}/chat"
        # The prompt alone is longer than the context: 400 with both numbers.
        r = httpx.post(url, data={"prompt": "word " * 200}, timeout=30)
        body = assert_error(r, 400, words=("64",))
        assert "prompt has" in body["message"] and "context" in body["message"]
        # max_tokens left open is capped by the context (not --default-max-tokens = 512).
        r = httpx.post(url, data={"prompt": "hello", "ignore_eos": "true"}, timeout=30)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert r.json()["finish_reason"] == "length" and usage["total_tokens"] == 64
        # Text is bounded before the worker tokenizes it (it would stall every stream meanwhile):
        # 10 MB of prompt is refused by its size in characters (the message says so: nothing was
        # tokenized), and so are stop strings past their cap.
        chat_url = f"{server.url}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "x " * (5 * MB)}], "max_tokens": 2}
        assert_error(
            httpx.post(chat_url, json=body, timeout=30), 400, words=("characters", "64 tokens")
        )
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "stop": [f"s{i}" for i in range(17)],
        }
        assert_error(httpx.post(chat_url, json=body, timeout=30), 422, words=("16 stop strings",))


def test_request_timeout_also_bounds_media_decoding(tiny_model):
    with InProcessServer(tiny_model, request_timeout=1, max_model_len=64) as server:
        service = server.runtime.service
        original = service._decode_one
        release = threading.Event()
        returned = threading.Event()

        def stuck_decoder(item):  # a file that takes "forever" to decode
            release.wait(120)
            returned.set()
            return original(item)

        service._decode_one = stuck_decoder
        try:
            r = post_media(server, "image", make_png(), "a.png")
            assert_error(r, 504, words=("timed out", "--request-timeout"))
            assert not returned.is_set()  # answered while the decoder was still stuck
            assert server.engine.num_in_system == 0  # its place was given back
        finally:
            release.set()
            service._decode_one = original


def test_max_tokens_left_open_is_the_models_default_unless_the_server_sets_one(
    tiny_model_dir, tmp_path
):
    """xllm.json's sampling.max_tokens bounds a request that gives none; --default-max-tokens,
    where set, wins over it; a request's own max_tokens wins over both."""
    import json
    import shutil

    from xllm.model.checkpoint import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "xllm.json").read_text())
    config["sampling"] = {**config.get("sampling", {}), "max_tokens": 5}
    (model_dir / "xllm.json").write_text(json.dumps(config))
    model = load_model(model_dir, device="cpu", dtype="float32")

    def completion_tokens(server: InProcessServer, **form: str) -> int:
        data = {"prompt": "hello", "ignore_eos": "true", **form}
        r = httpx.post(f"{server.url}/chat", data=data, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    with InProcessServer(model) as server:
        assert completion_tokens(server) == 5
        assert completion_tokens(server, max_tokens="9") == 9
    with InProcessServer(model, default_max_tokens=7) as server:
        assert completion_tokens(server) == 7
        assert completion_tokens(server, max_tokens="3") == 3
