"""The Ray Serve application: an ingress serving ptmserve's HTTP routes, in front of engine replicas.

::

    clients ── Ray Serve proxy (HTTP) ── Ingress replica: create_app(RayEngine) ── DeploymentHandle
                                          (the routes, limits and error table      │ TierRouter
                                          of ``ptmserve serve``; checks and        ▼
                                          tokenizes)                       EngineReplica × N (Engine)

``build(config)`` makes the application; ``app`` is the builder ``serve run ptmserve.ray:app`` calls
(settings from ``key=value`` arguments, else ``PTMSERVE_*`` environment variables, else defaults).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from ptmserve.engine.engine import EngineSettings
from ptmserve.errors import InvalidConfig
from ptmserve.ray.frontend import RayEngine
from ptmserve.ray.replica import EngineReplica, multiplexed_replica
from ptmserve.server.app import create_app
from ptmserve.server.settings import ServerSettings

ROUTERS = ("ptmserve", "ray")  # ours (TierRouter), or Ray Serve's default with a multiplexed loader
ROUTER_CLASS = "ptmserve.ray.router.TierRouter"


@dataclass(frozen=True, slots=True)
class RayAppConfig:
    """How the application runs. ``engine`` is each replica's engine (each has its own budgets)."""

    repo: str = "models"  # the same folder on every node (shared storage in a cluster)
    replicas: int = 2
    engine: EngineSettings = field(default_factory=EngineSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    threads_per_replica: int = 1  # torch threads of each replica's engine
    replica_cpus: float = 0.0  # Ray CPUs each replica reserves (1 or more to spread them over nodes)
    replica_gpus: float = 0.0  # Ray GPUs each replica reserves (1 with device="cuda": one replica per GPU)
    router: str = "ptmserve"  # see ROUTERS
    max_models_per_replica: int = 4  # the "ray" baseline's max_num_models_per_replica
    stats_period_s: float = 0.5  # how often replicas report their tiers through Ray's routing stats
    warm_up: bool = True  # each replica warms up before it serves
    warm_host: bool = False  # each replica brings every model into its host tier first (benchmarks)
    name: str = "ptmserve"  # the Serve application's name

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.threads_per_replica < 1 or self.max_models_per_replica < 1:
            raise InvalidConfig(
                "replicas, threads_per_replica and max_models_per_replica must be >= 1, got "
                f"{self.replicas}, {self.threads_per_replica} and {self.max_models_per_replica}"
            )
        if self.router not in ROUTERS:
            raise InvalidConfig(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or not self.stats_period_s > 0:
            raise InvalidConfig(
                f"replica_cpus and replica_gpus must be >= 0, stats_period_s > 0, got {self.replica_cpus}, "
                f"{self.replica_gpus} and {self.stats_period_s}"
            )


# Builder argument (or PTMSERVE_<NAME> variable) -> (where it goes, how to parse it).
_FIELDS: dict[str, tuple[str, Any]] = {
    "repo": ("app", str),
    "replicas": ("app", int),
    "threads_per_replica": ("app", int),
    "replica_cpus": ("app", float),
    "replica_gpus": ("app", float),
    "router": ("app", str),
    "max_models_per_replica": ("app", int),
    "device": ("engine", str),
    "dtype": ("engine", str),
    "device_memory": ("engine", str),
    "host_memory": ("engine", str),
    "kv_cache_memory": ("engine", str),
    "policy": ("engine", str),
    "placement": ("engine", str),
    "model_control": ("engine", str),
    "max_queue": ("engine", int),
    "api_key": ("server", str),
    "max_body_bytes": ("server", int),
    "max_batch_inputs": ("server", int),
    "max_input_length": ("server", int),
}


def config_from(
    args: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> RayAppConfig:
    """A config from builder arguments (``serve run ptmserve.ray:app repo=/models replicas=2``), then
    ``PTMSERVE_REPO``-style environment variables, then the defaults.

    Raises:
        InvalidConfig: an unknown argument or a value that does not parse.
    """
    env = os.environ if environ is None else environ
    args = dict(args or {})
    unknown = sorted(set(args) - set(_FIELDS))
    if unknown:
        raise InvalidConfig(f"unknown arguments {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    parts: dict[str, dict[str, Any]] = {"app": {}, "engine": {}, "server": {}}
    for key, (part, parse) in _FIELDS.items():
        raw = args.get(key, env.get(f"PTMSERVE_{key.upper()}"))
        if raw is None:
            continue
        try:
            parts[part][key] = parse(raw)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{key}={raw!r} is not a valid {parse.__name__}") from None
    engine = dataclasses.replace(EngineSettings(), **parts["engine"])
    server = ServerSettings(**parts["server"])
    return RayAppConfig(engine=engine, server=server, **parts["app"])


@serve.ingress()
class Ingress:
    """The HTTP front: ``ptmserve serve``'s app over a ``RayEngine`` forwarding to the replicas."""

    def __init__(self, replicas: Any, config: RayAppConfig) -> None:
        self.config = config
        self.engine = RayEngine(replicas, config.repo, config.engine, replicas=config.replicas)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.engine, self.config.server, owns_engine=True)


def _start_replica(replica: EngineReplica, config: RayAppConfig) -> None:
    """``EngineReplica.__init__`` from the app's config, then the warm-ups it asks for."""
    # Explicit model control is the ingress's (its states refuse unloaded models, and load/unload go to
    # every replica), so that a replica Ray restarts serves at once without replaying loads.
    settings = dataclasses.replace(config.engine, model_control="auto")
    EngineReplica.__init__(replica, config.repo, settings, config.threads_per_replica)
    if config.warm_host:
        replica._warm_host()
    if config.warm_up:
        replica.engine.warm_up()


class _Replica(EngineReplica):
    """``EngineReplica`` built from the app's config."""

    def __init__(self, config: RayAppConfig) -> None:
        _start_replica(self, config)


def replica_deployment(config: RayAppConfig) -> Any:
    """The engine replicas' deployment, with ``TierRouter`` or (router "ray") Ray's default router and a
    ``@serve.multiplexed`` loader."""
    options: dict[str, Any] = {
        "name": "EngineReplica",
        "num_replicas": config.replicas,
        "max_ongoing_requests": max(config.engine.max_queue, 16),  # the engine queues; Ray need not
        "ray_actor_options": {"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if config.router == "ptmserve":
        cls: type = _Replica
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_routing_stats_period_s=config.stats_period_s
        )
    else:
        base = multiplexed_replica(config.max_models_per_replica)

        class _Multiplexed(base):  # type: ignore[misc, valid-type]
            def __init__(self, config: RayAppConfig) -> None:
                _start_replica(self, config)

        cls = _Multiplexed
    return serve.deployment(**options)(cls)


def build(config: RayAppConfig) -> Any:
    """The application: the ingress bound to the replica deployment."""
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)(
        Ingress
    )
    return ingress.bind(replica_deployment(config).bind(config), config)


def app(args: dict[str, Any]) -> Any:
    """The builder ``serve run ptmserve.ray:app [key=value ...]`` calls (see ``config_from``)."""
    return build(config_from(args))
