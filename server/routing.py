"""Which engine answers a request: the served models, the names each answers to, and the rules for
the request's `model` field. The one place that maps a name to an engine.

A server serves one model or several, each with its own Engine. A model has an id (its first name:
what `/v1/models` lists first, the `model` label of its metrics) and may have aliases; every name
is listed by `/v1/models` and accepted in `model`. The folder, file or Hub id a model was loaded
from is accepted too, unless another model answers to it (or was loaded from the same place).

What `model` may be:
- a served name: that model answers, and the reply's `model` is the name the request used;
- the model's source (folder, file, Hub id): that model; the reply says its id;
- omitted, or a placeholder clients send when they do not choose (`""`, `"tgi"`, `"dummy"`,
  `"default"`: huggingface_hub sends these with a base_url): with one model, that model (OpenAI
  requires `model`; being lenient here keeps single-model clients simple); with several, a 400
  naming the choices, as guessing would answer from a model the client did not mean;
- anything else: a 404 `model_not_found` naming the served models.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .errors import APIError

# Names clients send when they do not care which model answers (huggingface_hub sends
# "dummy" or "tgi" when given a base_url).
ANY_MODEL = {"", "tgi", "dummy", "default"}


@dataclass
class ServedModel:
    name: str  # its id: first in /v1/models, the metrics label
    engine: Any
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def fingerprint(self) -> str:
        return f"chatserve-{__version__}-{self.engine.loaded.device}-{self.engine.loaded.dtype}"


def _names(names: str | Iterable[str]) -> list[str]:
    out = [names] if isinstance(names, str) else list(names)
    if not out or not all(isinstance(n, str) and n for n in out):
        raise ValueError(f"model names must be non-empty strings, got {names!r}")
    return list(dict.fromkeys(out))  # in order, each once


def serving_entries(engines, served_names: Iterable[str] | None = None) -> list[tuple[list[str], Any]]:
    """What create_app was given, as [(names, engine)]: the first name is the model's id.

    - one engine: named by its `model_name`, with `served_names` as its aliases;
    - a dict {name: engine}: several names of the same engine are one model with aliases (the
      first key its id);
    - a list of (names, engine), names a string or a list of strings.
    """
    if isinstance(engines, Mapping):
        grouped: dict[int, tuple[list[str], Any]] = {}
        for name, engine in engines.items():
            grouped.setdefault(id(engine), ([], engine))[0].append(name)
        pairs = list(grouped.values())
    elif isinstance(engines, (list, tuple)):
        pairs = [(names, engine) for names, engine in engines]
    else:
        pairs = [([engines.model_name, *(served_names or ())], engines)]
    if served_names and len(pairs) > 1:
        raise ValueError("served_names is for one engine; with several, give each its names")
    if not pairs:
        raise ValueError("no model to serve")
    return [(_names(names), engine) for names, engine in pairs]


class ModelRouter:
    """The served models and the name -> model map (names must be unique across models)."""

    def __init__(self, entries: list[tuple[list[str], Any]]):
        self.models = [ServedModel(name=names[0], aliases=tuple(names[1:]), engine=engine) for names, engine in entries]
        self._by_name: dict[str, ServedModel] = {}
        for m in self.models:
            for name in m.names:
                other = self._by_name.setdefault(name, m)
                if other is not m:
                    raise ValueError(f"the name {name!r} is given to two models ({other.name!r} and {m.name!r})")
        # a model's source answers too, where that is unambiguous (the same folder may be served twice)
        sources: dict[str, list[ServedModel]] = {}
        for m in self.models:
            source = getattr(getattr(m.engine, "loaded", None), "source", None)
            if source:
                sources.setdefault(source, []).append(m)
        self._by_source = {s: ms[0] for s, ms in sources.items() if len(ms) == 1 and s not in self._by_name}

    @property
    def single(self) -> bool:
        return len(self.models) == 1

    @property
    def served_names(self) -> list[str]:
        return [n for m in self.models for n in m.names]

    def _listing(self) -> str:
        return ", ".join(repr(n) for n in self.served_names)

    def lookup(self, name: str) -> tuple[ServedModel, str] | None:
        """(model, the name to report) for a served name or a model's source; None otherwise."""
        if name in self._by_name:
            return self._by_name[name], name
        if name in self._by_source:
            m = self._by_source[name]
            return m, m.name
        return None

    def resolve(self, requested: str | None) -> tuple[ServedModel, str]:
        """The model a request's `model` field picks, and the name its reply reports (see the module
        docstring); a 404 or a 400 naming the served models otherwise."""
        found = self.lookup(requested) if requested is not None else None
        if found is not None:
            return found
        if requested is None or requested in ANY_MODEL:
            if self.single:
                return self.models[0], self.models[0].name
            raise APIError(
                400,
                f"this server serves several models; say which in 'model': {self._listing()}",
                param="model",
                code="model_required",
            )
        raise self.not_found(requested)

    def not_found(self, requested: str) -> APIError:
        return APIError(
            404,
            f"model {requested!r} not found; this server serves {self._listing()}",
            param="model",
            code="model_not_found",
        )
