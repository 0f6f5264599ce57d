"""The Serve application: Gateway -> GatedLLM, Gateway -> ShadowDense, and the Monitor."""

from __future__ import annotations

from serving.api.gateway import Gateway
from serving.replica.llm import GatedLLM
from serving.replica.monitor import MonitorReplica
from serving.settings import Settings
from serving.replica.shadow import ShadowDense

APP_NAME = "shadowgate"


def build_app(settings: Settings):
    s = settings.serve
    cpus = {"num_cpus": s.replica_cpus}
    health = {"health_check_period_s": s.health_check_period_s, "health_check_timeout_s": s.health_check_timeout_s}
    llm = GatedLLM.options(num_replicas=s.llm_replicas, ray_actor_options=cpus,
                           max_ongoing_requests=s.max_ongoing_requests, **health).bind(settings)
    shadow = ShadowDense.options(num_replicas=s.shadow_replicas, ray_actor_options=cpus,
                                 max_ongoing_requests=s.shadow_max_inflight * 2, **health).bind(settings)
    # one Monitor replica; a second one (during a restart) waits on the Redis lease
    monitor = MonitorReplica.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(settings) \
        if settings.monitor.enabled else None
    return Gateway.options(ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=s.max_ongoing_requests * 4).bind(settings, llm, shadow, monitor)


def deploy(settings: Settings, blocking: bool = False):
    """Start Serve's HTTP proxy on the configured host/port and run the app."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings), name=APP_NAME, route_prefix=settings.serve.route_prefix,
                     blocking=blocking)


def app_builder(args: dict):
    """Entry for config-driven deploys (`serve deploy infra/serve_config.yaml`, KubeRay
    serveConfigV2): args {"config": path to the YAML settings file, optional}."""
    from serving.settings import load_settings

    return build_app(load_settings(args.get("config")))
