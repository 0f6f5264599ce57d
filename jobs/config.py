"""Settings of the online adaptation loop: the scheduler, the fine-tune job, approval and
the canary (YAML keys `jobs`, `adapt`, `canary`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from adapter.pipeline.targets import TargetPolicy


class JobsSettings(BaseModel):
    """APScheduler runs in the active monitor's process (the same Redis lease)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = True
    finetune_every_s: float = Field(3600, gt=0, description="period of the fine-tune job")
    rollout_every_s: float = Field(5, gt=0, description="period of the rollout controller (approval "
                                   "poll, canary decision)")
    misfire_grace_s: float = Field(30, gt=0)
    lock_ttl_s: float = Field(60, gt=0, description="a running job renews its lock at a third of this")
    registry_attempts: int = Field(5, ge=1, description="tries of a registry call while MLflow is down or "
                                   "failing, with exponential backoff; then the job fails (job_failure alert)")
    registry_backoff_s: float = Field(1.0, gt=0, description="first wait; doubled each try")
    registry_backoff_max_s: float = Field(16.0, gt=0)


class AdaptSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min_samples: int = Field(40, ge=4, description="new shadow samples a fine-tune needs; after a drift "
                             "alert the job runs early once this many exist")
    max_samples: int = Field(2000, ge=4, description="newest samples one run reads at most")
    holdout: float = Field(0.25, gt=0, lt=1, description="share of the newest samples held out for evaluation")
    replay_per_family: int = Field(100, ge=0, description="suite training instances per family the champion "
                                   "was trained on, replayed beside the new samples")
    replay_holdout_per_family: int = Field(10, ge=1, description="suite validation prompts per old family "
                                           "on which forgetting is measured")
    min_gain: float = Field(0.05, ge=0, description="relative drop in replayed mean KL on the held-out "
                            "samples a candidate needs over the champion to be registered")
    max_forget: float = Field(0.25, ge=0, description="relative rise in replayed mean KL on the champion's "
                              "own families a candidate may show (KLs below 0.05 count as 0.05)")
    epochs: int = Field(40, ge=1)
    lr: float = Field(5e-4, gt=0)
    patience: int = Field(8, ge=1)
    refit: bool = Field(True, description="once a candidate passes the gate, train it again on the training "
                        "data plus the held-out samples (as many epochs as the first fit peaked at)")
    early_retry_s: float = Field(60, gt=0, description="while drift lasts, another early fine-tune at most "
                                 "this often when the last one registered nothing")
    drift_lookback_s: float = Field(60, ge=0, description="during a drift episode the fine-tune skips samples "
                                    "older than the episode's start less this (the traffic that raised it)")
    early_max_runs: int = Field(8, ge=1, description="early fine-tunes of one drift episode at most")
    auto_approve: bool = False  # development only: a registered candidate is approved at once
    drift_shadow_rate: float | None = Field(0.5, ge=0, le=1, description="shadow rate while drift is "
                                            "active (samples come in faster); None: unchanged")
    webhook_secret: SecretStr | None = None  # the MLflow registry webhook's secret; None: generated
    webhook_url: str | None = None  # where MLflow delivers; None: <service>/hooks/mlflow
    targets: TargetPolicy = Field(TargetPolicy(), description="the target policy of shadow samples and of "
                                  "the fine-tune (adapter.pipeline.targets); the collector's default too")


class CanarySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    share: float = Field(0.2, gt=0, le=1, description="traffic share of the challenger")
    min_samples: int = Field(20, ge=1, description="shadow samples per arm before a decision")
    timeout_s: float = Field(1800, gt=0, description="decide with what there is after this long")
    margin: float = Field(0.02, ge=0, description="the challenger's top-1 agreement may be this much "
                          "below the champion's (the bound of the difference must clear it)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided confidence of the bounds the canary "
                              "is decided with")
    shadow_rate: float | None = Field(0.5, ge=0, le=1, description="shadow rate during a canary (both arms "
                                      "are sampled); None: unchanged")
