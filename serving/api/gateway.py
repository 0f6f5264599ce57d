"""Gateway: the HTTP ingress (FastAPI on Ray Serve). This file builds one gateway replica from
its parts: the route table and error handling (routes.py), keys, per-key policy and rate
limits (auth.py), the completions path (completions.py), the admin API (admin.py), metrics
(metrics.py); and follows the control state so that /readyz and the metrics say which
generation is served."""

import asyncio
import logging

from ray import serve

from jobs.registry import registry_for
from monitor.alerts import AlertStore
from monitor.redis_client import async_redis_client, redis_client
from serving.api.admin import Admin
from serving.api.auth import Authenticator, KeyRing, RateLimiter
from serving.api.completions import Completions
from serving.api.metrics import Metrics
from serving.api.routes import Routes, app
from serving.replica.control import ControlState, ControlStore, StateFollower
from serving.settings import Settings

log = logging.getLogger(__name__)


def _load_tokenizer(name: str):
    """The served model's tokenizer: prompts are bounded in tokens before any replica sees them."""
    from transformers import AutoTokenizer

    from adapter.embedded.recipe import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


@serve.deployment(name="Gateway")
@serve.ingress(app)
class Gateway(Routes):
    async def __init__(self, settings: Settings, llm, shadow, monitor=None):
        self.settings, self.llm, self.shadow, self.monitor = settings, llm, shadow, monitor
        prefix = settings.redis.prefix
        self.metrics = Metrics()
        self.r = async_redis_client(settings.redis)
        self.auth = Authenticator(await asyncio.to_thread(KeyRing, settings))
        store = ControlStore(redis_client(settings.redis), prefix)
        self.follower = StateFollower(settings.redis, prefix, "gateway", settings.serve.defaults,
                                      self._apply, settings.serve.reconcile_s)
        await self.follower.start()
        self.model_name = settings.model.name
        try:
            tokenizer = await asyncio.to_thread(_load_tokenizer, settings.model.name)
        except Exception as exc:  # counted in UTF-8 bytes then: never fewer than the tokens
            log.warning("no tokenizer in the gateway (%s): prompts are bounded by bytes", type(exc).__name__)
            tokenizer = None
        self.completer = Completions(settings, llm, shadow, self.r, self.metrics,
                                     RateLimiter(self.r, prefix, self.metrics), lambda: self.follower.state,
                                     tokenizer, self.model_name)
        self.admin = Admin(settings, self.r, store, registry_for(settings),
                           AlertStore(redis_client(settings.redis), prefix, settings.alerts))
        self.warm = False

    async def _apply(self, state: ControlState) -> None:
        self.metrics.generation.set(state.generation)
