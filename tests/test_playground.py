"""The browser playground (server/playground.py, server/static/), end to end: a real headless chromium
(Debian's package, driven by Playwright for Python through `executable_path`; `make browser` installs
it) against real servers on 127.0.0.1 serving tiny random-weight models.

Every reply the page shows is checked against the same request sent straight to the API (temperature 0
or a fixed seed make them equal), so these tests see the page's parsing of the stream, not just that
something appeared. Screenshots go to bench-results/playground-*.png (PLAYGROUND_ARTIFACTS=DIR to
move them).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import make_engine, serve_engine
from PIL import Image
from tiny_models import build_tiny_llama, build_tiny_llava

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("PLAYGROUND_ARTIFACTS") or ROOT / "bench-results")
STATIC = ROOT / "server" / "static"
CHAT = "/v1/chat/completions"
VIEWPORT = {"width": 1366, "height": 800}  # a laptop screen


# ---------------------------------------------------------------------------------- servers
def slowed(engine, seconds: float = 0.01):
    """Each engine step takes at least `seconds`, so a stream really streams (and a long one is long)."""
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        step()

    engine.step = slow_step
    return engine


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    # a 2048-token context: room for tool prompts and for a long stream to stop
    engine = slowed(make_engine(build_tiny_llama(tmp_path_factory.mktemp("pg-llama"), max_position_embeddings=2048)))
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(text_engine):
    with serve_engine(text_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    engine = make_engine(build_tiny_llava(tmp_path_factory.mktemp("pg-llava")))
    try:
        with serve_engine(engine) as srv:
            yield srv
    finally:
        engine.stop()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def direct(base_url: str, body: dict, api_key: str | None = None) -> dict:
    """The same request, non-streaming, straight to the API: what the page must show."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(base_url + CHAT, json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def running(base_url: str) -> int:
    return httpx.get(base_url + "/health", timeout=10).json()["running"]


# ---------------------------------------------------------------------------------- browser
def find_chromium() -> str | None:
    for name in (os.environ.get("CHATSERVE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (it is a test extra: pip install -e '.[test]')")
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "no chromium on this machine: `make browser` installs Debian's package (needs root and apt); "
            "or set CHATSERVE_CHROMIUM=/path/to/chromium"
        )
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe)
        except Exception as exc:  # noqa: BLE001 - a browser that cannot start is a skip
            pytest.skip(f"chromium at {exe} did not start: {exc}")
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """open_page(base_url, **context options) -> a page on the playground, models loaded. Fails the test
    on any uncaught JavaScript error."""
    contexts, errors = [], []

    def open_(base_url: str, *, wait_models: bool = True, **options):
        ctx = browser.new_context(viewport=options.pop("viewport", VIEWPORT), base_url=base_url, **options)
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(20_000)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto("/")
        page.wait_for_selector("body[data-ready='1']")
        if wait_models:
            page.wait_for_function("() => document.querySelector('.pane .model').value !== ''")
        return page

    yield open_
    for ctx in contexts:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str, **kwargs) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"playground-{name}.png"
    page.screenshot(path=str(path), **kwargs)
    print(f"screenshot: {path}")
    return path


def pane(page, i: int = 0):
    return page.locator(f'.pane[data-pane="{i}"]')


def set_params(page, i: int = 0, **params):
    for name, value in params.items():
        pane(page, i).locator(f'[data-param="{name}"]').fill(str(value))


def user_box(page):
    return page.locator('#messages .message[data-role="user"] .content').last


def wait_state(page, i: int, state: str, timeout: float = 30_000):
    page.wait_for_selector(f'.pane[data-pane="{i}"][data-state="{state}"]', timeout=timeout)


def stats(page, i: int = 0) -> dict:
    return {
        k: pane(page, i).locator(f".s-{k}").inner_text()
        for k in ("ttft", "tps", "prompt", "completion", "total", "finish")
    }


def output_text(page, i: int = 0) -> str:
    return pane(page, i).locator(".output .text").evaluate("e => e.textContent")


def chat_requests(page) -> list[dict]:
    """Collects the bodies of the chat requests the page sends from now on."""
    seen: list[dict] = []
    page.on("request", lambda r: seen.append(json.loads(r.post_data)) if r.url.endswith(CHAT) else None)
    return seen


def png_file(tmp_path: Path, color=(200, 40, 40)) -> Path:
    img = Image.new("RGB", (28, 28), color)
    for x in range(28):
        img.putpixel((x, x), (20, 20, 220))
    path = tmp_path / "picture.png"
    img.save(path, format="PNG")
    return path


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


TIMING = re.compile(r"^\d+ ms$|^\d+\.\d\d s$")


# ---------------------------------------------------------------------------------- routes (no browser)
def test_page_routes_static_files_and_no_playground(text_engine, server):
    from starlette.testclient import TestClient

    from server.app import create_app

    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        for path in ("/", "/playground"):
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in r.headers["content-security-policy"]
            assert '<script src="/playground/static/playground.js"' in r.text
        assert c.get("/playground/", follow_redirects=False).headers["location"] == "/playground"
        for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
            r = c.get(f"/playground/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert c.get("/playground/static/nope.js").status_code == 404
        paths = c.get("/openapi.json").json()["paths"]
        assert "/" not in paths and "/playground" not in paths  # the API description is unchanged
    # offline: nothing loaded from elsewhere, no CDN
    for f in STATIC.iterdir():
        assert not re.search(r"https?://", f.read_text()), f"{f.name} refers to another site"

    with TestClient(create_app(text_engine, playground=False)) as off:
        assert off.get("/").status_code == 404
        assert off.get("/playground").status_code == 404
        assert off.get("/playground/static/playground.js").status_code == 404
        assert off.get("/v1/models").status_code == 200


def test_no_playground_flag():
    from server import cli

    parser = argparse.ArgumentParser()
    cli._serve_parser(parser)
    assert cli.resolve_serve_args(parser.parse_args([]))["playground"] is True
    assert cli.resolve_serve_args(parser.parse_args(["--no-playground"]))["playground"] is False


def test_package_data_ships_the_static_files():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["server"]
    shipped = {p.name for pattern in patterns for p in (ROOT / "server").glob(pattern)}
    assert {"playground.html", "playground.js", "playground.css"} <= shipped


# ---------------------------------------------------------------------------------- the page
def test_send_streams_text_and_fills_timings(open_page, server):
    page = open_page(server.base_url)
    user_box(page).fill("Hello! How are you today?")
    set_params(page, 0, temperature=0, max_tokens=48)
    # count how many times text lands in the output: a stream arrives in many pieces
    page.evaluate("""() => {
        window.__pieces = 0;
        new MutationObserver(() => window.__pieces++).observe(
            document.querySelector('.pane[data-pane="0"] .output .text'), {childList: true, characterData: true});
    }""")
    sent = chat_requests(page)
    user_box(page).press("Control+Enter")  # keyboard: Ctrl+Enter sends
    # seen mid-stream: text is there, the pane still streaming, the TTFT already known
    page.wait_for_function("""() => {
        const p = document.querySelector('.pane[data-pane="0"]');
        return p.dataset.state === 'streaming' && p.querySelector('.output .text').textContent.length > 0;
    }""")
    wait_state(page, 0, "done")

    assert len(sent) == 1 and sent[0]["stream"] is True and sent[0]["stream_options"] == {"include_usage": True}
    body = {k: v for k, v in sent[0].items() if k not in ("stream", "stream_options")}
    assert body["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello! How are you today?"},
    ]
    ref = direct(server.base_url, body)
    assert output_text(page) == ref["choices"][0]["message"]["content"]
    assert page.evaluate("window.__pieces") > 5
    s = stats(page)
    assert TIMING.match(s["ttft"]) and TIMING.match(s["total"]), s
    assert float(s["tps"]) > 0, s
    assert int(s["prompt"]) == ref["usage"]["prompt_tokens"]
    assert int(s["completion"]) == ref["usage"]["completion_tokens"]
    assert s["finish"] == ref["choices"][0]["finish_reason"]
    page.wait_for_selector('#health[data-running="0"]')

    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    shot(page, "light")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    text_color = page.evaluate("getComputedStyle(document.querySelector('.output')).color")
    shot(page, "dark")
    assert light != dark
    assert dark.startswith("rgb(") and sum(map(int, re.findall(r"\d+", dark)[:3])) < 150  # dark background
    assert sum(map(int, re.findall(r"\d+", text_color)[:3])) > 500  # light text


def test_conversation_editor_add_edit_reorder_delete(open_page, server):
    page = open_page(server.base_url)
    messages = page.locator("#messages .message")
    user_box(page).fill("first question")
    page.click("[data-add=assistant]")
    messages.last.locator(".content").fill("first answer")
    page.click("[data-add=user]")
    messages.last.locator(".content").fill("second question")
    page.click("[data-add=system]")
    messages.last.locator(".content").fill("a system note, deleted below")
    messages.last.locator(".delete").click()
    page.click("[data-add=user]")
    messages.last.locator(".content").fill("moved up twice")
    # by keyboard: the focus stays on the button that moved the message
    messages.last.locator(".up").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.classList.contains('up')")
    page.keyboard.press("Enter")
    messages.nth(2).locator(".role").select_option("assistant")
    messages.nth(3).locator(".content").fill("first answer, edited")
    assert messages.count() == 5
    set_params(page, 0, temperature=0, max_tokens=6)
    sent = chat_requests(page)
    page.click("#send")
    wait_state(page, 0, "done")
    assert [(m["role"], m["content"]) for m in sent[0]["messages"]] == [
        ("system", "You are a helpful assistant."),
        ("user", "first question"),
        ("assistant", "moved up twice"),
        ("assistant", "first answer, edited"),
        ("user", "second question"),
    ]

    # the reply goes into the conversation, with a fresh user message after it
    reply = output_text(page)
    page.click('.pane[data-pane="0"] .append')
    roles = page.locator(".message .role").evaluate_all("els => els.map(e => e.value)")
    assert roles[-2:] == ["assistant", "user"]
    assert page.locator(".message").nth(-2).locator(".content").input_value() == reply
    assert page.evaluate("document.activeElement.classList.contains('content')")


def test_stop_aborts_the_stream_and_frees_the_row(open_page, server, text_engine):
    page = open_page(server.base_url)
    user_box(page).fill("Tell me a very long story.")
    set_params(page, 0, temperature=0, max_tokens=1500)
    page.locator('.pane[data-pane="0"] .extra summary').click()
    pane(page).locator(".extra-json").fill('{"ignore_eos": true}')
    aborted = text_engine.stats["finished_abort"]
    page.click("#send")
    page.wait_for_function(
        "() => document.querySelector('.pane[data-pane=\"0\"] .output .text').textContent.length > 20"
    )
    wait_until(lambda: running(server.base_url) == 1, what="the stream to be running on the server")
    page.wait_for_selector('#health[data-running="1"]')  # the page shows it too
    page.click("#stop")
    t_stop = time.monotonic()
    wait_state(page, 0, "stopped")
    wait_until(lambda: running(server.base_url) == 0, timeout=5, what="the server to free the row")
    freed_after = time.monotonic() - t_stop
    print(f"row freed {freed_after * 1000:.0f} ms after Stop")
    assert text_engine.stats["finished_abort"] == aborted + 1
    page.wait_for_selector('#health[data-running="0"]')
    s = stats(page)
    assert s["finish"] == "stopped" and 0 < int(s["completion"]) < 1500, s
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    shot(page, "stopped")

    # Esc stops too (keyboard)
    page.click("#send")
    wait_until(lambda: running(server.base_url) == 1, what="the second stream to run")
    page.keyboard.press("Escape")
    wait_state(page, 0, "stopped")
    wait_until(lambda: running(server.base_url) == 0, timeout=5, what="the server to free the row")
    assert text_engine.stats["finished_abort"] == aborted + 2


def test_compare_two_parameter_sets_side_by_side(open_page, server):
    page = open_page(server.base_url, viewport={"width": 1280, "height": 720})
    user_box(page).fill("Name three colours.")
    page.check("#compare-toggle")
    assert pane(page, 1).is_visible()
    set_params(page, 0, temperature=0, max_tokens=40)
    set_params(page, 1, temperature=1, seed=7, max_tokens=40)
    sent = chat_requests(page)
    page.keyboard.press("Control+Enter")
    # both run at once: each pane is streaming before either is done
    page.wait_for_function("""() => [0, 1].every(i => {
        const p = document.querySelector(`.pane[data-pane="${i}"]`);
        return p.dataset.state === 'streaming' || p.dataset.state === 'done';
    })""")
    wait_state(page, 0, "done")
    wait_state(page, 1, "done")
    assert len(sent) == 2
    by_temp = {b["temperature"]: b for b in sent}
    assert by_temp[1]["seed"] == 7 and "seed" not in by_temp[0]
    for i, body in ((0, by_temp[0]), (1, by_temp[1])):
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        ref = direct(server.base_url, body)  # greedy, and seeded: reproducible
        assert output_text(page, i) == ref["choices"][0]["message"]["content"], i
        s = stats(page, i)
        assert (
            TIMING.match(s["ttft"])
            and float(s["tps"]) > 0
            and int(s["completion"]) == ref["usage"]["completion_tokens"]
        )
    assert output_text(page, 0) != output_text(page, 1)
    # usable on a laptop screen: nothing sticks out sideways
    assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    shot(page, "compare")
    page.emulate_media(color_scheme="dark")
    shot(page, "compare-dark")


def test_logprobs_shown_per_token_on_hover(open_page, server):
    page = open_page(server.base_url)
    user_box(page).fill("Say something.")
    set_params(page, 0, temperature=0, max_tokens=8, top_logprobs=3)
    pane(page).locator('[data-param="logprobs"]').check()
    page.click("#send")
    wait_state(page, 0, "done")
    tokens = pane(page).locator(".output .tok")
    assert tokens.count() >= 1
    entries = tokens.first.evaluate("e => e.lp")
    assert entries and len(entries[0]["top_logprobs"]) == 3
    # greedy: the chosen token is the most likely one
    assert entries[0]["logprob"] == pytest.approx(max(t["logprob"] for t in entries[0]["top_logprobs"]))
    tokens.first.hover()
    tip = page.locator("#tooltip")
    assert tip.is_visible()
    assert f"logprob {entries[0]['logprob']:.4f}" in tip.inner_text()
    assert tip.locator("tr").count() == 3
    shot(page, "logprobs")


def test_response_format_is_validated_before_sending(open_page, server):
    page = open_page(server.base_url)
    user_box(page).fill("Are you sure?")
    set_params(page, 0, temperature=0, max_tokens=30)
    page.locator('.pane[data-pane="0"] .rf summary').click()
    pane(page).locator(".rf-type").select_option("json_schema")
    sent = chat_requests(page)
    schema_box = pane(page).locator(".rf-schema")
    error = pane(page).locator(".rf-error")
    for bad, message in (
        ("{not json", "not valid JSON"),
        ('{"type": "objekt"}', 'unknown type "objekt"'),
        (
            '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["okay"]}',
            '"okay" is not a property',
        ),
        ('{"type": "string", "pattern": "("}', "pattern"),
    ):
        schema_box.fill(bad)
        assert message in error.inner_text(), (bad, error.inner_text())
        page.click("#send")
        assert message in page.locator("#send-note").inner_text() + error.inner_text()
    assert sent == []  # nothing went to the server

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    for accepted in (
        {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},  # OpenAI's whole
        {"type": "json", "value": schema},  # TGI's
        {"name": "r", "schema": schema, "strict": True},
    ):  # OpenAI's inner
        schema_box.fill(json.dumps(accepted))
        assert error.inner_text() == "", accepted
    schema_box.fill(json.dumps(schema))
    assert error.inner_text() == ""
    page.click("#send")
    wait_state(page, 0, "done", timeout=60_000)
    assert sent[0]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema, "strict": True},
    }
    jsonschema.validate(json.loads(output_text(page)), schema)


def test_tool_calls_render_as_calls(open_page, server):
    page = open_page(server.base_url)
    user_box(page).fill("What is the weather in Paris?")
    set_params(page, 0, temperature=0, max_tokens=200)
    page.locator('.pane[data-pane="0"] .tools summary').click()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    pane(page).locator(".tools-json").fill(json.dumps(tools))
    pane(page).locator(".tool-choice").select_option("required")
    sent = chat_requests(page)
    page.click("#send")
    wait_state(page, 0, "done", timeout=60_000)
    assert sent[0]["tools"] == tools and sent[0]["tool_choice"] == "required"
    card = pane(page).locator(".tool-call")
    assert card.count() == 1
    assert card.locator(".tool-call-name").inner_text() == "get_weather"
    assert card.locator(".tool-call-id-label").inner_text().startswith("call_")
    assert json.loads(card.locator(".tool-call-args").inner_text())["city"] in ("Paris", "Rome")
    assert "get_weather" not in output_text(page)  # a call, not raw text
    assert stats(page)["finish"] == "tool_calls"
    shot(page, "tool-call")
    # added to the conversation as an assistant message with tool_calls, then a tool message for the result
    page.click('.pane[data-pane="0"] .append')
    assert page.locator(".message").nth(-2).locator(".tool-call-name").inner_text() == "get_weather"
    assert page.locator(".message").last.get_attribute("data-role") == "tool"
    assert page.locator(".message").last.locator(".tool-call-id").input_value().startswith("call_")


def test_image_on_a_text_model_shows_the_servers_400(open_page, server, tmp_path):
    page = open_page(server.base_url)
    user_box(page).fill("What is in this picture?")
    page.locator('#messages .message[data-role="user"] .file').set_input_files(str(png_file(tmp_path)))
    page.wait_for_selector(".message .thumb img")
    page.click("#send")
    wait_state(page, 0, "failed")
    err = pane(page).locator(".error")
    assert "HTTP 400" in err.inner_text() and "image_input_not_supported" in err.inner_text()
    assert "does not accept images" in err.inner_text()
    assert "messages[1].content[1]" in err.inner_text()
    shot(page, "image-on-text-model")


def test_image_attached_on_a_vlm(open_page, vlm_server, tmp_path):
    page = open_page(vlm_server.base_url)
    picture = png_file(tmp_path)
    user_box(page).fill("Describe the image.")
    with page.expect_file_chooser() as chooser:  # the button opens the file picker
        page.locator('#messages .message[data-role="user"] .attach').click()
    chooser.value.set_files(str(picture))
    page.wait_for_selector(".message .thumb img")
    set_params(page, 0, temperature=0, max_tokens=12)
    sent = chat_requests(page)
    page.click("#send")
    wait_state(page, 0, "done")
    user = sent[0]["messages"][-1]
    assert user["content"] == [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": data_url(picture)}},
    ]
    body = {k: v for k, v in sent[0].items() if k not in ("stream", "stream_options")}
    ref = direct(vlm_server.base_url, body)
    text_only = direct(
        vlm_server.base_url,
        {**body, "messages": [*body["messages"][:-1], {"role": "user", "content": "Describe the image."}]},
    )
    assert output_text(page) == ref["choices"][0]["message"]["content"]
    assert int(stats(page)["prompt"]) == ref["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]
    shot(page, "vlm-image")


def test_code_view_snippets_run_against_the_server(open_page, server):
    page = open_page(server.base_url)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    user_box(page).fill("Hello, who are you?")
    set_params(page, 0, temperature=0, max_tokens=12, stop="\\n\\n")
    page.click("#code-button")
    dialog = page.locator("#code-dialog")
    assert dialog.is_visible()
    code = page.locator("#code-text")
    snippets = {}
    for lang in ("python-openai", "python-hf", "js-openai", "js-hf", "curl"):
        dialog.locator(f'[data-lang="{lang}"]').click()
        snippets[lang] = code.inner_text()
        assert f"{server.base_url}/v1" in snippets[lang], lang
        assert "Hello, who are you?" in snippets[lang], lang
    assert "from openai import OpenAI" in snippets["python-openai"]
    assert "InferenceClient(base_url=" in snippets["python-hf"]
    assert 'import OpenAI from "openai"' in snippets["js-openai"]
    assert 'from "@huggingface/inference"' in snippets["js-hf"] and "endpointUrl" in snippets["js-hf"]
    assert snippets["curl"].startswith(f"curl {server.base_url}/v1/chat/completions")
    dialog.locator('[data-lang="python-openai"]').click()
    shot(page, "code-view")
    page.click("#copy-code")
    assert page.evaluate("navigator.clipboard.readText()") == snippets["python-openai"]

    ref = direct(
        server.base_url,
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello, who are you?"},
            ],
            "temperature": 0,
            "max_tokens": 12,
            "stop": "\n\n",
        },
    )
    expected = ref["choices"][0]["message"]["content"] + "\n"
    for lang in ("python-openai", "python-hf"):
        run = subprocess.run([sys.executable, "-c", snippets[lang]], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (lang, run.stderr[-2000:])
        assert run.stdout == expected, (lang, run.stdout)
    if shutil.which("curl"):
        run = subprocess.run(["bash", "-c", snippets["curl"]], capture_output=True, text=True, timeout=60)
        assert json.loads(run.stdout)["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    page.keyboard.press("Escape")
    assert not dialog.is_visible()


def test_api_key_field_when_the_server_needs_one(open_page, text_engine):
    with serve_engine(text_engine, api_key="sekrit-key") as srv:
        page = open_page(srv.base_url, wait_models=False)
        page.wait_for_selector("#key-box:not([hidden])")
        assert "needs an API key" in page.locator("#key-note").inner_text()
        assert page.evaluate("document.activeElement.id") == "api-key"
        user_box(page).fill("Hi")
        set_params(page, 0, temperature=0, max_tokens=4)
        page.click("#send")
        wait_state(page, 0, "failed")
        assert "HTTP 401" in pane(page).locator(".error").inner_text()
        page.fill("#api-key", "sekrit-key")
        page.press("#api-key", "Enter")
        page.locator("#api-key").blur()
        page.wait_for_function("() => document.querySelector('.pane .model').value !== ''")
        page.click("#send")
        wait_state(page, 0, "done")
        assert page.evaluate("sessionStorage.getItem('chatserve.apiKey')") == "sekrit-key"
        assert page.evaluate("localStorage.length") == 0
        shot(page, "api-key")
        page.click("#code-button")
        for lang in ("python-openai", "curl"):
            page.locator(f'#code-dialog [data-lang="{lang}"]').click()
            snippet = page.locator("#code-text").inner_text()
            assert "sekrit-key" not in snippet and "CHATSERVE_API_KEY" in snippet
        page.locator('#code-dialog [data-lang="python-openai"]').click()
        snippet = page.locator("#code-text").inner_text()
        run = subprocess.run(
            [sys.executable, "-c", snippet],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CHATSERVE_API_KEY": "sekrit-key"},
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout == output_text(page) + "\n"
        page.keyboard.press("Escape")
