"""Per-model and per-tier counters of one engine, in a registry of their own.

The server renders ``EngineMetrics.registry`` at ``/metrics``; nothing here knows about HTTP.
Each engine has its own registry, so tests can run several engines in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineMetrics:
    """The counters the engine moves as it serves; names start with ``ptmserve_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ptmserve_requests", "Requests by final outcome.", ["model", "outcome"], registry=r
        )
        self.loads = Counter(
            "ptmserve_model_loads", "Model loads onto the device (switches).", ["model"], registry=r
        )
        self.evictions = Counter(
            "ptmserve_model_evictions", "Models evicted from a memory tier.", ["model", "tier"], registry=r
        )
        self.loaded_bytes = Counter(
            "ptmserve_model_loaded_bytes", "Weight bytes moved into a tier.", ["model", "tier"], registry=r
        )
        self.load_seconds = Counter(
            "ptmserve_model_load_seconds", "Seconds spent loading weights.", ["model"], registry=r
        )
        self.queue_seconds = Histogram(
            "ptmserve_queue_seconds",
            "Time from arrival to the start of the batch.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "ptmserve_compute_seconds",
            "Time to run one batch.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ptmserve_batch_size",
            "Requests per executed batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Counter(
            "ptmserve_batch_tokens", "Real (non-padding) tokens computed.", ["model"], registry=r
        )
        self.exits = Counter(
            "ptmserve_exits",
            "Classified inputs of models with early exits, by the last layer computed (num_layers - 1: all).",
            ["model", "layer"],
            registry=r,
        )
        self.resident_bytes = Gauge(
            "ptmserve_resident_bytes", "Weight bytes resident per memory tier.", ["tier"], registry=r
        )
        self.budget_bytes = Gauge(
            "ptmserve_budget_bytes", "Byte budget per memory tier.", ["tier"], registry=r
        )
        self.model_resident_bytes = Gauge(
            "ptmserve_model_resident_bytes",
            "Weight bytes of one model resident in a tier (shared tensors count for each user).",
            ["model", "tier"],
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "ptmserve_time_to_first_token_seconds",
            "Text generation: time from arrival to the first generated token.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "ptmserve_inter_token_seconds",
            "Text generation: time between two tokens of one sequence.",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "ptmserve_generated_tokens", "Text generation: tokens generated.", ["model"], registry=r
        )
        self.kv_blocks_in_use = Gauge(
            "ptmserve_kv_blocks_in_use", "Text generation: KV cache blocks held by sequences.", registry=r
        )
        self.kv_blocks = Gauge(
            "ptmserve_kv_blocks", "Text generation: KV cache blocks of the model generating now.", registry=r
        )
        self.kv_preemptions = Counter(
            "ptmserve_kv_preemptions",
            "Text generation: sequences that gave up their KV blocks to recompute later.",
            registry=r,
        )
