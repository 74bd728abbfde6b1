"""Vision-language models over HTTP: tiny random-weight LLaVA, LLaVA-NeXT, Idefics3, SmolVLM,
Gemma 3, Gemma 4 and Qwen2.5-VL with their real processors (SmolVLM's, Gemma 4's and Qwen2.5-VL's
are built without their video processors where torchvision is missing), images as data: URLs and from a local image
server on 127.0.0.1. Qwen2-VL has its own module (test_vlm_qwen2vl.py).

The tiny models' words are random, so outputs are compared between runs (alone vs in a batch,
data: vs http, stream vs not) and against ``model.generate`` on the processor's own inputs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch
from conftest import make_engine, serve_engine
from PIL import Image
from tiny_models import (
    build_tiny_gemma3,
    build_tiny_gemma4,
    build_tiny_idefics3,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_qwen25vl,
    build_tiny_smolvlm,
)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def png(color, size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


RED, BLUE = png((220, 20, 20)), png((20, 20, 220), size=(30, 50))


def image_msg(*urls, text="Describe this image in one sentence."):
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


# ---------------------------------------------------------------------------------- image server
class _Images(BaseHTTPRequestHandler):
    routes = {
        "/red.png": ("image/png", RED),
        "/blue.png": ("image/png", BLUE),
        "/text": ("text/plain", b"this is not an image"),
        "/huge.png": ("image/png", png((1, 2, 3), size=(3000, 3000))),
    }

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path
        if path in self.routes:
            ctype, body = self.routes[path]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/red.png")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif path == "/slow":
            time.sleep(3)  # past the test server's 1 s fetch limit
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


# ---------------------------------------------------------------------------------- models
BUILDERS = {
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
    "gemma3": build_tiny_gemma3,
    "gemma4": build_tiny_gemma4,
    "qwen25vl": build_tiny_qwen25vl,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm_dir(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    from server.media import MediaLimits

    family, folder = vlm_dir
    engine = make_engine(folder, prefill_chunk=24)  # image tokens get split across prompt chunks
    limits = MediaLimits(max_images=3, max_bytes=200_000, max_pixels=1_000_000, fetch_timeout=1.0)
    with serve_engine(engine, media=limits) as srv:
        yield family, engine, srv
    engine.stop()


@pytest.fixture
def client(vlm):
    with httpx.Client(base_url=vlm[2].base_url, timeout=60) as c:
        yield c


def ask(client, messages, **body) -> dict:
    r = client.post(CHAT, json={"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def text_of(resp) -> str:
    return resp["choices"][0]["message"]["content"]


def reference(engine, messages, images, n=8) -> str:
    """model.generate on the processor's own inputs (the model's own image merging)."""
    processor = engine.prompts.processor
    text = engine.prompts.render_text(messages)
    enc = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    model = engine.model
    impl = model.config._attn_implementation
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        try:
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        finally:
            model.set_attn_implementation(impl)
    return engine.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------- behaviour
def test_a_data_url_image_gives_the_tokens_of_model_generate(client, vlm):
    family, engine, _ = vlm
    assert engine.accepts_images
    resp = ask(client, image_msg(data_url(RED)))
    plain = ask(client, [{"role": "user", "content": "Describe this image in one sentence."}])
    expected = reference(engine, image_msg(data_url(RED)), [Image.open(io.BytesIO(RED)).convert("RGB")])
    assert text_of(resp) == expected
    # usage counts the image tokens the processor expanded
    n_image = resp["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    # LLaVA: 2x2 patches; LLaVA-NeXT: the base view's 4 and a tile grid's; Idefics3 and SmolVLM: 4
    # tiles + a global view, 4 each; Gemma 3: 16 patches pooled to 4; Gemma 4: 4-pixel patches pooled
    # 2x2; Qwen2.5-VL: 28x28 pixels each
    per_image = {"llava": 4, "llava_next": 8, "idefics3": 20, "smolvlm": 20, "gemma3": 4, "gemma4": 8, "qwen25vl": 4}
    per_image = per_image[family]
    assert n_image >= per_image
    assert engine.stats["images_encoded"] >= 1


def test_two_images_and_an_http_url(client, vlm, image_server):
    _, engine, _ = vlm
    one = ask(client, image_msg(data_url(RED)))
    two = ask(client, image_msg(data_url(RED), data_url(BLUE)))
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]
    assert text_of(two) == reference(
        engine, image_msg("a", "b"), [Image.open(io.BytesIO(x)).convert("RGB") for x in (RED, BLUE)]
    )
    via_http = ask(client, image_msg(f"{image_server}/red.png"))
    assert text_of(via_http) == text_of(one)
    via_redirect = ask(client, image_msg(f"{image_server}/redirect"))
    assert text_of(via_redirect) == text_of(one)


def test_images_across_messages(client, vlm):
    _, engine, _ = vlm
    msgs = (
        image_msg(data_url(RED), text="First:")
        + [{"role": "assistant", "content": "A red one."}]
        + image_msg(data_url(BLUE), text="And this?")
    )
    resp = ask(client, msgs)
    expected = reference(engine, msgs, [Image.open(io.BytesIO(x)).convert("RGB") for x in (RED, BLUE)])
    assert text_of(resp) == expected


def streamed_equals_plain(client) -> dict:
    """A streamed image request's text and usage equal the non-streamed reply's; its usage."""
    body = {
        "messages": image_msg(data_url(BLUE)),
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage = "", None
    with client.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                if chunk.get("usage"):
                    usage = chunk["usage"]
    plain = ask(client, image_msg(data_url(BLUE)))
    assert text == text_of(plain) and usage["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    return usage


def test_streaming_with_an_image_equals_the_non_streamed_reply(client, vlm):
    streamed_equals_plain(client)


def batch_equals_alone(client, images: list[bytes]) -> None:
    """8 requests, image requests (``images`` in turn) between text ones, sent at once: each reply
    equals the one it gets alone."""
    requests = []
    for i in range(8):
        if i % 2:
            requests.append(image_msg(data_url(images[i // 2 % len(images)]), text=f"Image {i}: what is it?"))
        else:
            requests.append([{"role": "user", "content": f"Text request {i}"}])
    alone = [text_of(ask(client, m)) for m in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda m: text_of(ask(client, m)), requests))
    assert together == alone


def test_a_batch_of_image_and_text_requests_equals_each_alone(client, vlm):
    batch_equals_alone(client, [RED, BLUE])


def test_the_same_text_with_other_images_shares_no_image_kv(vlm_dir, client, vlm):
    """Prefix cache on: B after A (same text, other image) gets B's own tokens, as on a cold engine,
    and reuses no block past A's first image token."""
    _, engine, _ = vlm
    text = "Please describe the picture below in great detail, with colours."
    a = ask(client, image_msg(data_url(RED), text=text))
    b = ask(client, image_msg(data_url(BLUE), text=text))
    b_again = ask(client, image_msg(data_url(BLUE), text=text))
    cold = make_engine(vlm_dir[1], prefix_cache=False)
    try:
        with serve_engine(cold) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            b_cold = ask(c, image_msg(data_url(BLUE), text=text))
    finally:
        cold.stop()
    assert text_of(b) == text_of(b_cold)
    ids, mm = engine.prepare_prompt(image_msg("x", text=text), [Image.open(io.BytesIO(BLUE)).convert("RGB")])
    first_image = ids.index(engine.image_token_id)
    assert first_image >= 16  # a whole block of text before the image
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_image
    assert b_again["usage"]["prompt_tokens_details"]["cached_tokens"] > first_image  # its own blocks are reused
    assert text_of(b_again) == text_of(b)
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_image  # A shared nothing of its image either
    assert text_of(a) != text_of(b)  # the image matters, so shared image KV would show


def test_the_openai_sdk_and_huggingface_hub_snippets_run_unchanged(vlm, image_server):
    """The spec's VLM snippets with only the base URL, key and model changed; the image URL points at
    the local image server."""
    from huggingface_hub import InferenceClient
    from openai import OpenAI

    _, engine, srv = vlm
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image in one sentence."},
                {"type": "image_url", "image_url": {"url": f"{image_server}/red.png"}},
            ],
        }
    ]
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="unused")
    completion = client.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=8)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.prompt_tokens > 20
    hf = InferenceClient(base_url=srv.base_url + "/v1", api_key="unused")
    completion = hf.chat.completions.create(model=engine.model_name, messages=messages, max_tokens=8)
    assert completion.choices[0].message.content is not None
    curl = httpx.post(
        srv.base_url + CHAT,
        json={"model": engine.model_name, "messages": messages, "max_tokens": 8},
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert curl.status_code == 200 and curl.json()["object"] == "chat.completion"


# ---------------------------------------------------------------------------------- bad input
BAD = [
    ("data:image/png;base64,@@@not-base64@@@", "invalid_image_url"),
    (data_url(b"plain text, not an image"), "invalid_image"),
    ("data:image/png,rawpayload", "invalid_image_url"),
    ("file:///etc/passwd", "invalid_image_url"),
    ("ftp://127.0.0.1/a.png", "invalid_image_url"),
    ("http://127.0.0.1:1/red.png", "image_fetch_failed"),  # nothing listens there
    ("{server}/missing.png", "image_fetch_failed"),  # 404
    ("{server}/loop", "image_fetch_failed"),  # redirect loop
    ("{server}/slow", "image_fetch_failed"),  # past the 1 s limit
    ("{server}/text", "invalid_image"),
    ("{server}/huge.png", "image_too_large"),  # 9 Mpixels > the 1 Mpixel limit
    (data_url(b"\x00" * 300_000), "image_too_large"),  # > 200 kB
]


@pytest.mark.parametrize("url,code", BAD, ids=[c + str(i) for i, (_, c) in enumerate(BAD)])
def test_bad_images_are_a_400_naming_the_part(client, image_server, url, code):
    r = client.post(CHAT, json={"messages": image_msg(url.format(server=image_server)), "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "messages[0].content[1].image_url.url", err
    assert ask(client, [{"role": "user", "content": "still serving?"}])["choices"]  # and the server serves on


def test_image_count_role_and_domain_limits(client, vlm, image_server):
    _, engine, srv = vlm
    r = client.post(CHAT, json={"messages": image_msg(*[data_url(RED)] * 4)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(RED)}}]},
    ]
    r = client.post(CHAT, json={"messages": msgs})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].content[0]"
    from server.media import MediaLimits

    with (
        serve_engine(engine, media=MediaLimits(allowed_domains=["images.example.org"])) as other,
        httpx.Client(base_url=other.base_url, timeout=60) as c,
    ):
        r = c.post(CHAT, json={"messages": image_msg(f"{image_server}/red.png"), "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_domain_not_allowed"
        assert "127.0.0.1" in r.json()["error"]["message"]


def test_an_image_on_a_text_only_model_is_a_400(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    try:
        with serve_engine(engine) as srv:
            r = httpx.post(srv.base_url + CHAT, json={"messages": image_msg(data_url(RED))}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_input_not_supported"
    finally:
        engine.stop()


def test_a_failing_vision_encoder_fails_that_request_alone(vlm, monkeypatch):
    """A fault in one request's image encoding ends that request with an error; a text request
    decoding at the same time gets the tokens it gets alone."""
    from engine.request import GenerationRequest, SamplingParams

    _, engine, _ = vlm
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    text_ids = engine.render_prompt([{"role": "user", "content": "A text request"}])

    async def collect(req):
        return [e async for e in engine.generate(req)]

    alone = asyncio.run(collect(GenerationRequest("t", text_ids, params)))
    ids, mm = engine.prepare_prompt(image_msg("x"), [Image.open(io.BytesIO(RED)).convert("RGB")])

    def broken(**kwargs):
        raise RuntimeError("injected vision fault")

    monkeypatch.setattr(engine.model, "get_image_features", broken)

    async def both():
        return await asyncio.gather(
            collect(GenerationRequest("img", ids, params, multimodal=mm)),
            collect(GenerationRequest("t2", text_ids, params)),
        )

    bad, good = asyncio.run(both())
    assert bad[-1].finish_reason == "error" and "injected vision fault" in bad[-1].error
    assert [t for e in good for t in e.token_ids] == [t for e in alone for t in e.token_ids]


def test_qwen2vl_multimodal_rotary_positions_in_mixed_packed_steps(tmp_path):
    """Qwen2-VL's M-RoPE: an image prompt (grid positions for its image tokens, prefilled in chunks
    that split the image) beside a decoding text row gives the tokens of model.generate; so does a
    text request on the same engine. The encoder inputs are made by hand (no processor here)."""
    from types import SimpleNamespace

    from tiny_models import build_tiny_qwen2vl
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from engine.engine import Engine, EngineConfig
    from engine.loader import LoadedModel
    from engine.request import GenerationRequest, MultimodalInputs, SamplingParams

    folder = build_tiny_qwen2vl(tmp_path / "qwen2vl")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tok,
        name="qwen2vl",
        device="cpu",
        dtype="float32",
        max_model_len=1024,
        source=str(folder),
        load_seconds=0.0,
        processor=SimpleNamespace(chat_template=None),
    )
    engine = Engine(loaded, EngineConfig(prefill_chunk=6)).start()
    try:
        assert engine.packed and engine.mrope and engine.accepts_images
        grid = torch.tensor([[1, 4, 6]])  # 4x6 patches -> 2x3 = 6 image tokens
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(24, 3 * 2 * 14 * 14, generator=g)
        v = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
        text = tok("<|im_start|>user\nWhat is in")["input_ids"]
        ids = (
            text
            + [v["<|vision_start|>"]]
            + [v["<|image_pad|>"]] * 6
            + [v["<|vision_end|>"]]
            + tok(" it?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        )
        mm = MultimodalInputs({"pixel_values": pixels, "image_grid_thw": grid}, "digest", 1)
        text_ids = engine.render_prompt([{"role": "user", "content": "Hello there, a text request"}])
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

        async def collect(req):
            return [t async for e in engine.generate(req) for t in e.token_ids]

        async def both():
            return await asyncio.gather(
                collect(GenerationRequest("t", text_ids, params)),
                collect(GenerationRequest("img", ids, params, multimodal=mm)),
            )

        got_text, got_image = asyncio.run(both())
        model.set_attn_implementation("sdpa")
        with torch.inference_mode():
            t = torch.tensor([ids])
            ref = model.generate(
                input_ids=t,
                pixel_values=pixels,
                image_grid_thw=grid,
                mm_token_type_ids=(t == v["<|image_pad|>"]).int(),
                max_new_tokens=10,
                min_new_tokens=10,
                do_sample=False,
            )[0, len(ids) :].tolist()
            ref_text = model.generate(torch.tensor([text_ids]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[
                0, len(text_ids) :
            ].tolist()
        assert got_image == ref
        assert got_text == ref_text
    finally:
        engine.stop()


def test_json_schema_logprobs_seeds_and_stop_strings_work_with_images(client, vlm):
    msgs = image_msg(data_url(RED), text="Give the colour as JSON.")
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    r = ask(
        client,
        msgs,
        max_tokens=40,
        ignore_eos=False,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert json.loads(text_of(r))["colour"] in ("red", "blue")
    lp = ask(client, msgs, logprobs=True, top_logprobs=3)
    entries = lp["choices"][0]["logprobs"]["content"]
    assert len(entries) == lp["usage"]["completion_tokens"]
    assert all(abs(e["logprob"] - max(t["logprob"] for t in e["top_logprobs"])) < 1e-4 for e in entries)
    seeded = [text_of(ask(client, msgs, temperature=1.0, seed=7)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    full = text_of(ask(client, msgs, max_tokens=12))
    stop = full[3:5]
    if stop.strip():
        cut = text_of(ask(client, msgs, max_tokens=12, stop=[stop]))
        assert stop not in cut and full.startswith(cut)


# (family, its marks for the model's masks, whether an image's tokens attend to each other both ways)
IMAGE_ATTENTION = {
    "gemma3": ("token_type_ids", True),
    "gemma4": ("mm_token_type_ids", False),  # Gemma 4's smaller models
    "gemma4_vision": ("mm_token_type_ids", True),  # use_bidirectional_attention="vision": its larger ones
}


@pytest.mark.parametrize("family", sorted(IMAGE_ATTENTION))
def test_image_tokens_attend_to_each_other_as_in_the_models_own_forward(tmp_path, family):
    """Gemma 3's own forward, and Gemma 4's where its config says so, let an image's tokens attend to
    each other both ways (causal elsewhere); Gemma 4's smaller models attend causally. Served in
    prompt chunks of 3 tokens, which would cut an image apart, and beside a text request, the first
    token's logprobs equal the model's own forward over the processor's inputs; where images attend
    both ways, a causal-only forward differs by far more than the tolerance, so this would show it."""
    build = {
        "gemma3": build_tiny_gemma3,
        "gemma4": build_tiny_gemma4,
        "gemma4_vision": lambda path: build_tiny_gemma4(path, images_both_ways=True),
    }[family]
    marks, both_ways = IMAGE_ATTENTION[family]
    engine = make_engine(build(tmp_path / family), prefill_chunk=3)
    assert engine.images_attend_both_ways is both_ways
    messages = image_msg(data_url(RED), data_url(BLUE))
    images = [Image.open(io.BytesIO(raw)).convert("RGB") for raw in (RED, BLUE)]
    enc = engine.prompts.processor(
        text=[engine.prompts.render_text(messages)], images=images, return_tensors="pt", add_special_tokens=False
    )
    image_tokens = int((enc["input_ids"] == engine.image_token_id).sum())
    assert image_tokens >= 8 and int(enc[marks].sum()) == image_tokens  # marked for the model's masks
    with torch.inference_mode():
        own = engine.model(**enc).logits[0, -1].log_softmax(-1)
        causal = engine.model(**{k: v for k, v in enc.items() if k != marks}).logits[0, -1].log_softmax(-1)
    expected = own.topk(5)
    assert bool((causal[expected.indices] - expected.values).abs().max() > 1e-3) is both_ways
    try:
        with serve_engine(engine) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as client:
            body = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}
            with ThreadPoolExecutor(2) as pool:  # a text request in the same steps
                text = pool.submit(ask, client, [{"role": "user", "content": "Say something long " * 6}], **body)
                resp = ask(client, messages, **body)
                text.result()
    finally:
        engine.stop()
    top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    got = torch.tensor([t["logprob"] for t in top])
    assert torch.allclose(got, expected.values, atol=1e-4), (got, expected.values)
    assert [t["token"] for t in top] == [engine.tokenizer.decode([i]) for i in expected.indices.tolist()]
