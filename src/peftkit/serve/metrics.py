"""The server's Prometheus metrics (``GET /metrics``), one registry per server.

Counters: requests by model and status, prompt and generated tokens by model, adapter loads,
evictions, unloads and failures by adapter. Gauges: waiting requests, running rows, installed
adapters. Histograms: rows per forward, time to first token, time per output token (one decode step).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """The metrics and the hooks the engine, the adapter store and the routes call."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "Finished requests", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("peftkit_prompt_tokens", "Prompt tokens of finished requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("peftkit_generation_tokens", "Generated tokens", ["model"], registry=r)
        self.adapter_events = Counter("peftkit_adapter_events", "Adapter loads, evictions, unloads, failures",
                                      ["event", "adapter"], registry=r)
        self.waiting = Gauge("peftkit_queue_length", "Requests waiting to start", registry=r)
        self.running = Gauge("peftkit_running_rows", "Rows in the running decode batch", registry=r)
        self.adapters_installed = Gauge("peftkit_adapters_installed", "Adapters installed in the model", registry=r)
        self.batch_size = Histogram("peftkit_batch_rows", "Rows per forward pass", ["phase"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("peftkit_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("peftkit_time_per_output_token_seconds", "Time of one decode step (per output "
                              "token of each running row)", buckets=STEP_BUCKETS, registry=r)

    # engine hooks (engine thread)
    def engine_state(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def prefill(self, rows: int, tokens: int) -> None:
        self.batch_size.labels("prefill").observe(rows)

    def decode_step(self, rows: int, seconds: float) -> None:
        self.batch_size.labels("decode").observe(rows)
        self.tpot.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    # store and route hooks
    def adapter_event(self, event: str, name: str, installed: int) -> None:
        self.adapter_events.labels(event, name).inc()
        self.adapters_installed.set(installed)

    def request_done(self, model: str, status: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(model, str(status)).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
