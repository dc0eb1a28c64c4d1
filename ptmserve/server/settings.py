"""Settings of the HTTP layer: where to listen, who may call, and how much one request may ask for.

Engine settings (budgets, device, model control) live with the engine; these only shape HTTP traffic.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from typing import Literal

from ptmserve.errors import InvalidConfig

LongInputs = Literal["truncate", "reject"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """HTTP limits and listening address, validated once at construction.

    ``long_inputs`` says what happens to an input longer than the model's ``max_tokens``: ``truncate``
    keeps its first ``max_tokens`` tokens (as the model's config says), ``reject`` answers 400. The engine
    applies it (the CLI passes it on as ``EngineSettings.truncate``); ``max_input_length`` only bounds
    the work one input can cause before that.
    """

    host: str = "127.0.0.1"  # loopback only unless asked otherwise
    port: int = 8000
    api_key: str | None = None  # when set, every route but health needs "Authorization: Bearer <key>"
    max_body_bytes: int = 16 * 1024 * 1024  # larger bodies get 413 before they are read in full
    max_batch_inputs: int = 256  # inputs per request; more gets 413
    max_input_length: int = 100_000  # characters per text, or ids per token list; more gets 413
    long_inputs: LongInputs = (
        "truncate"  # for the engine: EngineSettings.truncate = long_inputs == "truncate"
    )
    drain_seconds: float = 30.0  # on SIGTERM: time allowed for in-flight requests to finish
    # Slow clients: a request's headers must arrive within header_timeout (counted from the connection,
    # or from the first byte of a later request on it), its body within body_timeout of its headers;
    # else 408 and the connection closes. An idle keep-alive connection closes after keep_alive_timeout.
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000  # open connections; a request on one beyond this gets 503
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.host:
            problems.append("host must not be empty")
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not in 0..65535")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            problems.append("api_key must be a non-empty string without whitespace")
        for name in ("max_body_bytes", "max_batch_inputs", "max_input_length", "max_connections"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:  # also refuses NaN
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.long_inputs not in ("truncate", "reject"):
            problems.append(f"long_inputs {self.long_inputs!r} is not 'truncate' or 'reject'")
        if self.drain_seconds < 0:
            problems.append(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if problems:
            raise InvalidConfig("; ".join(problems))

    @property
    def is_loopback(self) -> bool:
        """True when the server listens on a loopback address only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the HTTP flags (``--host``, ``--port``, ``--api-key``, limits) to a ``serve`` parser."""
    d = ServerSettings()
    g = parser.add_argument_group("HTTP server")
    g.add_argument("--host", default=d.host, help="address to bind (default %(default)s: this machine only)")
    g.add_argument("--port", type=int, default=d.port, help="port (default %(default)s)")
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route except /v2/health/* "
        "(default: the PTMSERVE_API_KEY environment variable, else no auth)",
    )
    g.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="413 above this (default %(default)s)"
    )
    g.add_argument(
        "--max-batch-inputs", type=int, default=d.max_batch_inputs, help="inputs per request; 413 above this"
    )
    g.add_argument(
        "--max-input-length",
        type=int,
        default=d.max_input_length,
        help="characters per text or ids per token list; 413 above this (default %(default)s)",
    )
    g.add_argument(
        "--long-inputs",
        choices=("truncate", "reject"),
        default=d.long_inputs,
        help="inputs longer than the model's max tokens: truncate them, or answer 400 (default %(default)s)",
    )
    g.add_argument(
        "--drain-seconds", type=float, default=d.drain_seconds, help="SIGTERM grace period for in-flight work"
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        default=d.header_timeout,
        help="seconds for a request's headers to arrive; then 408 and close (default %(default)s)",
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        default=d.body_timeout,
        help="seconds for a request's whole body to arrive after its headers; then 408 (default %(default)s)",
    )
    g.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=d.keep_alive_timeout,
        help="seconds an idle keep-alive connection stays open (default %(default)s)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=d.max_connections,
        help="open connections; requests on connections beyond this get 503 (default %(default)s)",
    )


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerSettings:
    """Build ``ServerSettings`` from flags added by ``add_server_arguments``."""
    import os

    env = os.environ if environ is None else environ
    return ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or env.get("PTMSERVE_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        max_batch_inputs=args.max_batch_inputs,
        max_input_length=args.max_input_length,
        long_inputs=args.long_inputs,
        drain_seconds=args.drain_seconds,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
