"""The Serve app end to end: a real Ray Serve app, a real Redis, a real MLflow registry
(SQLite store), driven over HTTP with httpx and the openai client."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time

import httpx
import pytest
import redis
import torch

from monitor.keys import Keys
from serving.replica.control import canary_arm
from tests.support import free_port, serve_app, wait_until
from tests.support import put_state as put_admin_state

pytestmark = pytest.mark.service

KEY, STRICT, NOSHADOW, LIMITED, ADMIN = "sk-test-main", "sk-test-strict", "sk-test-noshadow", "sk-test-limited", "adm-test"
PROMPT = "3 + 4 = 7 ; 2 + 2 = 4 ; 1 + 5 ="


@pytest.fixture(scope="module")
def service(tiny_model_dir, redis_url, registry_uri, tmp_path_factory):
    from adapter.runtime.loading import load
    from jobs.bootstrap import ensure_champion
    from jobs.registry import PredictorRegistry
    from serving.settings import load_settings

    port = free_port()
    settings = load_settings(
        None, model={"name": str(tiny_model_dir)}, runtime={"threads": 1}, port=port,
        api_keys=[{"key": KEY, "name": "main"},
                  {"key": STRICT, "name": "strict", "policy": {"max_sparsity": 0.0}},
                  {"key": NOSHADOW, "name": "noshadow", "policy": {"shadow": False}},
                  {"key": LIMITED, "name": "limited", "policy": {"rate_limit_per_min": 3}}],
        admin_key=ADMIN, redis={"url": redis_url}, mlflow={"tracking_uri": registry_uri},
        serve={"reconcile_s": 1.0, "shadow_max_inflight": 1, "replica_cpus": 0.1,
               "defaults": {"shadow_rate": 0.0, "sparsity": 0.5}})
    registry = PredictorRegistry(registry_uri, settings.mlflow.registered_model,
                                 tmp_path_factory.mktemp("predictor-cache"))
    loaded = load(str(tiny_model_dir), settings.runtime)
    v1 = ensure_champion(registry, str(tiny_model_dir), loaded, per_family=4, epochs=3)
    v2 = registry.register(registry.download(v1), tags={"source": "test-challenger"})
    with serve_app(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
        yield {"http": http, "base": base, "settings": settings, "v1": v1, "v2": v2, "loaded": loaded,
               "redis": redis.Redis.from_url(redis_url)}


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def put_state(service, **change):
    """(generation, replicas) once every replica applied the change."""
    return put_admin_state(service["http"], ADMIN, **change)


def complete(service, key=KEY, **body):
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, **body}
    return service["http"].post("/v1/completions", json=body, headers=auth(key))


def test_health_ready_and_models(service):
    http = service["http"]
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz").json()
    assert ready["status"] == "ready" and ready["llm"]["champion"] == service["v1"]
    models = http.get("/v1/models", headers=auth()).json()
    assert models["data"][0]["id"] == service["settings"].model.name


def test_openai_client_completion_and_stream(service):
    import openai

    client = openai.OpenAI(base_url=service["base"] + "/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model=service["settings"].model.name, prompt=PROMPT, max_tokens=4,
                                    temperature=0)
    ext = out.model_extra["shadowgate"]
    assert ext["predictor_version"] == service["v1"] and ext["sparsity"] == 0.5 and ext["arm"] == "champion"
    assert ext["effective_sparsity"] > 0 and ext["shadowed"] is False
    assert out.usage.completion_tokens == 4 and out.usage.prompt_tokens == len(
        service["loaded"].tokenizer.encode(PROMPT))
    chunks = list(client.completions.create(model=service["settings"].model.name, prompt=PROMPT, max_tokens=4,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks)
    assert text == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_echo_logprobs_of_token_id_batch_equal_the_dense_model(service):
    """What lm-evaluation-harness's local-completions sends: token-id prompts, echo, logprobs."""
    tok, model = service["loaded"].tokenizer, service["loaded"].runtime.model
    prompts = [tok.encode(PROMPT), tok.encode("the cat sees the dog")]
    r = complete(service, prompt=prompts, max_tokens=1, logprobs=1, echo=True, sparsity=0.0)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert choice["text"].startswith(tok.decode(ids, skip_special_tokens=True))
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
        for t in range(1, len(ids)):  # the top-1 entry is the argmax: lm-eval's is_greedy check
            assert max(lp["top_logprobs"][t].values()) == pytest.approx(float(ref[t - 1].max()), abs=1e-4)


@pytest.mark.parametrize("headers, status, message", [
    ({}, 401, "missing API key"),
    ({"Authorization": "Bearer wrong"}, 401, "invalid API key"),
    ({"Authorization": "Basic abc"}, 401, "malformed Authorization"),
    (auth(ADMIN), 403, "admin key is for /admin"),
])
def test_auth_errors(service, headers, status, message):
    r = service["http"].post("/v1/completions", json={"prompt": "1"}, headers=headers)
    assert r.status_code == status and message in r.json()["error"]["message"]


def test_admin_api_needs_the_admin_key(service):
    r = service["http"].get("/admin/state", headers=auth(KEY))
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, message", [
    ({"temperature": 5}, "temperature"),
    ({"n": 2}, "n other than 1"),
    ({"stream": True, "prompt": ["a", "b"]}, "batch of prompts with stream"),
    ({"bogus": 1}, "bogus"),
    ({"prompt": [1, 2, 99999]}, "token ids must be in"),
    ({"max_tokens": 100000}, "exceeds this server's limit"),
    ({"prompt": []}, "must not be an empty list"),
    ({"max_tokens": 0}, "only meaningful with echo"),
])
def test_bad_input_gets_a_400_with_a_message(service, body, message):
    r = complete(service, **body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


def test_invalid_json_and_key_bounds(service):
    r = service["http"].post("/v1/completions", content=b"{nope", headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = complete(service, key=STRICT, sparsity=0.5)
    assert r.status_code == 400 and "outside this key's bounds [0.0, 0.0]" in r.json()["error"]["message"]
    r = complete(service, key=STRICT)  # the operator's sparsity is clamped to the key's bounds: dense
    assert r.status_code == 200 and r.json()["shadowgate"]["sparsity"] == 0.0


def test_rate_limit(service):
    codes = [complete(service, key=LIMITED, max_tokens=1).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429


def test_state_change_is_applied_in_place(service):
    before = service["http"].get("/admin/state", headers=auth(ADMIN)).json()
    pids = {r["replica"]: r["pid"] for r in before["replicas"]}
    assert {"llm", "gateway"} <= {r["role"] for r in before["replicas"]}
    gen, reps = put_state(service, sparsity=0.3)
    assert gen == before["state"]["generation"] + 1
    assert {r["replica"]: r["pid"] for r in reps} == pids  # same processes: nothing restarted
    ext = complete(service).json()["shadowgate"]
    assert ext["sparsity"] == 0.3 and ext["generation"] == gen
    put_state(service, fallback="dense")
    assert complete(service).json()["shadowgate"]["arm"] == "dense"
    put_state(service, fallback="none", sparsity=0.5)


def test_canary_share_routes_the_expected_requests(service):
    put_state(service, challenger=service["v2"], canary_share=0.3)
    # the arm hashes the server's request id (a client's X-Request-ID is only a correlation id)
    arms = [service["http"].post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1},
                                 headers=auth()).json()["shadowgate"] for _ in range(40)]
    want = [canary_arm(a["request_id"], 0.3) for a in arms]
    assert [a["arm"] for a in arms] == want
    assert 4 <= want.count("challenger") <= 20
    for a in arms:
        assert a["predictor_version"] == (service["v2"] if a["arm"] == "challenger" else service["v1"])
    put_state(service, challenger="none", canary_share=0.0)


def test_shadowed_request_leaves_a_sample_and_audit(service):
    from adapter.pipeline.targets import Spec, TargetPolicy
    from jobs.finetune import score_examples
    from monitor.samples import SampleStore

    put_state(service, shadow_rate=1.0)
    try:
        r = complete(service, max_tokens=4)
        ext = r.json()["shadowgate"]
        assert ext["shadowed"] is True
        rid = ext["request_id"]
        record = wait_until(lambda: (lambda a: a if a.get("shadow") else None)(
            service["http"].get(f"/v1/requests/{rid}", headers=auth()).json()), 30, what="the shadow audit record")
        assert record["predictor_version"] == service["v1"] and len(record["layers"]) == 3
        assert record["layers"][0]["heads_skipped"] == [] and record["layers"][1]["heads_skipped"]
        store = SampleStore(service["redis"], "shadowgate", 100)
        samples = [s for s in store.read(50) if s[1].meta["request_id"] == rid]
        assert len(samples) == 1
        _, rec, fid = samples[0]
        shape = service["loaded"].runtime.shape
        assert rec.meta["source"] == "shadow" and rec.meta["targets"] == "pseudo_labels"
        assert rec.meta["policy"] == TargetPolicy().model_dump()
        # the sample is token ids (the job scores and can rescore it); the replica ran no backward
        tok = service["loaded"].tokenizer
        assert rec.meta["prompt_ids"] == tok.encode(PROMPT) and len(rec.meta["token_ids"]) == 4
        assert rec.meta["pseudo_labels"] == fid["pseudo_labels"] and rec.meta["stop"] == []
        assert rec.meta["label_ids"] == fid["pseudo_labels"][:len(rec.meta["label_ids"])]
        assert rec.meta["arm"] == "champion" and rec.tensors == {}
        # the fine-tune job's scoring of it: every criterion, the model's shape
        ex = score_examples(service["loaded"], [Spec.from_meta(rec.meta)], [None], TargetPolicy(), "plainact")
        assert ex.heads.shape == (1, shape.layers, shape.heads) and ex.neurons.shape == (1, shape.layers, shape.ffn)
        assert ex.x.shape == (1, shape.hidden) and torch.isfinite(ex.heads).all()
        assert len(fid["kl"]) == 4 and all(math.isfinite(k) for k in fid["kl"])
        # the pseudo-labels are the dense model's own next tokens along the served continuation
        model, ids = service["loaded"].runtime.model, rec.meta["prompt_ids"] + rec.meta["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        n = len(rec.meta["prompt_ids"])
        assert fid["pseudo_labels"] == logits[n - 1:len(ids) - 1].argmax(-1).tolist()
        # the audit record summarises exactly these positions
        assert record["shadow"]["positions"] == 4 and record["shadow"]["sample_id"] == samples[0][0]
        assert record["shadow"]["kl_mean"] == pytest.approx(sum(fid["kl"]) / 4)
        assert record["shadow"]["top1_agreement"] == pytest.approx(sum(fid["top1"]) / 4)
        # another key cannot read this record; the opted-out key is never shadowed
        assert service["http"].get(f"/v1/requests/{rid}", headers=auth(NOSHADOW)).status_code == 404
        assert complete(service, key=NOSHADOW).json()["shadowgate"]["shadowed"] is False
        metrics = service["http"].get("/metrics", headers=auth(ADMIN)).text
        assert f'shadowgate_fidelity_kl_count{{version="{service["v1"]}"}}' in metrics
    finally:
        put_state(service, shadow_rate=0.0)


def test_every_served_request_yields_a_drift_feature_row(service):
    from monitor import drift

    r = service["redis"]
    before = r.xlen(Keys("shadowgate").features)
    rids = [complete(service, max_tokens=2).json()["shadowgate"]["request_id"] for _ in range(3)]
    rids.append(complete(service, max_tokens=2, sparsity=0.0).json()["shadowgate"]["request_id"])  # dense too
    wait_until(lambda: r.xlen(Keys("shadowgate").features) >= before + 4, 30, what="four feature rows")
    rows = [json.loads(f[b"row"]) for _, f in r.xrange(Keys("shadowgate").features)]
    rows = {row["request_id"]: row for row in rows if row["request_id"] in rids}
    assert set(rows) == set(rids)
    cols = drift.feature_columns(16)
    first = rows[rids[0]]
    for row in rows.values():
        assert set(cols) <= set(row) and row["version"] == service["v1"]
        assert row["prompt_len"] == len(service["loaded"].tokenizer.encode(PROMPT))
        # one prompt, one basis (the champion's, for the dense request too): one row
        assert [row[c] for c in cols] == pytest.approx([first[c] for c in cols], rel=1e-4, abs=1e-5)
    # the champion's head scores on it, not missing (NaN) and not all alike (1.0)
    assert 0.0 < first["head_entropy"] < 1.0 and math.isfinite(first["keep_margin"])
    metrics = service["http"].get("/metrics", headers=auth(ADMIN)).text
    assert 'shadowgate_features_dropped_total{reason="redis"} 0.0' in metrics


def test_every_version_carries_its_drift_reference(service, tmp_path):
    from jobs.registry import PredictorRegistry
    from monitor import drift

    s = service["settings"]
    folder = PredictorRegistry(s.mlflow.tracking_uri, s.mlflow.registered_model, tmp_path).download(service["v1"])
    basis, rows = drift.load_reference(folder)
    assert len(rows) >= 1000 and list(rows.columns[:len(drift.feature_columns(16))]) == drift.feature_columns(16)
    assert basis.components.shape == (16, service["loaded"].runtime.shape.hidden)


def test_admin_state_refuses_a_version_the_registry_does_not_hold(service):
    r = service["http"].put("/admin/state", json={"champion": "999"}, headers=auth(ADMIN))
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = service["http"].put("/admin/state", json={"challenger": "998"}, headers=auth(ADMIN))
    assert r.status_code == 404


async def _burst(base: str, n: int) -> list[tuple[float, dict]]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        async def one(i):
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", headers=auth(),
                                  json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0, r.json()["shadowgate"]
        return await asyncio.gather(*(one(i) for i in range(n)))


def dropped(service) -> float:
    for line in service["http"].get("/metrics", headers=auth(ADMIN)).text.splitlines():
        if line.startswith('shadowgate_shadow_dropped_total{reason="saturated"}'):
            return float(line.split()[-1])
    return 0.0


def test_saturated_shadow_path_drops_without_delaying_clients(service):
    base = asyncio.run(_burst(service["base"], 8))
    put_state(service, shadow_rate=1.0)
    try:
        before = dropped(service)
        burst = asyncio.run(_burst(service["base"], 8))
    finally:
        put_state(service, shadow_rate=0.0)
    shadowed = [ext["shadowed"] for _, ext in burst]
    assert any(shadowed) and not all(shadowed)  # in-flight bound 1: the rest were dropped
    assert dropped(service) - before == shadowed.count(False)
    # clients never wait for a shadow run: the burst is not slower than shadow work would make it
    p50_base = statistics.median(t for t, _ in base)
    p50_sat = statistics.median(t for t, _ in burst)
    assert p50_sat < 3 * p50_base + 0.5


def test_concurrent_plain_requests_are_batched_with_the_same_tokens(service):
    prompts = [PROMPT, "the cat sees the dog ;", "a b c ; b c d ;", "9 + 1 = 0 ; 4 + 4 ="]

    async def burst(extra):
        async with httpx.AsyncClient(base_url=service["base"], timeout=60, headers=auth()) as client:
            rs = await asyncio.gather(*(client.post("/v1/completions", json={
                "prompt": p, "max_tokens": 5, "temperature": 0, **extra}) for p in prompts))
        return [r.json()["choices"][0]["text"] for r in rs]

    # logprobs makes a request unbatchable: the single-sequence token loop is the reference
    assert asyncio.run(burst({})) == asyncio.run(burst({"logprobs": 0}))
