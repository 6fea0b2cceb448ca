"""`cara-router`: route OpenAI requests over N cara-serve instances (see docs/router.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cara_jax.scheduling.router import POLICIES
from server.cli import positive
from server.flags import origins

log = logging.getLogger("cara_router")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cara-router",
        description="Rank-aware router over cara-serve instances (CaraServe's Algorithm 1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--instance",
        action="append",
        required=True,
        metavar="URL",
        help="base URL of a cara-serve instance, e.g. http://127.0.0.1:8000 (repeat per instance)",
    )
    p.add_argument("--policy", choices=POLICIES, default="rank_aware", help="routing policy")
    p.add_argument(
        "--cost-model",
        metavar="FILE",
        help="cost-model JSON for instances that publish none (picked by their kernel)",
    )
    p.add_argument(
        "--avg-response-len",
        type=positive(float),
        default=128.0,
        help="tokens a response lasts: Algorithm 1 spreads a prefill over them",
    )
    p.add_argument("--headroom", type=float, default=0.0, help="fraction of the TPOT SLO kept free")
    p.add_argument(
        "--count-prefill-stalls",
        action="store_true",
        help="SLO check on the TPOT including amortised prefills (admission's rule)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8100, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CARA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/* and send it to the instances "
        "(env CARA_API_KEY)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive(float),
        default=600.0,
        metavar="SECONDS",
        help="limit of one forwarded request, streaming included",
    )
    p.add_argument(
        "--state-timeout",
        type=positive(float),
        default=1.0,
        metavar="SECONDS",
        help="limit of one instance state fetch (slower: the instance is skipped)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    p.add_argument(
        "--allowed-origins",
        type=origins,
        default=(),
        metavar="ORIGINS",
        help="browser origins allowed to call the router (CORS), as cara-serve's flag",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of the router's log lines",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("cara_router").setLevel(args.log_level.upper())
    from aiohttp import web

    from server.router.app import RouterConfig, RouterConfigError, build_router_app

    try:
        config = RouterConfig(
            instances=tuple(u.rstrip("/") for u in args.instance),
            policy=args.policy,
            cost_model=args.cost_model,
            avg_response_len=args.avg_response_len,
            headroom=args.headroom,
            count_prefill_stalls=args.count_prefill_stalls,
            api_key=args.api_key or None,
            request_timeout_s=args.request_timeout,
            state_timeout_s=args.state_timeout,
            seed=args.seed,
            allowed_origins=tuple(args.allowed_origins),
        )
        app = build_router_app(config)
        log.info(
            "routing over %d instances (%s) with policy %s on http://%s:%d",
            len(config.instances),
            ", ".join(config.instances),
            config.policy,
            args.host,
            args.port,
        )
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            handler_cancellation=True,  # a client that leaves closes its upstream request
            access_log=None,
            print=None,
        )
    except RouterConfigError as e:
        print(f"cara-router: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
