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
        self.refused = Counter("shadowgate_refused", "Requests refused before any work, by bound", ["reason"],
                               registry=r)
        for reason in ("body_size", "prompts", "prompt_bytes", "tokens", "rate_limit"):
            self.refused.labels(reason)
        self.retries = Counter("shadowgate_replica_retries", "Calls retried after their GatedLLM replica failed",
                               ["kind"], registry=r)
        self.audit_failed = Counter("shadowgate_audit_failed", "Audit records not written (Redis)", registry=r)
        self.generation = Gauge("shadowgate_control_generation", "Control-state generation served", registry=r)
        self.features_dropped = Counter("shadowgate_features_dropped", "Drift feature rows not written",
                                        ["reason"], registry=r)
        for reason in ("redis", "backlog"):
            self.features_dropped.labels(reason)
        self.features_written = Counter("shadowgate_features_written", "Drift feature rows written", registry=r)
        # the monitor's fidelity windows (one source: its summary in Redis), per version and arm
        va = ["version", "arm"]
        self.window_kl = Gauge("shadowgate_fidelity_kl_mean", "Mean KL(dense||sparse) over the fidelity window",
                               va, registry=r)
        self.window_kl_p95 = Gauge("shadowgate_fidelity_kl_p95", "p95 of per-sample mean KL over the window",
                                   va, registry=r)
        self.window_top1 = Gauge("shadowgate_fidelity_top1", "Top-1 agreement over the fidelity window", va,
                                 registry=r)
        self.window_exact = Gauge("shadowgate_fidelity_exact_match_rate", "Exact-match rate over the window", va,
                                  registry=r)
        self.window_samples = Gauge("shadowgate_fidelity_samples", "Shadow samples in the fidelity window", va,
                                    registry=r)
        self.drift_share = Gauge("shadowgate_drift_share", "Share of drifted feature columns at the last check",
                                 ["version"], registry=r)
        self.monitor_age = Gauge("shadowgate_monitor_summary_age_seconds",
                                 "Seconds since the monitor last wrote its summary", registry=r)

    def set_monitor(self, summary: dict | None, now: float) -> None:
        """Export the monitor's summary (read from Redis by the gateway)."""
        gauges = (self.window_kl, self.window_kl_p95, self.window_top1, self.window_exact, self.window_samples)
        for g in (*gauges, self.drift_share):
            g.clear()
        if not summary:
            return
        self.monitor_age.set(max(0.0, now - summary["ts"]))
        for w in summary.get("windows", []):
            labels = (w["version"], w["arm"])
            self.window_samples.labels(*labels).set(w["count"])
            for g, k in ((self.window_kl, "kl_mean"), (self.window_kl_p95, "kl_p95"), (self.window_top1, "top1"),
                         (self.window_exact, "exact_match")):
                if w.get(k) is not None:
                    g.labels(*labels).set(w[k])
        for version, d in summary.get("drift", {}).items():
            self.drift_share.labels(version).set(d["share"])
