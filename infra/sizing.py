"""Redis memory a shadow-sample stream needs: bytes of real samples of a model (the embedded
default unless named), times the stream's cap. Used for the sizing table of docs/OPERATIONS.md:
    python infra/sizing.py [--model default] [--per-family 4] [--maxlen 10000]
A sample is what ShadowDense writes (TraceRecord.to_fields(): meta JSON + safetensors bytes of
the predictor input, every criterion's head and neuron scores and the per-token statistics)."""

from __future__ import annotations

import argparse
import json
import statistics

from adapter.config import RuntimeConfig
from adapter.embedded import suite
from adapter.evaluation import scoring
from adapter.pipeline import criteria, traces
from adapter.runtime.loading import load


def sample_sizes(model: str, per_family: int) -> list[int]:
    loaded = load(model, RuntimeConfig(dtype="float32"))
    rt, tok = loaded.runtime, loaded.tokenizer
    pairs = scoring.encode_pairs(tok, suite.split("test", per_family))
    common = {"model_fingerprint": traces.model_fingerprint(rt.model), "source": "shadow",
              "targets": "pseudo_labels", "criteria": list(criteria.CRITERIA)}
    sizes = []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        batch = criteria.make_batch([p for p, _ in chunk], [a for _, a in chunk], tok.pad_token_id or 0)
        scores = criteria.compute(rt.model, batch, rt.shape.heads, rt.shape.head_dim)
        metas = [{"request_id": f"r{start + j}", "prompt_ids": p, "token_ids": a, "predictor_version": "1",
                  "arm": "champion", "sparsity": 0.5, "generation": 1, "key": "sizing"}
                 for j, (p, a) in enumerate(chunk)]
        for rec in traces.records_from_scores(scores, common, metas):
            sizes.append(sum(len(v) for v in rec.to_fields().values()))
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--per-family", type=int, default=4)
    ap.add_argument("--maxlen", type=int, default=10_000, help="serve.shadow_stream_maxlen")
    a = ap.parse_args()
    sizes = sample_sizes(a.model, a.per_family)
    med = statistics.median(sizes)
    print(json.dumps({"model": a.model, "samples": len(sizes), "sample_bytes_median": med,
                      "sample_bytes_max": max(sizes), "maxlen": a.maxlen,
                      "stream_mib_median": round(med * a.maxlen / 2**20), "stream_mib_max": round(max(sizes) * a.maxlen / 2**20)}))


if __name__ == "__main__":
    main()
