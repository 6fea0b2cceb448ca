"""The router's Prometheus metrics (its own registry, rendered at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from server.router.state import Instance

ROUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RouterMetrics:
    def __init__(self, instances: list[Instance]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "cara_router_requests",
            "Requests forwarded, by instance and policy",
            ["instance", "policy"],
            registry=r,
        )
        self.route = Histogram(
            "cara_router_route_seconds",
            "Time to pick an instance: state fetch (or cache) plus the policy",
            buckets=ROUTE_BUCKETS,
            registry=r,
        )
        self.up = Gauge(
            "cara_router_instance_up",
            "1 if the instance's last state fetch succeeded",
            ["instance"],
            registry=r,
        )
        self.fallbacks = Counter(
            "cara_router_fallbacks",
            "Requests sent to a second instance because the first was unreachable",
            registry=r,
        )
        self.http = Counter(
            "cara_router_http_requests",
            "HTTP requests to the router by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        for inst in instances:
            self.up.labels(inst.url).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
