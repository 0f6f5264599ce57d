"""Prometheus metrics of the gateway (one registry per gateway process, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shadowgate_requests", "Completion requests by outcome", ["status", "arm"], registry=r)
        self.latency = Histogram("shadowgate_request_latency_seconds", "End-to-end completion latency",
                                 ["stream"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("shadowgate_tokens", "Tokens processed", ["kind"], registry=r)
        self.sparsity = Histogram("shadowgate_sparsity", "Sparsity applied per request", ["kind"], registry=r,
                                  buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.shadow_sampled = Counter("shadowgate_shadow_sampled", "Requests sent to the shadow dense run",
                                      registry=r)
        self.shadow_dropped = Counter("shadowgate_shadow_dropped", "Sampled requests dropped", ["reason"],
                                      registry=r)
        self.shadow_dropped.labels("saturated")  # exported at 0 from the start
        self.shadow_failed = Counter("shadowgate_shadow_failed", "Shadow runs that failed", registry=r)
        self.shadow_inflight = Gauge("shadowgate_shadow_inflight", "Shadow runs in flight", registry=r)
        self.fid_kl = Histogram("shadowgate_fidelity_kl", "Mean KL(dense||sparse) per shadowed request",
                                ["version"], registry=r, buckets=(0.001, 0.01, 0.03, 0.1, 0.3, 1, 3, 10))
        self.fid_top1 = Histogram("shadowgate_fidelity_top1_agreement", "Top-1 agreement per shadowed request",
                                  ["version"], registry=r, buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
        self.fid_exact = Counter("shadowgate_fidelity_exact_match", "Shadowed requests by exact match",
                                 ["version", "match"], registry=r)
        self.generation = Gauge("shadowgate_control_generation", "Control-state generation served", registry=r)
