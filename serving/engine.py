"""The model side of a GatedLLM replica, free of Ray: the loaded model, the predictor
versions the control state names, the choice of method per request, and the token loop.

Per-request state is a value (the runtime's Sequence, this module's Plan); the engine holds
only what every request shares: the model and the loaded predictor versions.

Shapes: T prompt tokens, V vocab.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from adapter.selection import predictors as P
from adapter.runtime.loading import load
from adapter.runtime.gated import RequestError, SamplingParams, pick_tokens
from adapter.pipeline.traces import model_fingerprint
from adapter.pipeline.train import LoadedPredictor, load_predictor
from jobs.registry import PredictorRegistry
from monitor import drift
from serving.control import ControlState, canary_arm
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
    logprobs: dict | None = None  # the OpenAI completions logprobs object
    version: str | None = None
    arm: str = "dense"
    sparsity: float = 0.0
    effective_sparsity: float = 0.0
    fallback: str = "none"
    generation: int = 0
    mask: list[dict] = field(default_factory=list)
    mode: str = "per_layer"
    elapsed_ms: float = 0.0
    prompt_text: str = ""  # filled for echo
    fallback_reason: str | None = None  # why a replica serves dense without being told to
    features: dict | None = None  # the request's drift feature row (monitor/drift.py), with "version"

    def meta(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("logprobs", "features")}


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
        problem = None
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
        if problem:
            log.warning("%s%s", problem, "" if champion else ": serving dense")
        self.champion, self.challenger, self.state = champion, challenger, state
        self.problem = None if champion else problem
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
            return Plan(P.Dense(), None, "dense", 0.0, "dense", st.generation, self.problem or "no champion")
        if fallback == "lower":
            sparsity = min(sparsity, st.fallback_sparsity)
        if fallback == "dense" or sparsity == 0.0:
            return Plan(P.Dense(), None, "dense", 0.0, fallback, st.generation)
        method = self.predictor(version).method(sparsity, self.settings.runtime.mode, self.shape)
        return Plan(method, version, arm, sparsity, fallback, st.generation)

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
            return P.Dense()
        return self.predictor(version).method(sparsity, self.settings.runtime.mode, self.shape)

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

    def token_text(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def _top(self, logp: torch.Tensor, k: int) -> dict[str, float]:
        vals, idx = logp.topk(max(k, 1))
        out: dict[str, float] = {}
        for v, i in zip(vals.tolist(), idx.tolist()):
            out.setdefault(self.token_text(i), v)
        return out

    # ---- the token loop -------------------------------------------------------------------
    def run(self, req: GenRequest) -> Iterator[tuple[list[int], str, GenResult]]:
        """Yields (new token ids, new text, result so far) as tokens are accepted; the last
        yield carries the finished result. Stop strings are honoured on the decoded text;
        text that could still become a stop string is held back until it cannot."""
        t0 = time.perf_counter()
        ids = self.prompt_ids(req.prompt)
        plan = self.plan(req)
        res = GenResult(request_id=req.request_id, prompt_ids=ids, version=plan.version, arm=plan.arm,
                        sparsity=plan.sparsity, fallback=plan.fallback, generation=plan.generation,
                        mode=self.settings.runtime.mode, fallback_reason=plan.fallback_reason)
        want_lp = req.logprobs is not None
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} if want_lp else None
        st, logits = self.runtime.prefill(ids, plan.method, req.max_tokens, all_logits=req.echo)
        if req.echo:  # logprobs of the prompt tokens under the mask the prompt selected
            logp_all = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
            if want_lp:
                for t, tok in enumerate(ids):
                    lp["tokens"].append(self.token_text(tok))
                    lp["token_logprobs"].append(None if t == 0 else float(logp_all[t - 1, tok]))
                    lp["top_logprobs"].append(None if t == 0 else self._top(logp_all[t - 1], req.logprobs))
            logits = logits[-1:]
        res.effective_sparsity = st.effective_sparsity
        gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        holdback = max((len(s) for s in req.stop), default=1) - 1
        sent = 0
        for step in range(req.max_tokens):
            toks, _ = pick_tokens(logits, [params], [gen])
            tok = int(toks[0])
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            res.token_ids.append(tok)
            if want_lp:
                lp["tokens"].append(self.token_text(tok))
                lp["token_logprobs"].append(float(logp[tok]))
                lp["top_logprobs"].append(self._top(logp, req.logprobs))
            text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            done = tok in self.stop_ids or cut >= 0 or step + 1 == req.max_tokens
            if tok in self.stop_ids or cut >= 0:
                res.finish_reason = "stop"
            if cut >= 0:
                text = text[:cut]
            res.text = text
            upto = len(text) if done else max(sent, len(text) - holdback)
            delta, sent = text[sent:upto], max(sent, upto)
            if done:
                break
            yield [tok], delta, res
            logits = self.runtime.decode([st], toks)
        else:
            delta = ""
        if lp is not None:
            offsets, pos = [], 0
            for s in lp["tokens"]:
                offsets.append(pos)
                pos += len(s) + 1
            lp["text_offset"] = offsets
        res.logprobs = lp
        if req.echo:  # the prompt's text as it joins the completion (separator included)
            full = self.tokenizer.decode(ids + res.token_ids, skip_special_tokens=True)
            tail = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
            res.prompt_text = full[:len(full) - len(tail)] if tail and full.endswith(tail) else \
                self.tokenizer.decode(ids, skip_special_tokens=True)
        res.mask = mask_record(st.mask, self.shape)
        res.features = self.features(plan, st.predictor_input, len(ids))
        res.elapsed_ms = (time.perf_counter() - t0) * 1000
        yield ([res.token_ids[-1]] if res.token_ids else []), delta, res

    @staticmethod
    def batchable(req: GenRequest) -> bool:
        """Plain generation (no echo, logprobs or stop strings) can share decode steps."""
        return not req.echo and req.logprobs is None and not req.stop and req.max_tokens > 0

    def complete_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Batchable requests with the same max_tokens as one batched generation: their
        decode steps share matmuls per mask (the runtime groups equal masks)."""
        t0 = time.perf_counter()
        ids = [self.prompt_ids(r.prompt) for r in reqs]
        plans = [self.plan(r) for r in reqs]
        sampling = [SamplingParams(temperature=r.temperature, top_p=r.top_p, seed=r.seed) for r in reqs]
        gens = self.runtime.generate(ids, [p.method for p in plans], reqs[0].max_tokens, sampling, self.stop_ids)
        elapsed = (time.perf_counter() - t0) * 1000
        return [GenResult(request_id=r.request_id, prompt_ids=i, token_ids=g.token_ids,
                          text=self.tokenizer.decode(g.token_ids, skip_special_tokens=True),
                          finish_reason=g.finish_reason, version=p.version, arm=p.arm, sparsity=p.sparsity,
                          effective_sparsity=g.effective_sparsity, fallback=p.fallback, generation=p.generation,
                          mask=mask_record(g.mask, self.shape), mode=self.settings.runtime.mode, elapsed_ms=elapsed,
                          fallback_reason=p.fallback_reason, features=self.features(p, g.predictor_input, len(i)))
                for r, i, p, g in zip(reqs, ids, plans, gens)]

    def complete(self, req: GenRequest) -> GenResult:
        res = None
        for _, _, res in self.run(req):
            pass
        return res


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
