"""Run ``ptmserve.server.serve`` over ``FakeEngine`` in its own process (for the SIGTERM test).

    python -m tests.server.launch_fake --delay 1.0

Binds 127.0.0.1 on a free port (uvicorn logs it); prints ``ENGINE CLOSED in_flight=N`` to stdout when
``serve`` closes the engine.
"""

from __future__ import annotations

import argparse
import logging

from ptmserve.server.serve import serve
from ptmserve.server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine


class _Reporting(FakeEngine):
    def close(self, drain_seconds: float = 30.0) -> None:
        super().close(drain_seconds)
        print(f"ENGINE CLOSED in_flight={self.in_flight} completed={self.completed}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--drain-seconds", type=float, default=20.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    engine = _Reporting()
    engine.delay = args.delay
    serve(engine, ServerSettings(port=0, drain_seconds=args.drain_seconds))


if __name__ == "__main__":
    main()
