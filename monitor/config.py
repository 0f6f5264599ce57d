"""Settings of the monitor (composed into the service's Settings as `monitor`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SloSettings(BaseModel):
    """The champion's fidelity SLO over its last `window` shadow samples. Broken when the
    window holds at least `min_samples` and its mean KL(dense || sparse) exceeds
    `kl_mean_max` or its top-1 agreement falls below `top1_min`, clearly: at `confidence`
    (one-sided) the lower bound of the mean KL is above its limit, or the upper bound of the
    top-1 agreement below its own (None: the point estimates). A few hard prompts in a row
    are no breach; a predictor that is worse is one within a few dozen samples."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kl_mean_max: float = Field(0.5, gt=0.0)
    top1_min: float = Field(0.8, ge=0.0, le=1.0)
    min_samples: int = Field(20, ge=1)
    window: int = Field(200, ge=1)
    confidence: float | None = Field(0.95, gt=0.5, lt=1)


class DriftSettings(BaseModel):
    """Input drift of the serving version's feature rows against its reference."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    every_requests: int = Field(50, ge=1, description="run a check after this many new feature rows")
    interval_s: float = Field(300.0, gt=0, description="and on this schedule when rows arrived since")
    window: int = Field(100, ge=10, description="the newest rows compared with the reference")
    min_rows: int = Field(20, ge=5, description="no check on fewer current rows than this")
    columns: list[str] | None = None  # None: every feature column
    exclude_columns: list[str] = []  # e.g. ["prompt_len"] where prompt lengths give drift away
    drift_share: float = Field(0.5, gt=0.0, le=1.0, description="share of drifted columns that is dataset drift")
    # Evidently's own default switches to normed Wasserstein (threshold 0.1) above 1,000
    # reference rows, which flags 30 of 30 in-distribution windows of 20-100 rows here
    # (docs/MONITOR.md); the K-S test at p 0.05 flags none and still every shifted window
    method: str | None = "ks"
    html_report: bool = True  # log the Evidently HTML report with every check's MLflow run


class MonitorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True  # deploy the Monitor with the app
    fallback: Literal["dense", "lower"] = "dense"  # the lever pulled when the champion breaks the SLO
    slo: SloSettings = SloSettings()
    drift: DriftSettings = DriftSettings()
    experiment: str = "shadowgate-monitoring"  # MLflow experiment of the drift checks
    lease_ttl_s: float = Field(10.0, gt=1.0, description="the active monitor renews its lease at a third of this")
    poll_ms: int = Field(500, ge=10, description="how long one read of the streams blocks")
    claim_idle_s: float = Field(15.0, ge=0.0, description="entries pending this long on a dead consumer are reclaimed")
    features_maxlen: int = Field(100_000, ge=100, description="cap of the feature stream")
