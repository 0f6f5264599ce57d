"""The model side of a GatedLLM replica, free of Ray: the loaded model, the predictor
versions the control state names, the choice of method per request, and the step
primitives of the decode loop (start = plan + prefill, accept = pick tokens and follow stop
strings, decode = one batched step, finish = the result). The loop that schedules them is
serving/replica/batcher.py; OpenAI formatting (logprobs objects, text offsets) is
serving/api/openai_format.py.

Per-request state is a value (the runtime's Sequence, this module's Plan); the engine holds
only what every request shares: the model and the loaded predictor versions.

Shapes: T prompt tokens, V vocab.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
import torch

from adapter.selection.methods import dense
from adapter.runtime.loading import load
from adapter.runtime.gated import RequestError, SamplingParams, Sequence, pick_tokens
from adapter.pipeline.traces import model_fingerprint
from adapter.selection.artifact import LoadedPredictor, load_predictor
from jobs.registry import PredictorRegistry
from monitor import drift
from serving.replica.control import ControlState, canary_arm
from serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenRequest:
    """One prompt of a completion request, validated by the gateway."""

    request_id: str
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # top-k alternatives per token (0: only the chosen one)
    echo: bool = False
    sparsity: float | None = None  # requested; None: the control state's, within the bounds
    bounds: tuple[float, float] = (0.0, 0.9)  # the key's policy


@dataclass(frozen=True)
class Plan:
    """How one request is served: which predictor version, which sparsity, which fallback."""

    method: object
    version: str | None  # registry version; None for dense
    arm: str  # champion | challenger | dense
    sparsity: float
    fallback: str
    generation: int
    fallback_reason: str | None = None


@dataclass
class GenResult:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    logprobs: dict | None = None  # the OpenAI completions logprobs object (the serving layer fills it)
    version: str | None = None
    arm: str = "dense"
    sparsity: float = 0.0
    effective_sparsity: float = 0.0
    fallback: str = "none"
    generation: int = 0
    mask: list[dict] = field(default_factory=list)
    mode: str = "global"
    elapsed_ms: float = 0.0
    prompt_text: str = ""  # filled for echo
    fallback_reason: str | None = None  # why a replica serves dense without being told to
    stop: tuple[str, ...] = ()  # the request's stop strings (the shadow path's target policy cuts there)
    features: dict | None = None  # the request's drift feature row (monitor/drift.py), with "version"
    scores: "TokenScores | None" = None  # raw per-token scores when logprobs were asked for
    timing: dict = field(default_factory=dict)  # ms per phase: queue, prefill, decode, detokenize, finish

    def meta(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("logprobs", "features", "scores")}


class Engine:
    def __init__(self, settings: Settings, registry: PredictorRegistry | None):
        settings.runtime.apply_threads()
        self.settings = settings
        self.loaded = load(settings.model.name, settings.runtime)
        self.runtime, self.tokenizer = self.loaded.runtime, self.loaded.tokenizer
        self.shape = self.runtime.shape
        self.fingerprint = model_fingerprint(self.runtime.model)
        self.registry = registry
        self.predictors: dict[str, LoadedPredictor] = {}
        self.bases: dict[str, drift.Basis | None] = {}  # per version: the drift projection basis
        self.champion: str | None = None
        self.challenger: str | None = None
        self.state: ControlState | None = None
        self.problem: str | None = None  # set while the champion cannot be had: serving dense
        self.challenger_problem: str | None = None  # set while the state's challenger cannot be loaded
        eos = self.tokenizer.eos_token_id
        self.stop_ids = [eos] if eos is not None else []

    # ---- control state --------------------------------------------------------------------
    def predictor(self, version: str) -> LoadedPredictor:
        if version not in self.predictors:
            folder = self.registry.download(version)
            self.predictors[version] = load_predictor(folder, self.shape, self.fingerprint)
            basis = folder / drift.REFERENCE_DIR / "basis.safetensors"
            if basis.exists():
                self.bases[version] = drift.load_basis(basis)
            else:  # a version registered without one: served, but yields no drift features
                log.warning("predictor version %s has no drift reference basis", version)
                self.bases[version] = None
        return self.predictors[version]

    def apply(self, state: ControlState) -> str | None:
        """Load what `state` names (downloads happen before anything switches), then switch.

        Never raises for registry trouble: a fallback must apply while MLflow is down. When
        the champion cannot be resolved or loaded, the replica keeps the champion it already
        holds if `state` still names it, else serves dense; the problem is returned (and
        the follower applies the state again later)."""
        problem = challenger_problem = None
        champion = challenger = None
        if self.registry is None:
            problem = "no predictor registry configured"
        else:
            try:
                champion = self.registry.resolve(state.champion)
                if champion is None:
                    problem = "no champion predictor in the registry"
                else:
                    self.predictor(champion)
            except Exception as exc:  # MLflow down, a corrupt or mismatched artifact
                problem = f"champion predictor {state.champion or 'alias champion'} unavailable: {_short(exc)}"
                keep = self.champion is not None and state.champion in (None, self.champion)
                champion = self.champion if keep else None
            if state.challenger:
                try:
                    challenger = self.registry.resolve(state.challenger)
                    self.predictor(challenger)
                except Exception as exc:
                    log.warning("challenger %s unavailable, no canary on this replica: %s", state.challenger, exc)
                    challenger = None
                    challenger_problem = f"challenger predictor {state.challenger} refused: {_short(exc)}"
        if problem:
            log.warning("%s%s", problem, "" if champion else ": serving dense")
        self.champion, self.challenger, self.state = champion, challenger, state
        self.problem = None if champion else problem
        self.challenger_problem = challenger_problem  # the replica serves no canary (the champion only)
        return problem

    def plan(self, req: GenRequest) -> Plan:
        st = self.state
        lo, hi = req.bounds
        sparsity = req.sparsity if req.sparsity is not None else min(max(st.sparsity, lo), hi)
        arm = canary_arm(req.request_id, st.canary_share) if self.challenger else "champion"
        version = self.challenger if arm == "challenger" else self.champion
        # the fallback is the champion's: a challenger in canary keeps its sparse share, judged
        # on its own window (the controller rolls it back at once when it breaks the SLO)
        fallback = st.fallback if arm == "champion" else "none"
        if version is None:  # the champion cannot be had: dense, and the response says so
            return Plan(dense(), None, "dense", 0.0, "dense", st.generation, self.problem or "no champion")
        if fallback == "lower":
            sparsity = min(sparsity, st.fallback_sparsity)
        if fallback == "dense" or sparsity == 0.0:
            return Plan(dense(), None, "dense", 0.0, fallback, st.generation)
        return Plan(self.method_for(version, sparsity), version, arm, sparsity, fallback, st.generation)

    def features(self, plan: Plan, predictor_input: torch.Tensor | None, prompt_len: int) -> dict | None:
        """The request's drift feature row, projected on the basis of the version it was served
        by (the champion's when served dense). Computed after the request, off the token loop."""
        version = plan.version or self.champion
        basis = self.bases.get(version) if version else None
        if basis is None or predictor_input is None:
            return None
        x = predictor_input[None].float().cpu()
        heads, neurons = drift.scores_for(self.predictors[version], x)
        return {"version": version, **drift.feature_rows(basis, x, [prompt_len], heads, neurons)[0]}

    def method_for(self, version: str | None, sparsity: float):
        """The same method a plan used, rebuilt from its identity (the shadow path)."""
        if version is None or sparsity == 0.0:
            return dense()
        return self.predictor(version).method(sparsity, self.settings.runtime.mode, self.shape,
                                              self.settings.runtime.head_selection)

    # ---- tokens ---------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.shape.vocab:
            raise RequestError(f"token ids must be in [0, {self.shape.vocab})")
        return ids

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- step primitives (the decode loop in serving/replica/batcher.py drives these) -------------
    def start(self, req: GenRequest, stream: bool = False, alone: bool = True) -> tuple[Active, torch.Tensor]:
        """Plan and prefill one request; returns its state and the logits (1, V) that pick its
        first token. With echo the prompt's own scores are taken from the same prefill (all
        logits, under the mask the whole prompt selected). `alone`: whether it is expected to
        decode by itself; one that joins a busy batch keeps no weight copy of its own (its
        steps share the batch's union or dense products; a long prompt runs on a copy it then
        drops, runtime.prompt_copy_tokens)."""
        t0 = time.perf_counter()
        ids = self.prompt_ids(req.prompt)
        plan = self.plan(req)
        res = GenResult(request_id=req.request_id, prompt_ids=ids, version=plan.version, arm=plan.arm,
                        sparsity=plan.sparsity, fallback=plan.fallback, generation=plan.generation,
                        mode=self.settings.runtime.mode, fallback_reason=plan.fallback_reason,
                        stop=tuple(req.stop))
        seq, logits = self.runtime.prefill(ids, plan.method, req.max_tokens, all_logits=req.echo, gather=alone)
        res.effective_sparsity = seq.effective_sparsity
        scores = None
        if req.logprobs is not None:
            scores = TokenScores(k=req.logprobs)
            if req.echo:  # the first prompt token has no score (nothing precedes it)
                scores.add(ids[:1], [None], [None])
                scores.add_rows(ids[1:], torch.log_softmax(logits[:-1].float(), dim=-1))
        if req.echo:
            logits = logits[-1:]
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        act = Active(req=req, plan=plan, seq=seq, res=res, t0=t0, stream=stream,
                     params=SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed),
                     gen=gen, scores=scores, holdback=max((len(s) for s in req.stop), default=1) - 1)
        act.timing["prefill_ms"] = (time.perf_counter() - t0) * 1000
        act.timing["gather_ms"] = seq.gather_ms
        act.timing["gather_faults"] = seq.gather_faults
        if req.max_tokens == 0:  # echo only: the prompt's scores, no completion
            act.done = True
        return act, logits

    def accept(self, acts: list[Active], logits: torch.Tensor) -> torch.Tensor:
        """Pick each sequence's next token from logits (B, V); returns the tokens (B,).

        Updates every Active: its tokens, scores, text delta (streams and stop strings
        only: a plain request is detokenized once, at the end) and whether it is done.
        One host copy of the tokens per step: they go back to the client anyway."""
        toks, _ = pick_tokens(logits, [a.params for a in acts], [a.gen for a in acts])
        host = toks.tolist()
        scored = [j for j, a in enumerate(acts) if a.scores is not None]
        if scored:
            rows = torch.log_softmax(logits[scored].float(), dim=-1)
            for r, j in enumerate(scored):
                acts[j].scores.add_rows([host[j]], rows[r:r + 1])
        for a, tok in zip(acts, host):
            a.res.token_ids.append(tok)
            eos = tok in self.stop_ids
            a.done = eos or len(a.res.token_ids) >= a.req.max_tokens
            if eos:
                a.res.finish_reason = "stop"
            a.delta = ""
            if a.stream or a.req.stop:
                self._follow_text(a)
        return toks

    def _follow_text(self, a: Active) -> None:
        """Stop strings on the decoded text; text that could still become a stop string is
        held back until it cannot."""
        t = time.perf_counter()
        text = self.text(a.res.token_ids)
        cut = min((text.find(s) for s in a.req.stop if s in text), default=-1)
        if cut >= 0:
            text, a.done, a.res.finish_reason = text[:cut], True, "stop"
        a.res.text = text
        upto = len(text) if a.done else max(a.sent, len(text) - a.holdback)
        a.delta, a.sent = text[a.sent:upto], max(a.sent, upto)
        a.timing["detokenize_ms"] += (time.perf_counter() - t) * 1000

    def decode(self, acts: list[Active], toks: torch.Tensor, expected_steps: int | None = None) -> torch.Tensor:
        """One decode step for the sequences still running: tokens (B,) -> logits (B, V).
        The batch keeps this composition at most until its first sequence runs out of
        tokens, and (`expected_steps`, the caller's estimate) until a new sequence joins:
        that is the horizon a union gather is weighed over (with short completions or busy
        arrivals, a union that would be rebuilt every few steps costs more than it saves)."""
        horizon = min(a.req.max_tokens - len(a.res.token_ids) for a in acts)
        if expected_steps is not None:
            horizon = min(horizon, expected_steps)
        return self.runtime.decode([a.seq for a in acts], toks, horizon=max(1, horizon))

    def finish(self, a: Active) -> GenResult:
        """The finished request's result: text, mask record, drift features (off the loop's
        hot path: once per request)."""
        t = time.perf_counter()
        res = a.res
        if not (a.stream or a.req.stop):
            res.text = self.text(res.token_ids)
        res.scores = a.scores
        res.mask = mask_record(a.seq.mask, self.shape)
        res.features = self.features(a.plan, a.seq.predictor_input, len(res.prompt_ids))
        a.timing["finish_ms"] = (time.perf_counter() - t) * 1000
        res.elapsed_ms = (time.perf_counter() - a.t0) * 1000
        res.timing = {k: round(v, 3) for k, v in a.timing.items()}
        return res

    def complete(self, req: GenRequest) -> GenResult:
        """One request alone, through the same primitives the decode loop uses."""
        a, logits = self.start(req)
        while not a.done:
            toks = self.accept([a], logits)
            if a.done:
                break
            logits = self.decode([a], toks)
        return self.finish(a)


@dataclass
class TokenScores:
    """Per scored token: its id, its log-probability (None for the first prompt token) and
    the top-k alternatives as (ids, log-probabilities). Formatting is the serving layer's."""

    k: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[tuple[list[int], list[float]] | None] = field(default_factory=list)

    def add(self, ids: list[int], logprobs: list, top: list) -> None:
        self.token_ids += ids
        self.logprobs += logprobs
        self.top += top

    def add_rows(self, ids: list[int], logp: torch.Tensor) -> None:
        """Tokens ids[i] scored by log-probability rows logp (N, V): one host copy per call."""
        if not ids:
            return
        idx = torch.as_tensor(ids)
        chosen = logp.gather(-1, idx[:, None])[:, 0].tolist()
        vals, top_ids = logp.topk(max(self.k, 1), dim=-1)
        self.add(list(ids), chosen, list(zip(top_ids.tolist(), vals.tolist())))


@dataclass
class Active:
    """One running request inside the decode loop: the value the loop passes around."""

    req: GenRequest
    plan: Plan
    seq: Sequence
    res: GenResult
    params: SamplingParams
    gen: torch.Generator | None
    scores: TokenScores | None
    t0: float
    stream: bool = False
    holdback: int = 0
    sent: int = 0  # characters of text already handed out
    delta: str = ""  # text accepted by the last step
    done: bool = False
    timing: dict = field(default_factory=lambda: {"prefill_ms": 0.0, "detokenize_ms": 0.0})


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def mask_record(mask, shape) -> list[dict]:
    """Kept and skipped units per layer (the audit record's view of a mask)."""
    out = []
    for row in mask.summary():
        kept = set(row["heads"])
        out.append({**row, "heads_skipped": [h for h in range(shape.heads) if h not in kept],
                    "neurons_skipped": shape.ffn - row["neurons_kept"]})
    return out
