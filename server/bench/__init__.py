"""``chatserve bench``: a load generator for any OpenAI-compatible chat endpoint.

A client-side tool: it lives under ``server/`` because ``chatserve bench`` is one of the
``chatserve`` commands, but it imports nothing from ``engine/`` (and no torch), so it can run on
a client box. It works against chatserve, vLLM, TGI, ``transformers serve`` or anything else that
speaks ``POST {base}/chat/completions`` with ``stream=true``.

Two load shapes:

* closed loop (``--concurrency 1,8,32``): ``c`` workers each keep exactly one
  request in flight until ``--num-requests`` have been sent; one run per value.
* open loop (``--request-rate R``): requests arrive as a Poisson process at
  ``R`` req/s regardless of how fast the server answers; ``--concurrency C``
  then caps the number in flight (arrivals beyond it wait client-side).

Per request it records the send time, the time of every chunk that carries text (content or a
reasoning field), and the end time; TTFT is first such chunk - send, ITLs are the gaps between
consecutive ones (a server that packs several tokens in one chunk shows up as fewer, longer
gaps), TPOT is (e2e - TTFT) / (tokens - 1), with tokens from the final ``usage`` chunk
(``stream_options.include_usage``) or, if the server sends none, the number of chunks with text.

Modules: ``load`` (sending requests, closed and open loop, per-request recording), ``stats``
(percentiles, the summary of a run), ``report`` (text tables, PNG chart), ``cli`` (options, the
plan of runs, the JSON results file).

Programmatic use::

    from server.bench import DEFAULT_PROMPTS, run_load
    summary = asyncio.run(run_load("http://127.0.0.1:8000/v1", "my-model",
                                   concurrency=8, num_requests=64, max_tokens=64,
                                   prompts=DEFAULT_PROMPTS))
"""

from .cli import DEFAULT_CONCURRENCY, add_arguments, load_prompts, main, run
from .load import DEFAULT_PROMPTS, Prompt, RequestResult, build_payload, fetch_model, run_load, send_request
from .report import format_report, run_label, write_plot
from .stats import PERCENTILES, latency_stats, percentile, summarize

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PROMPTS",
    "PERCENTILES",
    "Prompt",
    "RequestResult",
    "add_arguments",
    "build_payload",
    "fetch_model",
    "format_report",
    "latency_stats",
    "load_prompts",
    "main",
    "percentile",
    "run",
    "run_label",
    "run_load",
    "send_request",
    "summarize",
    "write_plot",
]
