"""The `chorus` console command. Subcommands import their service lazily, so the gateway image
does not need torch to run `chorus gateway`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _run_service(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        if name == "gateway":
            from services.gateway.main import main
        elif name == "dialogue":
            from services.dialogue.worker import main
        elif name == "tts":
            from services.tts.worker import main
        else:
            from services.router.worker import main
        main()
        return 0

    return run


def _up(args: argparse.Namespace) -> int:
    from chorus.supervisor import up

    return up(args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus",
        description="Chorus: real-time spoken conversation with Moshi, personas and cloned voices.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="run every service on this machine (embedded redis unless CHORUS_REDIS_URL is set)"
    )
    up.add_argument("--port", type=int, default=None, help="gateway port (default: CHORUS_PORT or 8000)")
    up.set_defaults(func=_up)

    helps = {
        "gateway": "run the gateway (REST + WebSockets), as its container does",
        "dialogue": "run a Moshi dialogue worker, as its container does",
        "tts": "run a Pocket TTS worker, as its container does",
        "router": "run a router worker, as its container does",
    }
    for name, text in helps.items():
        commands.add_parser(name, help=text).set_defaults(func=_run_service(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
