"""Qwen2-VL over HTTP with its real processor: the tiny random-weight Qwen2-VL (multimodal rotary
positions: each image's tokens get 2-D grid positions) saved with its processor's files and loaded
through the real loader, images sent as data: URLs.

Qwen2VLProcessor holds a video processor, which needs torchvision. Where torchvision is installed
(the GPU runs install it) the processor is the stock one; where it is not (the development
machines and CI: no torchvision for their torch) the loader builds it without its video processor,
and these tests show that path serves images all the same.
"""

from __future__ import annotations

import io

import httpx
import pytest
from conftest import make_engine, serve_engine
from PIL import Image
from test_vlm import (
    BLUE,
    RED,
    ask,
    batch_equals_alone,
    data_url,
    image_msg,
    png,
    reference,
    streamed_equals_plain,
    text_of,
)
from tiny_models import build_tiny_qwen2vl

WIDE = png((20, 200, 20), size=(200, 100))
# Images are resized to multiples of 28 pixels within 56*56..112*112 pixels; 14-pixel patches, merged
# 2x2, give one token per 28x28 pixels: RED 40x30 -> 84x56 (6 tokens, a 2x3 grid), BLUE 30x50 ->
# 56x84 (6, 3x2), WIDE 200x100 -> 140x56 (10, 2x5).
IMAGE_TOKENS = {RED: 6, BLUE: 6, WIDE: 10}


def pil(raw: bytes):
    return Image.open(io.BytesIO(raw)).convert("RGB")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    from server.media import MediaLimits

    engine = make_engine(qwen_dir, prefill_chunk=12)  # an image's tokens get split across prompt chunks
    with serve_engine(engine, media=MediaLimits(max_images=3)) as srv:
        yield engine, srv
    engine.stop()


@pytest.fixture
def client(qwen):
    with httpx.Client(base_url=qwen[1].base_url, timeout=60) as c:
        yield c


def test_the_loader_gives_qwen2vl_its_processor_and_multimodal_rotary_positions(qwen, qwen_dir):
    engine, _ = qwen
    assert type(engine.prompts.processor).__name__ == "Qwen2VLProcessor"
    assert engine.accepts_images and engine.mrope and engine.packed
    assert engine.image_token_id == engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_a_data_url_image_gives_the_tokens_of_model_generate(client, qwen):
    engine, _ = qwen
    before = engine.stats["images_encoded"]
    resp = ask(client, image_msg(data_url(RED)))
    plain = ask(client, [{"role": "user", "content": "Describe this image in one sentence."}])
    assert text_of(resp) == reference(engine, image_msg(data_url(RED)), [pil(RED)])
    # the image part became <|vision_start|>, its 6 <|image_pad|> tokens and <|vision_end|>
    assert resp["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] == IMAGE_TOKENS[RED] + 2
    assert engine.stats["images_encoded"] == before + 1


def test_two_images_of_other_grids_give_the_tokens_of_model_generate(client, qwen):
    engine, _ = qwen
    one = ask(client, image_msg(data_url(RED)))
    two = ask(client, image_msg(data_url(RED), data_url(WIDE)))
    assert two["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"] == IMAGE_TOKENS[WIDE] + 2
    assert text_of(two) == reference(engine, image_msg("a", "b"), [pil(RED), pil(WIDE)])
    swapped = ask(client, image_msg(data_url(WIDE), data_url(RED)))
    assert text_of(swapped) == reference(engine, image_msg("a", "b"), [pil(WIDE), pil(RED)])


def test_streaming_with_an_image_equals_the_non_streamed_reply(client):
    assert streamed_equals_plain(client)["completion_tokens"] == 8


def test_a_batch_of_image_and_text_requests_equals_each_alone(client):
    """Image rows (grid positions) and text rows (one position on all three axes) in the same packed
    steps: each request's greedy tokens are those it gets alone."""
    batch_equals_alone(client, [BLUE, RED, WIDE])


def test_the_same_text_with_other_images_shares_no_image_kv(client, qwen, qwen_dir):
    """Prefix cache on: B after A (same text, other image) gets B's own tokens, as on a cold engine,
    and reuses no block past A's first image token."""
    engine, _ = qwen
    text = "Please describe the picture below in great detail, with colours."
    a = ask(client, image_msg(data_url(RED), text=text))
    b = ask(client, image_msg(data_url(BLUE), text=text))
    b_again = ask(client, image_msg(data_url(BLUE), text=text))
    cold = make_engine(qwen_dir, prefix_cache=False)
    try:
        with serve_engine(cold) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as c:
            b_cold = ask(c, image_msg(data_url(BLUE), text=text))
    finally:
        cold.stop()
    assert text_of(b) == text_of(b_cold)
    ids, _ = engine.prepare_prompt(image_msg("x", text=text), [pil(BLUE)])
    first_image = ids.index(engine.image_token_id)
    assert first_image >= 16  # a whole block of text before the image
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_image
    assert b_again["usage"]["prompt_tokens_details"]["cached_tokens"] > first_image  # its own blocks are reused
    assert text_of(b_again) == text_of(b)
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_image
    assert text_of(a) != text_of(b)  # the image matters, so shared image KV would show


def test_the_processor_class_comes_from_the_model_config_when_no_file_names_it(qwen_dir, tmp_path, caplog):
    """No processor file names its class: the loader builds the one transformers maps Qwen2-VL's
    config to, and it expands an image into its grid's tokens. Without torchvision it is built
    without its video processor, and the log says so."""
    import json
    import shutil

    from tiny_models import has_torchvision

    from engine.loader import load_processor

    folder = tmp_path / "qwen2vl"
    shutil.copytree(qwen_dir, folder)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        if (folder / name).exists():
            saved = json.loads((folder / name).read_text())
            saved.pop("processor_class", None)
            (folder / name).write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="chatserve.loader"):
        processor = load_processor(folder)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[pil(WIDE)], return_tensors="pt")
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_token).sum()) == IMAGE_TOKENS[WIDE]
    assert ("built without its video processor" in caplog.text) == (not has_torchvision())
