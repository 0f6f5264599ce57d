"""The Serve app in this test process, and the admin API's state change as a test makes it.
(The complete private stack, redis-server + MLflow server + Ray + the app, is the service's
own serving.ops.stack.private_stack.)"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import httpx

from tests.support.poll import wait_until


@contextmanager
def serve_app(settings, timeout: float = 300) -> Iterator[str]:
    """The app of `settings` on a local Ray started here (2 CPUs, no dashboard, a 200 MB
    object store), with Redis and MLflow wherever `settings` point: yields the base URL once
    /readyz answers 200; Serve and Ray are shut down after."""
    import ray
    from ray import serve

    from serving.app import deploy

    saved = os.environ.get("RAY_AUTH_MODE")
    # a local single-user Ray: with token auth on, the raylet aborts (no token file is written)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
             log_to_driver=False)
    try:
        deploy(settings)
        base = f"http://{settings.host}:{settings.port}"
        wait_until(lambda: httpx.get(f"{base}/readyz", timeout=5).status_code == 200, timeout, interval=0.5,
                   what="the Serve app's /readyz", ignore=(httpx.HTTPError,))
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def put_state(http: httpx.Client, admin_key: str, wait_s: float = 30, **change) -> tuple[int, list[dict]]:
    """PUT /admin/state with `change`, then wait until every replica reports that generation
    applied: returns (generation, the replicas' reports)."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    r = http.put("/admin/state", json=change, headers=headers)
    assert r.status_code == 200, r.text
    gen = r.json()["state"]["generation"]

    def replicas() -> list[dict]:
        return http.get("/admin/state", headers=headers).json()["replicas"]

    def applied():
        reps = replicas()
        return reps if reps and all(rep["generation"] >= gen for rep in reps) else None

    return gen, wait_until(applied, wait_s, what=f"every replica on generation {gen}", detail=replicas)
