"""Every Redis key name of the service, in one place.

All keys live under the service prefix P (`settings.redis.prefix`, "shadowgate" by default);
`Keys(P)` spells each one. The names are a contract: running deployments, the CLI and the
tests read them, so a name here never changes. The keys are not hash-tagged: the service
uses one Redis, not a cluster.

    key                                   type      holds
    P:control:state                       string    the control document (JSON ControlState)
    P:control:notify                      pub/sub   a new generation was written
    P:control:history                     stream    every control document written, {"state": JSON}
    P:control:replicas                    hash      replica id -> heartbeat (applied generation, epoch)

    P:shadow:samples                      stream    shadow samples: TraceRecord fields + "fidelity"
    P:shadow:expiry                       zset      sample entry id -> retention deadline
    P:features                            stream    the gateway's feature rows, {"row": JSON}
    P:audit:<request_id>                  string    the request's audit record (JSON), expires
    P:audit:<request_id>:shadow           string    its shadow comparison (JSON), expires
    P:rate:log:<what>:<key_name>          zset      what a key took in the last 60 s: member "<id>:<n>", score the time
    P:rate:total:<what>:<key_name>        string    the sum of n over that log
    P:llm:timing:<pid>                    string    one replica's decode-loop counters (JSON), expires

    P:monitor:lease                       string    the active monitor instance (SET NX PX)
    P:monitor:window:<version>:<arm>      list      JSON rows of the last `slo.window` samples
    P:monitor:totals                      hash      "<version>|<arm>" -> samples counted
    P:monitor:features:<version>          list      JSON rows of the last `drift.window` feature rows
    P:monitor:feature_totals              hash      version -> feature rows counted
    P:monitor:since_check                 hash      version -> feature rows since its last drift check
    P:monitor:drift                       hash      version -> the last drift check (JSON)
    P:monitor:champion_seen               string    the champion the windows were last started for
    P:monitor:fallback_seen               string    the fallback lever as last seen
    P:monitor:control_seen                string    the last control-history entry looked at
    P:monitor:summary                     string    the monitor's summary (JSON) for /metrics and admin
    P:monitor:status                      string    the active instance's status (JSON)

    P:alerts                              stream    alert records, {"alert": JSON}; group "notify"
    P:alerts:live                         pub/sub   the same JSON, fire and forget
    P:alerts:dedup:<dedup_key>            string    the open incident's alert id, expires after cool-down
    P:alerts:suppressed                   hash      dedup key -> raises suppressed while open
    P:alerts:deliveries                   hash      alert id -> JSON webhook delivery outcomes

    P:jobs:running                        hash      job name -> the run in progress (JSON)
    P:jobs:last                           hash      job name -> the last result (JSON)
    P:jobs:history                        list      finished runs (JSON), newest first, capped
    P:jobs:next                           hash      job name -> next run and schedule (JSON)
    P:jobs:lock:<name>                    string    the job's run lock, renewed by a heartbeat

    P:rollout:state                       string    the rollout controller's state (JSON)
    P:rollout:decisions                   list      decisions (JSON), newest first, capped
    P:rollout:commands                    list      queued operator commands (JSON)
    P:rollout:events                      list      registry webhook events (JSON), capped
    P:rollout:webhook_secret              string    the registry webhook's generated secret
    P:rollout:webhook_deliveries          string    webhook deliveries received (counter)

    P:bench:probe                         stream    the fault bench's write probe

A `*` passed where a method takes a name part gives a SCAN pattern (e.g.
`monitor_window("*", "champion")`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix: `Keys("sg").monitor_drift == "sg:monitor:drift"`."""

    prefix: str

    def _k(self, *parts: object) -> str:
        return ":".join((self.prefix, *map(str, parts)))

    # ---- control state -------------------------------------------------------------------
    @property
    def control_state(self) -> str:
        """string: the control document (JSON ControlState)."""
        return self._k("control", "state")

    @property
    def control_notify(self) -> str:
        """pub/sub channel: a new control generation was written."""
        return self._k("control", "notify")

    @property
    def control_history(self) -> str:
        """stream: every control document written, field "state"."""
        return self._k("control", "history")

    @property
    def control_replicas(self) -> str:
        """hash: replica id -> its heartbeat (JSON: applied generation and epoch)."""
        return self._k("control", "replicas")

    # ---- request path ----------------------------------------------------------------------
    @property
    def shadow_samples(self) -> str:
        """stream: shadow samples (TraceRecord fields + "fidelity"), capped."""
        return self._k("shadow", "samples")

    @property
    def shadow_expiry(self) -> str:
        """sorted set: shadow sample entry id -> retention deadline (unix s)."""
        return self._k("shadow", "expiry")

    @property
    def features(self) -> str:
        """stream: the gateway's feature rows, field "row" (JSON)."""
        return self._k("features")

    def audit(self, request_id: str) -> str:
        """string: a request's audit record (JSON), expires after the audit retention."""
        return self._k("audit", request_id)

    def audit_shadow(self, request_id: str) -> str:
        """string: a request's shadow comparison (JSON), expires with its audit record."""
        return self._k("audit", request_id, "shadow")

    def rate_log(self, what: str, key_name: str) -> str:
        """sorted set: `what` ("prompts" or "tokens") an API key took in the sliding window,
        member "<id>:<n>", score the time it was taken (serving/api/auth.py RateLimiter)."""
        return self._k("rate", "log", what, key_name)

    def rate_total(self, what: str, key_name: str) -> str:
        """string: the sum of n over the key's rate log, kept in step with it."""
        return self._k("rate", "total", what, key_name)

    def llm_timing(self, pid: int | str) -> str:
        """string: one replica process's decode-loop counters (JSON), expires."""
        return self._k("llm", "timing", pid)

    # ---- monitor ---------------------------------------------------------------------------
    @property
    def monitor_lease(self) -> str:
        """string: the active monitor instance (SET NX PX lease)."""
        return self._k("monitor", "lease")

    def monitor_window(self, version: str, arm: str) -> str:
        """list: JSON rows of the last `slo.window` shadow samples of a version and arm."""
        return self._k("monitor", "window", version, arm)

    @property
    def monitor_windows(self) -> str:
        """SCAN pattern: every fidelity window."""
        return self._k("monitor", "window", "*")

    @property
    def monitor_totals(self) -> str:
        """hash: "<version>|<arm>" -> shadow samples counted."""
        return self._k("monitor", "totals")

    def monitor_features(self, version: str) -> str:
        """list: JSON rows of the last `drift.window` feature rows of a version."""
        return self._k("monitor", "features", version)

    @property
    def monitor_feature_totals(self) -> str:
        """hash: version -> feature rows counted."""
        return self._k("monitor", "feature_totals")

    @property
    def monitor_since_check(self) -> str:
        """hash: version -> feature rows since its last drift check."""
        return self._k("monitor", "since_check")

    @property
    def monitor_drift(self) -> str:
        """hash: version -> its last drift check (JSON)."""
        return self._k("monitor", "drift")

    @property
    def monitor_champion_seen(self) -> str:
        """string: the champion the fidelity windows were last started for."""
        return self._k("monitor", "champion_seen")

    @property
    def monitor_fallback_seen(self) -> str:
        """string: the fallback lever as the monitor last saw it."""
        return self._k("monitor", "fallback_seen")

    @property
    def monitor_control_seen(self) -> str:
        """string: the last control-history entry id the monitor looked at."""
        return self._k("monitor", "control_seen")

    @property
    def monitor_summary(self) -> str:
        """string: the monitor's summary (JSON) that /metrics and the admin API show."""
        return self._k("monitor", "summary")

    @property
    def monitor_status(self) -> str:
        """string: the active monitor instance's status (JSON)."""
        return self._k("monitor", "status")

    # ---- alerts ----------------------------------------------------------------------------
    @property
    def alerts(self) -> str:
        """stream: alert records, field "alert" (JSON); consumer group "notify"."""
        return self._k("alerts")

    @property
    def alerts_live(self) -> str:
        """pub/sub channel: each alert's JSON as raised."""
        return self._k("alerts", "live")

    def alerts_dedup(self, dedup_key: str) -> str:
        """string: the open incident's alert id, expires after the cool-down."""
        return self._k("alerts", "dedup", dedup_key)

    @property
    def alerts_suppressed(self) -> str:
        """hash: dedup key -> raises suppressed while its incident was open."""
        return self._k("alerts", "suppressed")

    @property
    def alerts_deliveries(self) -> str:
        """hash: alert id -> JSON {webhook index: delivery outcome}."""
        return self._k("alerts", "deliveries")

    # ---- jobs ------------------------------------------------------------------------------
    @property
    def jobs_running(self) -> str:
        """hash: job name -> the run in progress (JSON)."""
        return self._k("jobs", "running")

    @property
    def jobs_last(self) -> str:
        """hash: job name -> its last result (JSON)."""
        return self._k("jobs", "last")

    @property
    def jobs_history(self) -> str:
        """list: finished runs (JSON), newest first, capped."""
        return self._k("jobs", "history")

    @property
    def jobs_next(self) -> str:
        """hash: job name -> its next run and schedule (JSON)."""
        return self._k("jobs", "next")

    def jobs_lock(self, name: str) -> str:
        """string: a job's run lock, renewed by the runner's heartbeat."""
        return self._k("jobs", "lock", name)

    # ---- rollout ---------------------------------------------------------------------------
    @property
    def rollout_state(self) -> str:
        """string: the rollout controller's state (JSON)."""
        return self._k("rollout", "state")

    @property
    def rollout_decisions(self) -> str:
        """list: rollout decisions (JSON), newest first, capped."""
        return self._k("rollout", "decisions")

    @property
    def rollout_commands(self) -> str:
        """list: operator commands (JSON) queued for the controller."""
        return self._k("rollout", "commands")

    @property
    def rollout_events(self) -> str:
        """list: registry webhook events (JSON) queued for the controller, capped."""
        return self._k("rollout", "events")

    @property
    def rollout_webhook_secret(self) -> str:
        """string: the registry webhook's secret, generated once when none is configured."""
        return self._k("rollout", "webhook_secret")

    @property
    def rollout_webhook_deliveries(self) -> str:
        """string: registry webhook deliveries received (a counter)."""
        return self._k("rollout", "webhook_deliveries")

    # ---- benches ---------------------------------------------------------------------------
    @property
    def bench_probe(self) -> str:
        """stream: the fault bench's write probe."""
        return self._k("bench", "probe")
