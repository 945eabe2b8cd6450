"""What `lorakit serve` shows at /metrics (Prometheus' text format), in a registry of its own: two
servers in one process (as in the tests) never share counters, and nothing lives at module level.

`model` labels are what clients send: an adapter's name, or the base model's served name."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; a CPU serves a token in tens of milliseconds, a GPU in a few
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Generation requests that ended, by model and finish reason "
                                "(stop, length, cancelled: the client left or the server stopped)",
                                ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens of accepted requests", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("lorakit_queue_depth", "Requests waiting for a slot in the running batch",
                                 registry=r)
        self.running = Gauge("lorakit_running_requests", "Requests in the running batch", registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From a request's arrival to its first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("lorakit_inter_token_latency_seconds", "Between a request's successive tokens",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapters = Gauge("lorakit_adapters_loaded", "Adapters loaded (in bank slots or waiting on the CPU)",
                              registry=r)
        self.adapter_loads = Counter("lorakit_adapter_loads", "Adapters loaded: at start and by /v1/load_lora_adapter",
                                     registry=r)
        self.adapter_unloads = Counter("lorakit_adapter_unloads", "Adapters unloaded by /v1/unload_lora_adapter",
                                       registry=r)
        self.adapter_evictions = Counter("lorakit_adapter_evictions", "Times an adapter gave its bank slot to another "
                                         "(it stays loaded, on the CPU, and takes a slot again when asked for)",
                                         registry=r)
        self.responses = Counter("lorakit_http_responses", "HTTP responses by route and status code",
                                 ["route", "status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
