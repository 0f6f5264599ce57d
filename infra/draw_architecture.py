"""Draw docs/architecture.png, the picture of docs/OPERATIONS.md:
    python infra/draw_architecture.py [out.png]
Boxes are the running parts, arrows what flows between them; the dashed frame is the Ray
cluster (one head, N worker nodes)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLORS = {"ray": "#dbe9f6", "state": "#fde9c9", "people": "#e4f2de", "ext": "#eeeeee"}


def box(ax, x, y, w, h, title, lines=(), kind="ray"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLORS[kind], ec="#333333", lw=1.2))
    ax.text(x + w / 2, y + h - 0.17, title, ha="center", va="top", fontsize=10.5, weight="bold")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.50 - 0.25 * i, line, ha="center", va="top", fontsize=8.2)
    return {"l": (x, y + h / 2), "r": (x + w, y + h / 2), "t": (x + w / 2, y + h), "b": (x + w / 2, y),
            "x": x, "y": y, "w": w, "h": h}


def arrow(ax, a, b, label="", rad=0.0, style="-|>", dashed=False, offset=(0, 0.12), fs=7.8):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, lw=1.1, color="#444444",
                                 connectionstyle=f"arc3,rad={rad}", linestyle="--" if dashed else "-",
                                 shrinkA=2, shrinkB=2))
    if label:
        mx, my = (a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1]
        ax.text(mx, my, label, ha="center", va="bottom", fontsize=fs, color="#222222",
                bbox={"fc": "white", "ec": "none", "pad": 0.5, "alpha": 0.85})


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(15, 9.4))
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 9.4)
    ax.axis("off")
    ax.text(7.5, 9.3, "shadowgate: serving, shadow checks, monitoring and rollout", ha="center", va="top",
            fontsize=13, weight="bold")

    # the Ray cluster frame
    ax.add_patch(FancyBboxPatch((2.35, 2.45), 7.6, 6.05, boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc="none", ec="#2b6cb0", lw=1.4, ls="--"))
    ax.text(9.9, 2.32, "Ray cluster (token auth): one head, N workers", fontsize=9, color="#2b6cb0", va="top",
            ha="right", weight="bold")

    box(ax, 0.1, 6.3, 1.9, 1.6, "Clients", ["OpenAI-compatible", "/v1/completions", "HTTPS + API key"], "people")
    gw = box(ax, 2.6, 6.2, 2.6, 1.9, "Gateway", ["Serve ingress (proxy per node)", "auth, validation, rate limit",
                                                "canary arm, shadow sampling", "/healthz /readyz /metrics"])
    llm = box(ax, 6.0, 6.2, 3.7, 1.9, "GatedLLM  x N", ["one or more per worker node (CPU / GPU)",
                                                     "champion + challenger predictors", "gathered sparse matmuls",
                                                     "fallback: dense / lower sparsity"])
    shadow = box(ax, 6.0, 4.15, 3.7, 1.45, "ShadowDense", ["sampled requests, never awaited",
                                                        "dense vs sparse: KL, top-1", "importance targets (pseudo-labels)"])
    mon = box(ax, 5.3, 2.65, 4.4, 1.25, "Monitor (one active: Redis lease)",
              ["fidelity windows, SLO fallback, drift (Evidently)",
               "scheduler: fine-tune, rollout (canary / promote / rollback)"])
    box(ax, 2.6, 2.65, 2.4, 1.25, "Serve controller, GCS", ["on the head; restarts replicas,", "reconfigures in place"])

    redis = box(ax, 10.8, 5.0, 4.0, 3.1, "Redis (AOF / managed)", ["control state (generation, epoch)",
                                                                 "shadow sample + feature streams",
                                                                 "alerts stream, incidents",
                                                                 "leases, job records, rate limits",
                                                                 "audit records (retention)"], "state")
    mlflow = box(ax, 10.8, 0.55, 4.0, 3.0, "MLflow (PostgreSQL + artifacts)", ["registry: predictor versions",
                                                                            "aliases: champion, candidate",
                                                                            "fine-tune runs, drift reports",
                                                                            "UI: approval = set an alias",
                                                                            "webhook -> POST /hooks/mlflow"], "state")
    hooks = box(ax, 2.6, 0.25, 3.0, 1.55, "Alert webhooks", ["JSON / Slack, HMAC-signed",
                                                            "one per incident (cool-down)", "runbook: OPERATIONS.md"], "ext")
    people = box(ax, 6.6, 0.25, 3.3, 1.55, "Operators, approvers", ["MLflow UI: approve a version",
                                                                   "shadowgate CLI / admin API", "receive alerts"],
                 "people")

    arrow(ax, (2.0, 7.1), gw["l"])
    arrow(ax, gw["r"], llm["l"], "generate")
    arrow(ax, (4.9, 6.2), (6.0, 4.9), "sample (rate r)", offset=(-0.75, -0.2))
    arrow(ax, (9.7, 4.9), (10.8, 5.45), "samples", offset=(0.15, -0.4))
    arrow(ax, (3.9, 8.1), (10.8, 7.9), "audit, features, rate limits", rad=-0.12, offset=(0.4, 0.42))
    arrow(ax, (10.8, 7.0), (9.7, 7.0), "control", offset=(0, 0.04))
    arrow(ax, (9.7, 3.65), (10.8, 5.15), "streams,\nalerts", style="<|-|>", offset=(-0.05, -0.3))
    arrow(ax, (9.7, 2.95), (10.8, 2.75), "runs, aliases", style="<|-|>", offset=(0.0, -0.42))
    arrow(ax, (11.3, 3.55), (9.45, 6.2), "versions", offset=(-0.05, 0.83))
    arrow(ax, (5.6, 2.65), (4.6, 1.8), "alerts", offset=(-0.35, -0.1))
    arrow(ax, (5.6, 1.0), (6.6, 1.0))
    arrow(ax, (9.9, 1.0), (10.8, 1.2), "approve", dashed=True, offset=(0.0, -0.45))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "architecture.png"
    draw(target)
    print(target)
