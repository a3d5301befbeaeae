"""A seeded WebSocket fuzzer for both client protocols, and the flood of a client that never reads.

Each fuzz case is one socket: it opens (`/api/chat` waits for its handshake, so the session is placed),
sends 1-12 hostile or odd messages drawn from the case's own `random.Random(seed, index)`, reads what
comes back for a moment, and ends one of three ways unless the server closed it first: a normal close,
the TCP connection dropped, or a close in the middle of a frame (a partial frame, then dropped). The
same seed gives the same cases, whatever the timing; a failing case prints its protocol, index and steps.

What the messages are:
- moshi (binary, first byte the kind): real Ogg/Opus audio, truncated Ogg, garbage after `OggS`, a page
  with a broken CRC, random bytes as audio, an Opus "bomb" (one page that decodes to 8 s), 3 s of audio in
  one message (over the pacing burst), unknown kinds, empty messages, text frames, rapid bursts,
  messages over the size limit;
- realtime (JSON): every client event with a wrong JSON type (null, bool, numbers, huge ints, strings,
  lists, objects) in each of its fields in turn (`event_id`, `type`, every `session` field down to
  `audio.input.format.rate`, `audio`, `response_id`), invalid and truncated JSON, nesting too deep,
  integers past Python's digit limit, unknown types, binary frames, odd/invalid/over-burst base64 audio,
  rapid bursts, messages over the size limit, and valid events (appends start a real session).

`Outcome` is what the client saw: every error's reason, and how the socket closed (code and reason).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Close, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from shared.audio import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder

HANDSHAKE, AUDIO, TEXT, ERROR = 0x00, 0x01, 0x02, 0x05
ENDINGS = ("close", "drop", "mid_frame")
UNKNOWN_KINDS = (0x00, 0x02, 0x04, 0x05, 0x7F, 0xFF)  # kinds a client may not send
DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY)
READ_AFTER_S = 0.3  # how long a case listens after its last message
OVERSIZED = (1 << 20) + 1024  # just past CHORUS_WS_MAX_MESSAGE_BYTES' default


# --- what the messages are made of ------------------------------------------------------------------


def tone(seconds: float, rng: random.Random) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * rng.uniform(100, 400) * t)).astype(np.float32)


def ogg_audio(seconds: float, rng: random.Random) -> bytes:
    """A whole Ogg/Opus stream (headers included) of `seconds` of audio, as one byte string."""
    encoder = OpusEncoder()
    samples = tone(seconds, rng)
    samples = np.pad(samples, (0, (-len(samples)) % FRAME_SAMPLES))
    return b"".join(encoder.encode(frame) for frame in samples.reshape(-1, FRAME_SAMPLES))


def ogg_pages(stream: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos + 27 <= len(stream) and stream[pos : pos + 4] == b"OggS":
        segments = stream[pos + 26]
        end = pos + 27 + segments + sum(stream[pos + 27 : pos + 27 + segments])
        pages.append(stream[pos:end])
        pos = end
    return pages


def ogg_packets(page: bytes) -> list[bytes]:
    segments = page[26]
    lacing, body = page[27 : 27 + segments], 27 + segments
    packets, current = [], b""
    for size in lacing:
        current += page[body : body + size]
        body += size
        if size < 255:
            packets.append(current)
            current = b""
    return packets


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_page(packets: list[bytes], sequence: int, granule: int, serial: int) -> bytes:
    """One Ogg page with a valid CRC (Ogg's own polynomial)."""
    lacing = b"".join(b"\xff" * (len(p) // 255) + bytes([len(p) % 255]) for p in packets)
    header = b"OggS\x00\x00" + struct.pack("<qIII", granule, serial, sequence, 0) + bytes([len(lacing)])
    page = header + lacing + b"".join(packets)
    crc = 0
    for byte in page:
        crc = ((crc << 8) ^ _CRC[((crc >> 24) ^ byte) & 0xFF]) & 0xFFFFFFFF
    return page[:22] + struct.pack("<I", crc) + page[26:]


def opus_bomb(rng: random.Random) -> bytes:
    """Real Opus packets, 200 of them in one page: 8 s of audio from ~10 KB (sphn refuses past ~5 s)."""
    pages = ogg_pages(ogg_audio(0.4, rng))
    serial = struct.unpack("<I", pages[0][14:18])[0]
    packet = ogg_packets(pages[-1])[-1]
    return b"".join(pages[:2]) + ogg_page([packet] * 200, 2, 200 * 960, serial)


def pcm_b64(seconds: float, rng: random.Random) -> str:
    pcm = (tone(seconds, rng) * 32767).astype("<i2").tobytes()
    return base64.b64encode(pcm).decode()


WRONG_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    3.5,
    -1e308,
    2**70,
    "",
    "x" * 3000,
    "\x00\ud7ff🎤",
    [],
    [1, "a", None],
    {},
    {"type": "session.update"},
    [[[[[]]]]],
]


def realtime_events(rng: random.Random) -> dict[str, dict[str, Any]]:
    """One valid event of each client type, every field filled (the fuzzer breaks them one at a time)."""
    return {
        "session.update": {
            "session": {
                "type": "realtime",
                "instructions": "You are brief.",
                "voice": "moshiko",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "temperature": 0.8,
                "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}},
                    "output": {"voice": "moshiko", "format": {"type": "audio/pcm", "rate": 24000}},
                },
            }
        },
        "input_audio_buffer.append": {"audio": pcm_b64(0.08, rng)},
        "input_audio_buffer.clear": {},
        "input_audio_buffer.commit": {},
        "response.create": {},
        "response.cancel": {"response_id": "resp_0"},
    }


def field_paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from field_paths(inner, (*prefix, key))


def with_value(event: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(event)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return broken


# --- the cases --------------------------------------------------------------------------------------

Message = str | bytes  # what goes on the wire: a text frame or a binary frame
Maker = Callable[[], Message | list[Message]]


@dataclass
class Case:
    protocol: str
    index: int
    messages: list[tuple[str, Message]]  # (what it is, the frame)
    ending: str

    def describe(self) -> str:
        runs = [(name, len(list(group))) for name, group in itertools.groupby(n for n, _ in self.messages)]
        steps = ", ".join(name if count == 1 else f"{name} x{count}" for name, count in runs)
        return f"{self.protocol} case {self.index} [{steps}] then {self.ending}"


def moshi_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}-moshi-{index}")
    audio = ogg_audio(0.32, rng)
    choices: list[tuple[str, Maker]] = [
        ("audio", lambda: bytes([AUDIO]) + audio),
        ("truncated_ogg", lambda: bytes([AUDIO]) + audio[: rng.randrange(1, len(audio))]),
        ("garbage_ogg", lambda: bytes([AUDIO]) + b"OggS" + rng.randbytes(rng.randrange(0, 4000))),
        ("random_audio_bytes", lambda: bytes([AUDIO]) + rng.randbytes(rng.randrange(0, 20000))),
        ("bad_crc", lambda: bytes([AUDIO]) + _flip_byte(audio, rng)),
        ("opus_bomb", lambda: bytes([AUDIO]) + opus_bomb(rng)),
        ("over_burst_audio", lambda: bytes([AUDIO]) + ogg_audio(3.0, rng)),
        ("unknown_kind", lambda: bytes([rng.choice(UNKNOWN_KINDS)]) + rng.randbytes(9)),
        ("empty", lambda: b""),
        ("text_frame", lambda: rng.choice(["hello", "\x01audio", json.dumps({"type": "x"})])),
        ("rapid_burst", lambda: [bytes([AUDIO]) + rng.randbytes(3) for _ in range(300)]),
        ("oversized", lambda: bytes([AUDIO]) + rng.randbytes(OVERSIZED)),
    ]
    return _case("moshi", index, rng, choices)


def realtime_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}-realtime-{index}")
    events = realtime_events(rng)

    def wrong_type() -> Message:
        kind = rng.choice(sorted(events))
        event = {"type": kind, "event_id": f"evt_{index}", **events[kind]}
        path = rng.choice(list(field_paths(event)))
        return json.dumps(with_value(event, path, rng.choice(WRONG_VALUES)))

    def valid() -> Message:
        kind = rng.choice(sorted(events))
        return json.dumps({"type": kind, **events[kind]})

    def append(audio: str) -> Message:
        return json.dumps({"type": "input_audio_buffer.append", "audio": audio})

    choices: list[tuple[str, Maker]] = [
        ("wrong_type", wrong_type),
        ("wrong_type", wrong_type),
        ("wrong_type", wrong_type),
        ("valid", valid),
        ("invalid_json", lambda: rng.choice(["{", "nul", '{"type": }', "[1,]", "\ud7ff"])),
        ("truncated_json", lambda: valid()[: rng.randrange(1, 20)]),
        ("deep_nesting", lambda: "[" * 100_000 + "]" * 100_000),
        ("huge_int", lambda: '{"type": "session.update", "event_id": ' + "9" * 5000 + "}"),
        ("unknown_type", lambda: json.dumps({"type": rng.choice(["x", "response.created", "a" * 2000])})),
        ("binary_frame", lambda: rng.randbytes(rng.randrange(0, 2000))),
        ("odd_audio", lambda: append(base64.b64encode(b"\x01\x02\x03").decode())),
        ("invalid_base64", lambda: append("!!not base64!!")),
        ("empty_audio", lambda: append("")),
        ("over_burst_audio", lambda: append(pcm_b64(3.0, rng))),
        ("rapid_burst", lambda: [append(pcm_b64(0.02, rng)) for _ in range(300)]),
        ("oversized", lambda: append("A" * OVERSIZED)),
    ]
    return _case("realtime", index, rng, choices)


def _case(protocol: str, index: int, rng: random.Random, choices: list[tuple[str, Maker]]) -> Case:
    messages: list[tuple[str, Message]] = []
    for _ in range(rng.randrange(1, 13)):
        name, make = rng.choice(choices)
        made = make()
        messages.extend((name, m) for m in (made if isinstance(made, list) else [made]))
    return Case(protocol, index, messages, rng.choice(ENDINGS))


def _flip_byte(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


# --- running them -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    case: Case
    errors: list[str] = field(default_factory=list)  # every error's reason, as the client saw it
    error_codes: list[str] = field(default_factory=list)  # realtime: every error's code
    opened: bool = False
    close_code: int | None = None
    close_reason: str = ""
    closed_by_server: bool = False
    client_ended: bool = False
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # opened, or closed

    def problems(self) -> list[str]:
        """What a hostile client must never see: an error without a reason, an internal error, a server
        close without a reason, or a connection that just ended (1006) without a close."""
        found = [f"an error without a reason: {e!r}" for e in self.errors if not e.strip()]
        found += [e for e in self.errors if e.startswith("connect failed")]
        found += [f"an internal error: {e!r}" for e in self.errors if "internal error" in e]
        found += [f"error code {c}" for c in self.error_codes if c in ("internal_error", "", None)]
        if self.closed_by_server and self.close_code not in (1000, None) and not self.close_reason:
            found.append(f"closed with {self.close_code} and no reason")
        if self.closed_by_server and self.close_code in (1006, 1011):
            found.append(f"closed with {self.close_code} ({self.close_reason!r})")
        return found


async def run_case(ws_url: str, case: Case) -> Outcome:
    outcome = Outcome(case)
    path = "/api/chat" if case.protocol == "moshi" else "/v1/realtime?model=moshiko"
    try:
        ws = await connect(f"{ws_url}{path}", open_timeout=30, max_size=1 << 24, close_timeout=5)
    except (InvalidHandshake, OSError) as exc:
        outcome.errors.append(f"connect failed: {exc!r}")
        return outcome
    reader = asyncio.create_task(_read(ws, outcome))
    try:
        if case.protocol == "moshi" and not await _handshake(outcome):
            return outcome  # refused (no capacity): the reason was recorded
        for _, message in case.messages:
            await ws.send(message)
        await asyncio.wait({reader}, timeout=READ_AFTER_S)
        if not reader.done():
            await _end(ws, outcome)
        await asyncio.wait_for(asyncio.shield(reader), 15)
    except ConnectionClosed:
        await asyncio.wait_for(asyncio.shield(reader), 15)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await reader
        if ws.transport is not None and not ws.transport.is_closing():
            ws.transport.abort()  # a transport already closed has let go of its loop: abort() would raise
    return outcome


async def _handshake(outcome: Outcome, timeout_s: float = 30) -> bool:
    """Whether the session opened (moshi: the handshake came), rather than being refused."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(outcome.answered.wait(), timeout_s)
    return outcome.opened


async def _read(ws: ClientConnection, outcome: Outcome) -> None:
    try:
        async for message in ws:
            if isinstance(message, bytes):
                if message[:1] == bytes([HANDSHAKE]):
                    outcome.opened = True
                    outcome.answered.set()
                elif message[:1] == bytes([ERROR]):
                    outcome.errors.append(message[1:].decode(errors="replace"))
            else:
                event = json.loads(message)
                outcome.opened = True
                if event.get("type") == "error":
                    outcome.errors.append(str(event["error"].get("message") or ""))
                    outcome.error_codes.append(str(event["error"].get("code") or ""))
    except ConnectionClosed:
        pass
    protocol = ws.protocol
    received = protocol.close_rcvd
    if received is not None and (protocol.close_sent is None or protocol.close_rcvd_then_sent):
        outcome.closed_by_server = True
        outcome.close_code, outcome.close_reason = received.code, received.reason
    elif received is None and not outcome.client_ended:
        outcome.closed_by_server = True  # the connection ended without a close frame
        outcome.close_code = 1006
    outcome.answered.set()


async def _end(ws: ClientConnection, outcome: Outcome) -> None:
    ending = outcome.case.ending
    outcome.client_ended = True
    if ending == "close":
        await ws.close()
    elif ending == "drop":
        ws.transport.abort()
    elif ending == "mid_frame":
        # A text frame announcing 1000 bytes, 10 of them sent (masked, as a client must), then gone.
        # The server may have closed first (a 1009 for an earlier frame): then there is nothing to cut off.
        if ws.state is State.OPEN and not ws.transport.is_closing():
            ws.transport.write(bytes([0x81, 0x80 | 126]) + (1000).to_bytes(2, "big") + os.urandom(14))
        ws.transport.abort()


async def run_fuzz(ws_url: str, seed: int, cases: int, concurrency: int = 4) -> list[Outcome]:
    """`cases` cases of each protocol, `concurrency` sockets at once."""
    todo = [moshi_case(seed, i) for i in range(cases)] + [realtime_case(seed, i) for i in range(cases)]
    random.Random(seed).shuffle(todo)
    outcomes: list[Outcome] = []
    limit = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> None:
        async with limit:
            outcomes.append(await run_case(ws_url, case))

    await asyncio.gather(*(one(case) for case in todo))
    return outcomes


async def flood_without_reading(ws_url: str, messages: int, payload: str = "x") -> ClientConnection:
    """A realtime client that sends `messages` tiny invalid messages as fast as it can and reads nothing;
    returns the open connection (the caller reads what came back, or closes it)."""
    ws = await connect(f"{ws_url}/v1/realtime?model=moshiko", max_size=1 << 24, close_timeout=5)
    for _ in range(messages):
        await ws.send(payload)
    return ws


async def read_until_quiet(ws: ClientConnection, quiet_s: float) -> list[dict[str, Any]]:
    """Every realtime event that comes until none has come for `quiet_s`."""
    events = []
    while True:
        try:
            events.append(json.loads(await asyncio.wait_for(ws.recv(), quiet_s)))
        except TimeoutError:
            return events


class NonReadingClient:
    """A WebSocket client over a raw socket with a small receive buffer, that reads nothing until told to.
    (A client library keeps reading into its own memory; this one leaves what it is sent to back up in the
    kernel, then in the server.) Only the handshake is read at once."""

    def __init__(self, url: str, receive_buffer: int = 4096) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.setblocking(False)
        self.url = url

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        uri = parse_uri(self.url)
        await loop.sock_connect(self.sock, (uri.host, uri.port))
        self.protocol.send_request(self.protocol.connect())
        await self._flush()
        while self.protocol.state is State.CONNECTING:
            self.protocol.receive_data(await loop.sock_recv(self.sock, 4096))
        if self.protocol.state is not State.OPEN:
            raise ConnectionError(f"handshake failed: {self.protocol.handshake_exc!r}")
        self.protocol.events_received()  # the handshake response

    async def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        await self._flush()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, b"".join(self.protocol.data_to_send()))

    async def read_to_close(self, quiet_s: float = 15) -> tuple[int, Close | None]:
        """Read everything now: how many messages came, and the server's close frame (None when the
        connection ended without one, or nothing came for `quiet_s`)."""
        loop = asyncio.get_running_loop()
        messages = 0
        while self.protocol.close_rcvd is None:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), quiet_s)
            except (TimeoutError, ConnectionError):
                break
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            messages += sum(1 for e in self.protocol.events_received() if e.opcode in DATA_OPCODES)
            if not data:
                break
        return messages, self.protocol.close_rcvd

    def close(self) -> None:
        self.sock.close()
