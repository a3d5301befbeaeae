"""The `chorus` console command. Subcommands import their service lazily, so the gateway image
does not need torch to run `chorus gateway`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


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


def _make_checkpoints(args: argparse.Namespace) -> int:
    from chorus.devtools.checkpoints import make_checkpoints

    written = make_checkpoints(args.dir, full_size=args.full_size, tts_config=args.tts_config)
    for part, path in written.items():
        print(f"{part}: {path}")
    print(f"use them with CHORUS_MOSHI_DIR={written['moshi']} CHORUS_TTS_DIR={written['tts']}")
    return 0


def _make_adapter(args: argparse.Namespace) -> int:
    from chorus.devtools.lora_adapter import write_random_adapter

    path = write_random_adapter(
        args.out, args.checkpoint, rank=args.rank, scaling=args.scaling, seed=args.seed
    )
    print(path)
    return 0


def _voice(value: str) -> str:
    """--voice, checked before anything is sent (argparse reports the ValueError's text)."""
    from shared.messages import parse_voice

    try:
        return parse_voice(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _voices_list(args: argparse.Namespace) -> int:
    from chorus.voices import list_voices

    return list_voices(args)


def _voices_add(args: argparse.Namespace) -> int:
    from chorus.voices import add_voice

    return add_voice(args)


def _talk(args: argparse.Namespace) -> int:
    from chorus.talk import talk

    return talk(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chorus",
        description="Chorus: real-time spoken conversation with Moshi, personas and cloned voices.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run every service on this machine (embedded redis unless CHORUS_REDIS_URL is set)",
        description=(
            "Run the four services as child processes, with an embedded redis-server unless "
            "CHORUS_REDIS_URL is set. A child that dies is restarted with backoff (0.5 s doubling to "
            "30 s); Redis comes back on the same port, without the live sessions. One line says when "
            "the gateway's /readyz is ready. SIGTERM or Ctrl-C stops everything: gateway, workers, Redis."
        ),
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

    gateway_url = "http://127.0.0.1:8000"
    talk = commands.add_parser("talk", help="stream a WAV file through a conversation; save the reply")
    talk.add_argument("input", type=Path, help="what the user says (any WAV; resampled to 24 kHz mono)")
    talk.add_argument("--out", type=Path, required=True, help="where to write the reply audio (WAV)")
    talk.add_argument("--transcript", type=Path, default=None, help="transcript JSON (default: OUT.json)")
    talk.add_argument(
        "--voice",
        type=_voice,
        default=None,
        help="moshiko, moshika, profile:<id> or catalog:<name> (alba, marius...: `chorus voices list`); "
        "default: the persona's voice, else the native voice of the model that runs",
    )
    talk.add_argument("--persona", default=None, help="persona id")
    talk.add_argument("--protocol", choices=("moshi", "realtime"), default="moshi")
    talk.add_argument("--url", default=gateway_url, help=f"gateway URL (default {gateway_url})")
    talk.add_argument("--api-key", default=None, help="API key (default: CHORUS_API_KEY)")
    talk.add_argument("--tail", type=float, default=3.0, help="seconds of silence sent after the file")
    talk.set_defaults(func=_talk)

    voices = commands.add_parser("voices", help="list voices, manage cloned-voice profiles").add_subparsers(
        dest="voices_command", required=True, metavar="ACTION"
    )
    add = voices.add_parser("add", help="upload a reference clip (3-30 s of one person speaking)")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--url", default=gateway_url, help=f"gateway URL (default {gateway_url})")
    add.add_argument("--api-key", default=None, help="API key (default: CHORUS_API_KEY)")
    add.add_argument(
        "--i-have-consent",
        action="store_true",
        help="confirm the speaker agreed to have their voice cloned (otherwise you are asked)",
    )
    add.set_defaults(func=_voices_add)
    listing = voices.add_parser("list", help="your voice profiles, the catalog voices, the kinds available")
    listing.add_argument("--url", default=gateway_url, help=f"gateway URL (default {gateway_url})")
    listing.add_argument("--api-key", default=None, help="API key (default: CHORUS_API_KEY)")
    listing.set_defaults(func=_voices_list)

    dev = commands.add_parser("dev", help="developer tools").add_subparsers(
        dest="dev_command", required=True, metavar="TOOL"
    )
    ckpt = dev.add_parser(
        "make-checkpoints",
        help="write small random-weight checkpoints in the published layouts to DIR/moshi and DIR/tts",
    )
    ckpt.add_argument("dir", type=Path)
    ckpt.add_argument("--full-size", action="store_true", help="real model sizes (for benchmarks)")
    ckpt.add_argument(
        "--tts-config",
        metavar="NAME",
        help="the TTS checkpoint copies this shipped Pocket TTS config (english_7m_2026-10, ...) and goes "
        "to DIR/tts-NAME",
    )
    ckpt.set_defaults(func=_make_checkpoints)
    adapter = dev.add_parser(
        "make-adapter", help="write a random LoRA adapter (moshi-finetune's layout) for a Moshi checkpoint"
    )
    adapter.add_argument("out", type=Path, help="the .safetensors file to write")
    adapter.add_argument("--checkpoint", type=Path, required=True, help="the Moshi checkpoint directory")
    adapter.add_argument("--rank", type=int, default=8)
    adapter.add_argument("--scaling", type=float, default=2.0)
    adapter.add_argument("--seed", type=int, default=0)
    adapter.set_defaults(func=_make_adapter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
