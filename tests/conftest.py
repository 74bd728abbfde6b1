"""Shared fixtures: tiny random-weight models (saved with save_pretrained, loaded through the real
loader), engines on them, and real HTTP servers (uvicorn on a free loopback port in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from tiny_models import build_tiny_llama

# The tests run the server, its clients and the engine thread in one process on a 2-core
# machine: one intra-op thread avoids OpenMP oversubscription (7-18 s instead of ~1 s for a
# batch of 20 tiny requests). Serving keeps torch's default.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-notemplate"), chat_template=None)


def make_engine(model_dir, **config):
    from engine.engine import Engine, EngineConfig
    from engine.loader import load_model

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    return Engine(loaded, EngineConfig(**config)).start()


class ServerThread:
    """A real uvicorn server on 127.0.0.1:<free port>, run in a background thread."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_engine(engine, **app_kwargs) -> ServerThread:
    from server.app import create_app

    return ServerThread(create_app(engine, **app_kwargs))


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    with serve_engine(tiny_engine) as srv:
        yield srv


@pytest.fixture
def client(tiny_server):
    with httpx.Client(base_url=tiny_server.base_url, timeout=60) as c:
        yield c
