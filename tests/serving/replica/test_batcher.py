"""The replica's decode loop (serving/replica/batcher.py) on a real engine: every request kind runs
in one continuously batched loop with the same outputs as alone; a request that arrives
while another decodes joins the running batch; a cancelled request stops taking steps.
Last, over real HTTP through Ray Serve: a streamed request whose client disconnects stops
consuming decode steps."""

from __future__ import annotations

import queue
import time

import httpx
import pytest

from adapter.selection.artifact import LoadedPredictor
from adapter.selection import predictors as P
from monitor.state import ControlState
from serving.replica.batcher import Batcher
from serving.replica.engine import Engine, GenRequest
from serving.api.openai_format import format_result
from serving.settings import load_settings
from tests.support import free_port, serve_app, wait_until

PROMPTS = ["3 + 4 = 7 ; 2 + 2 = 4 ; 1 + 5 =", "the cat sees the dog ;", "a b c ; b c d ;", "9 + 1 = 0 ; 4 + 4 ="]


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a long context, so a request can run for thousands of steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("long-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A dense and a sparse arm: the champion is a random unified predictor (any mask will
    do for scheduling; the fidelity of a mask is not what is tested here)."""
    settings = load_settings(None, model={"name": str(tiny_model_dir)}, runtime={"threads": 1})
    eng = Engine(settings, None)
    eng.predictors["t"] = LoadedPredictor("shadowllm", "plainact", {}, P.random_unified(eng.shape, 16).eval())
    eng.bases["t"] = None
    eng.champion, eng.state = "t", ControlState(sparsity=0.5)
    return eng


def collect(events: queue.Queue, timeout: float = 60.0) -> tuple[list[tuple], tuple]:
    """(token events, the terminal event) of one request's channel."""
    tokens = []
    while True:
        ev = events.get(timeout=timeout)
        if ev[0] != "tokens":
            return tokens, ev
        tokens.append(ev)


def requests(engine) -> list[tuple[GenRequest, bool]]:
    """One of each kind, at sparsity 0.5 and 0; a stop string that the greedy continuation
    of its prompt really contains (found by running it alone first)."""
    probe = engine.complete(GenRequest("probe", PROMPTS[2], max_tokens=12, temperature=0.0, sparsity=0.5))
    words = probe.text.split()
    assert len(words) >= 4, probe.text
    stop = " " + words[2]
    return [(GenRequest("plain", PROMPTS[0], max_tokens=10, temperature=0.0, sparsity=0.5), False),
            (GenRequest("plain-dense", PROMPTS[1], max_tokens=7, temperature=0.0, sparsity=0.0), False),
            (GenRequest("stream", PROMPTS[1], max_tokens=9, temperature=0.0, sparsity=0.5), True),
            (GenRequest("stop", PROMPTS[2], max_tokens=12, temperature=0.0, sparsity=0.5, stop=(stop,)), False),
            (GenRequest("stop-stream", PROMPTS[2], max_tokens=12, temperature=0.0, sparsity=0.5, stop=(stop,)), True),
            (GenRequest("echo", PROMPTS[3], max_tokens=3, temperature=0.0, sparsity=0.5, logprobs=2, echo=True),
             False),
            (GenRequest("echo-0", PROMPTS[0], max_tokens=0, temperature=0.0, sparsity=0.0, logprobs=1, echo=True),
             False),
            (GenRequest("sampled", PROMPTS[3], max_tokens=6, temperature=0.8, seed=7, sparsity=0.5), False)]


def view(engine, res) -> dict:
    res = format_result(engine.tokenizer, res, res.request_id.startswith("echo"))
    return {"tokens": res.token_ids, "text": res.text, "finish": res.finish_reason, "prompt_text": res.prompt_text,
            "logprobs": res.logprobs, "arm": res.arm, "sparsity": res.sparsity}


def assert_same(got: dict, want: dict) -> None:
    lp_got, lp_want = got.pop("logprobs"), want.pop("logprobs")
    assert got == want
    if lp_want is None:
        assert lp_got is None
        return
    assert lp_got["tokens"] == lp_want["tokens"] and lp_got["text_offset"] == lp_want["text_offset"]
    assert [x is None for x in lp_got["token_logprobs"]] == [x is None for x in lp_want["token_logprobs"]]
    assert [x for x in lp_got["token_logprobs"] if x is not None] == \
        pytest.approx([x for x in lp_want["token_logprobs"] if x is not None], abs=1e-4)
    for a, b in zip(lp_got["top_logprobs"], lp_want["top_logprobs"]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def test_every_kind_through_one_loop_equals_each_alone(engine):
    reqs = requests(engine)
    alone = {r.request_id: view(engine, engine.complete(r)) for r, _ in reqs}
    assert alone["stop"]["finish"] == "stop" and alone["echo"]["logprobs"]["token_logprobs"][0] is None
    assert len(alone["echo-0"]["tokens"]) == 0 and alone["echo-0"]["prompt_text"]
    loop = Batcher(engine).start()
    try:
        channels = {}
        for r, stream in reqs:  # all at once: they share the loop's steps
            channels[r.request_id] = queue.Queue()
            loop.submit(r, channels[r.request_id].put, stream=stream)
        for (r, stream) in reqs:
            tokens, (kind, res) = collect(channels[r.request_id])
            assert kind == "done", res
            got = view(engine, res)
            if stream:  # the deltas add up to the text; no text past a stop string is sent
                assert "".join(t[2] for t in tokens) == got["text"]
                assert [t[1][0] for t in tokens] == got["tokens"]
            else:
                assert tokens == []
            assert_same(got, dict(alone[r.request_id]))
        assert loop.stats.max_batch >= 4
    finally:
        loop.close()


def test_a_request_arriving_mid_decode_joins_the_running_batch(engine):
    long = GenRequest("long", PROMPTS[0], max_tokens=120, temperature=0.0, sparsity=0.5)
    short = GenRequest("short", PROMPTS[1], max_tokens=5, temperature=0.0, sparsity=0.0)
    want_long, want_short = engine.complete(long).token_ids, engine.complete(short).token_ids
    loop = Batcher(engine).start()
    try:
        a, b = queue.Queue(), queue.Queue()
        loop.submit(long, a.put, stream=True)
        a.get(timeout=30)
        a.get(timeout=30)  # the long request is decoding
        loop.submit(short, b.put)
        _, (kind, res_b) = collect(b)
        assert kind == "done" and res_b.token_ids == want_short
        assert not a.empty() or loop.running() == 1  # the long one was still running
        tokens, (kind, res_a) = collect(a)
        assert kind == "done" and res_a.token_ids == want_long
        assert loop.stats.max_batch == 2
        # the short one took steps beside the long one; the long one took all of its own
        assert res_b.timing["steps"] == len(want_short) - 1 and res_a.timing["steps"] == len(want_long) - 1
        # the loop was idle: the long one was taken at once, and its time went to decoding
        assert res_a.timing["prefill_ms"] > 0 and 0 <= res_a.timing["queue_ms"] < res_a.timing["decode_ms"]
    finally:
        loop.close()


def test_queue_ms_is_the_time_a_request_waited_for_the_loop(engine):
    """A request submitted to a loop that has not started waits 0.3 s: its queue_ms is that
    wait (its prefill not included), and the phases add up to no more than the time seen."""
    loop = Batcher(engine)
    got = queue.Queue()
    t0 = time.perf_counter()
    loop.submit(GenRequest("waits", PROMPTS[1], max_tokens=3, temperature=0.0, sparsity=0.5), got.put)
    time.sleep(0.3)
    loop.start()
    try:
        _, (kind, res) = collect(got)
        wall_ms = (time.perf_counter() - t0) * 1000
    finally:
        loop.close()
    assert kind == "done", res
    t = res.timing
    assert t["queue_ms"] >= 300 and t["prefill_ms"] > 0 and t["decode_ms"] > 0
    assert t["queue_ms"] + t["prefill_ms"] + t["decode_ms"] <= wall_ms


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(long_model_dir):
    settings = load_settings(None, model={"name": str(long_model_dir)}, runtime={"threads": 1})
    eng = Engine(settings, None)
    eng.apply(ControlState())
    loop = Batcher(eng).start()
    try:
        stay, gone = queue.Queue(), queue.Queue()
        loop.submit(GenRequest("stay", PROMPTS[1], max_tokens=40, temperature=0.0), stay.put, stream=True)
        ticket = loop.submit(GenRequest("gone", PROMPTS[0], max_tokens=3000, temperature=0.0), gone.put, stream=True)
        for _ in range(5):
            gone.get(timeout=30)
        loop.cancel(ticket)
        tokens, end = collect(gone)
        assert end == ("cancelled", None)
        steps = ticket.steps
        assert 5 <= steps < 5 + len(tokens) + 2 and steps < 100
        _, (kind, _) = collect(stay)
        assert kind == "done"
        time.sleep(0.2)
        assert loop.running() == 0 and ticket.steps == steps  # no step after it left
        assert loop.stats.cancelled == 1
    finally:
        loop.close()


def test_a_request_the_model_cannot_run_is_an_error_for_it_alone(engine):
    loop = Batcher(engine).start()
    try:
        bad, good = queue.Queue(), queue.Queue()
        loop.submit(GenRequest("bad", [engine.shape.vocab + 5], max_tokens=3), bad.put)
        loop.submit(GenRequest("good", PROMPTS[0], max_tokens=3, temperature=0.0), good.put)
        _, (kind, message) = collect(bad)
        assert kind == "error" and "token ids must be in" in message
        _, (kind, res) = collect(good)
        assert kind == "done" and len(res.token_ids) == 3
        # a seed torch cannot take (the gateway bounds seeds; the loop must not rely on it)
        # fails that request alone, and the loop keeps serving
        odd, after = queue.Queue(), queue.Queue()
        loop.submit(GenRequest("odd", PROMPTS[0], max_tokens=3, temperature=1.0, seed=2 ** 70), odd.put)
        loop.submit(GenRequest("after", PROMPTS[1], max_tokens=3, temperature=0.0), after.put)
        assert collect(odd)[1][0] == "error" and collect(after)[1][0] == "done"
    finally:
        loop.close()


# ---- over HTTP through Ray Serve ------------------------------------------------------------
@pytest.fixture(scope="module")
def service(long_model_dir, redis_url, registry_uri):
    """The Serve app on an empty registry (it serves dense): enough to watch the decode loop."""
    from ray import serve

    from serving.app import APP_NAME

    port = free_port()
    settings = load_settings(None, model={"name": str(long_model_dir)}, runtime={"threads": 1}, port=port,
                             api_keys=[{"key": "sk-b", "name": "b"}], admin_key="adm-b",
                             redis={"url": redis_url}, mlflow={"tracking_uri": registry_uri},
                             serve={"reconcile_s": 1.0, "replica_cpus": 0.1, "max_tokens_limit": 4000,
                                    "defaults": {"shadow_rate": 0.0}})
    with serve_app(settings) as base:
        yield {"base": base, "llm": serve.get_deployment_handle("GatedLLM", app_name=APP_NAME)}


@pytest.mark.service
def test_a_disconnected_streaming_client_stops_its_generation(service):
    llm, base = service["llm"], service["base"]
    body = {"prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers={"Authorization": "Bearer sk-b"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
        # the connection is closed here, with about 3 of 3000 tokens sent
    stats = wait_until(lambda: (lambda st: st if st["running"] == 0 else None)(llm.stats.remote().result()), 30,
                       what="the decode loop idle", detail=lambda: llm.stats.remote().result())
    gone = [r for r in stats["recent"] if r[2] == "cancelled"]
    assert len(gone) == 1 and gone[0][1] < 1500, stats["recent"]
    steps = stats["steps"]
    time.sleep(1.0)
    assert llm.stats.remote().result()["steps"] == steps  # nothing decodes for it any more


def test_the_loop_weighs_a_union_over_the_steps_its_batch_can_last(engine):
    """A batch whose first sequence ends after one more token keeps its composition for one
    step: the loop's decode must not build a union gather for it, where a batch that runs on
    would (same masks)."""
    import torch

    from adapter.runtime.gather import build_plan

    def started(max_tokens: int):
        acts, toks = [], []
        for i, p in enumerate(PROMPTS):
            a, logits = engine.start(GenRequest(f"h{i}", p, max_tokens=max_tokens if i else 2,
                                                temperature=0.0, sparsity=0.5))
            acts.append(a)
            toks.append(engine.accept([a], logits))
        return acts, torch.cat(toks)

    rt = engine.runtime
    acts, toks = started(40)
    seqs = [a.seq for a in acts]
    assert len({s.mask.key for s in seqs}) == len(PROMPTS)  # distinct masks: a plan has a choice
    runs_on = build_plan(rt.view.layers, rt.shape, [s.mask for s in seqs], [False] * len(seqs), 39)
    assert any(lp.ffn.kind == "union" for lp in runs_on.layers[1:])
    rt.plans.clear()
    engine.decode(acts, toks)  # the first sequence has 1 token left: horizon 1
    plan = rt.batch_plan(seqs)  # the plan that step built and cached
    assert plan.gathered_bytes == 0 and all(lp.ffn.kind != "union" for lp in plan.layers[1:])


def test_the_loop_expects_a_composition_to_last_as_long_as_recent_ones_did(engine):
    """Arrivals end a composition as surely as departures: the horizon the loop hands the
    engine is 1 while requests wait to join, else the moving average of how many steps
    recent compositions lasted (a union copy is weighed over it)."""
    b = Batcher(engine)  # not started: its bookkeeping only
    first, second = object(), object()
    b._running = [first]
    assert b._expected_steps() == 32  # nothing seen yet
    for _ in range(3):
        b._expected_steps()  # [first] lasts 4 steps
    b._running = [first, second]
    assert b._expected_steps() == round(0.7 * 32 + 0.3 * 4)
    b._waiting.append(object())
    assert b._expected_steps() == 1
    b._waiting.clear()
    b._running = [second]  # [first, second] lasted 2 steps
    assert b._expected_steps() == round(0.7 * (0.7 * 32 + 0.3 * 4) + 0.3 * 2)
