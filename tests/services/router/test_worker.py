"""The router's core loop against a real redis-server: the tests play dialogue, TTS and gateway by
appending entries to the session's streams and chorus:control, and read what the router wrote to `:out`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from chorus.devtools.redis_server import EmbeddedRedis
from services.router.mixer import Mixer
from services.router.routing import INLINE_SPEECH_FRAMES, Router
from services.router.settings import RouterSettings
from services.router.speech import EnergyGate
from shared.audio import FRAME_SAMPLES, silence_frame
from shared.bus import Bus
from shared.errors import MalformedMessage
from shared.messages import (
    CONTROL,
    DIALOGUE,
    INPUT,
    OUTPUT,
    ClonedAudio,
    DialogueFrame,
    EventName,
    OutputAudio,
    OutputMessage,
    OutputText,
    SessionEvent,
    SessionFlush,
    SessionStart,
    SessionStop,
    SessionUpdate,
    UserAudio,
    VoiceChanged,
    VoiceMode,
    encode,
)
from shared.ownership import SessionOwnership, TakeOutcome
from shared.presence import WorkerPresence
from shared.sessions import SessionStore
from shared.streams import StreamNames
from tests.support.sessions import open_session

SID = "sess1"
PROFILE = "profile:alice"


def pcm(level: int) -> bytes:
    return np.full(FRAME_SAMPLES, level, dtype="<i2").tobytes()


NATIVE = pcm(1000)
CLONED = pcm(2000)
LOUD_VOICE = (np.sin(np.arange(FRAME_SAMPLES) / 3) * 12000).astype("<i2").tobytes()
SPEECH_EDGES = (EventName.SPEECH_STARTED, EventName.SPEECH_STOPPED)


@contextlib.asynccontextmanager
async def running_router(bus: Bus, worker_id: str = "router-1") -> AsyncIterator[Router]:
    settings = RouterSettings(worker_id=worker_id, router_tts_check_frames=1, session_ttl_s=60)
    router = Router(bus, settings, EnergyGate())
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop))
    try:
        yield router
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def tts_worker(bus: Bus, free_slots: int = 8) -> AsyncIterator[WorkerPresence]:
    presence = WorkerPresence(
        bus, "tts", "tts-1", ttl_s=30, interval_s=1, describe=lambda: {"free_slots": free_slots}
    )
    await presence.beat()
    try:
        yield presence
    finally:
        await presence.leave()


class Player:
    """Plays the dialogue and TTS services of one session."""

    def __init__(self, bus: Bus, sid: str = SID) -> None:
        self.bus, self.sid, self.names = bus, sid, bus.names
        self.dlg_seq = self.tts_seq = self.in_seq = 0

    async def dialogue(self, text: str = "", pcm: bytes = NATIVE) -> None:
        self.dlg_seq += 1
        frame = DialogueFrame(session_id=self.sid, seq=self.dlg_seq, pcm=pcm, text=text)
        await self.bus.append(self.names.session_dialogue(self.sid), frame)

    async def dialogue_event(self, name: str) -> None:
        self.dlg_seq += 1
        event = SessionEvent(session_id=self.sid, seq=self.dlg_seq, name=name)
        await self.bus.append(self.names.session_dialogue(self.sid), event)

    async def phrase(self, text: str, frames: int) -> None:
        for i in range(frames):
            self.tts_seq += 1
            audio = ClonedAudio(
                session_id=self.sid, seq=self.tts_seq, pcm=CLONED, text=text if i == 0 else ""
            )
            await self.bus.append(self.names.session_tts(self.sid), audio)

    async def user(self, pcm: bytes) -> None:
        self.in_seq += 1
        await self.bus.append(
            self.names.session_input(self.sid), UserAudio(session_id=self.sid, seq=self.in_seq, pcm=pcm)
        )

    async def start(self, voice: str, mode: VoiceMode) -> None:
        """As the gateway does: the session hash first, then `start` on chorus:control."""
        await open_session(self.bus, self.sid, voice=voice, voice_mode=mode)

    async def output(self) -> list[OutputMessage]:
        return [OUTPUT.decode(e.fields) for e in await self.bus.range(self.names.session_output(self.sid))]

    async def wait_output(
        self, check: Callable[[list[OutputMessage]], bool], what: str, tick: bool = False
    ) -> list[OutputMessage]:
        """Read `:out` until `check` holds; with `tick`, keep the dialogue clock going meanwhile."""
        for _ in range(400):
            out = await self.output()
            if check(out):
                return out
            if tick:
                await self.dialogue()
            await asyncio.sleep(0.025)
        raise AssertionError(f"router never produced: {what}")


def audio(out: list[OutputMessage]) -> list[OutputAudio]:
    return [m for m in out if isinstance(m, OutputAudio)]


def events(out: list[OutputMessage], name: str) -> list[SessionEvent]:
    return [m for m in out if isinstance(m, SessionEvent) and m.name == name]


async def test_a_native_session_gets_moshis_audio_text_and_events_even_those_written_before_it_started(
    bus: Bus,
) -> None:
    play = Player(bus)
    await play.dialogue_event(EventName.READY)  # before the router took the session
    await play.dialogue(" Hello")
    await play.dialogue(" there")
    async with running_router(bus):
        await play.start("moshiko", "auto")
        out = await play.wait_output(lambda o: len(audio(o)) == 2, "two audio frames")
    assert [m.text for m in out if isinstance(m, OutputText)] == [" Hello", " there"]
    assert len(events(out, EventName.READY)) == 1
    assert [(a.pcm, a.source) for a in audio(out)] == [(NATIVE, "native")] * 2
    assert [m.seq for m in out] == list(range(len(out)))


async def test_a_cloned_session_plays_the_tts_audio_and_mutes_moshi(bus: Bus) -> None:
    play = Player(bus)
    await play.phrase("Hi there", 3)
    for piece in (" Hi", " there", ""):
        await play.dialogue(piece)
    async with tts_worker(bus), running_router(bus):
        await play.start(PROFILE, "cloned")
        out = await play.wait_output(lambda o: len(audio(o)) == 3, "three audio frames")
    assert [(a.pcm, a.source) for a in audio(out)] == [(CLONED, "cloned")] * 3
    assert [m.text for m in out if isinstance(m, OutputText)] == [" Hi", " there"]


async def test_a_voice_update_switches_a_live_session_to_its_cloned_voice(bus: Bus) -> None:
    play = Player(bus)
    async with tts_worker(bus), running_router(bus):
        await play.start("moshiko", "auto")
        await play.dialogue(" one")
        await play.wait_output(lambda o: len(audio(o)) == 1, "native audio")
        await bus.append_control(SessionUpdate(session_id=SID, voice=PROFILE, voice_mode="cloned"))
        out = await play.wait_output(
            lambda o: bool(events(o, EventName.VOICE_CHANGED)), "a voice_changed event", tick=True
        )
        assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).source == "cloned"
        await play.phrase("two", 2)
        await play.dialogue(" two")
        out = await play.wait_output(lambda o: CLONED in [a.pcm for a in audio(o)], "cloned audio", tick=True)
        detail = await SessionStore(bus, 60).get(SID)
    assert audio(out)[0].pcm == NATIVE
    assert detail is not None and detail.counters.get("voice_switches") == 1, "the session detail counts it"


async def test_without_a_tts_worker_a_cloned_session_falls_back_to_native(bus: Bus) -> None:
    play = Player(bus)
    async with running_router(bus):
        await play.start(PROFILE, "cloned")
        await play.dialogue(" hi")
        out = await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
    assert audio(out)[0].pcm == NATIVE
    assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).reason == "tts_down"


async def test_a_cloned_session_no_tts_worker_has_room_for_falls_back_to_native_and_says_so(bus: Bus) -> None:
    """Every TTS worker full: the start waits in the `tts` group, nobody speaks the session. It played
    silence as if a TTS were about to, with nothing said to the client."""
    play = Player(bus)
    async with tts_worker(bus, free_slots=0), running_router(bus):
        await play.start(PROFILE, "cloned")
        await play.dialogue(" hi")
        out = await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
    assert audio(out)[0].pcm == NATIVE
    assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).reason == "tts_down"


async def test_when_the_tts_worker_goes_away_the_session_falls_back_to_native(bus: Bus) -> None:
    play = Player(bus)
    async with running_router(bus), tts_worker(bus) as tts:
        await play.start(PROFILE, "auto")
        await play.dialogue()
        await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
        await tts.leave()
        out = await play.wait_output(lambda o: NATIVE in [a.pcm for a in audio(o)], "native audio", tick=True)
    assert audio(out)[0].source == "cloned"
    switch = events(out, EventName.VOICE_CHANGED)
    assert [(e.data_as(VoiceChanged).source, e.data_as(VoiceChanged).reason) for e in switch] == [
        ("native", "tts_down")
    ]


async def test_user_speech_over_queued_cloned_audio_flushes_the_tts(bus: Bus, names: StreamNames) -> None:
    play = Player(bus)
    async with tts_worker(bus), running_router(bus):
        await play.start(PROFILE, "cloned")
        await play.dialogue(" A long answer")
        await play.phrase("A long answer", 40)
        await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
        for _ in range(3):
            await play.user(LOUD_VOICE)
        out = await play.wait_output(lambda o: bool(events(o, EventName.SPEECH_STARTED)), "speech_started")
        control = [CONTROL.decode(e.fields) for e in await bus.range(names.session_control(SID))]
        await play.dialogue()
        out = await play.wait_output(lambda o: len(audio(o)) == 2, "the next audio frame")
    assert SessionFlush(session_id=SID, created_at=0) in [
        c.model_copy(update={"created_at": 0}) for c in control
    ]
    assert audio(out)[1].pcm == silence_frame(), "queued cloned audio was dropped"


async def test_stop_ends_the_session_releases_it_and_expires_its_keys(bus: Bus, names: StreamNames) -> None:
    play = Player(bus)
    async with running_router(bus) as router:
        await play.start("moshiko", "native")
        await play.dialogue(" hi")
        await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
        await bus.append_control(SessionStop(session_id=SID, reason="client_closed"))
        out = await play.wait_output(lambda o: bool(events(o, EventName.ENDED)), "ended")
        # `ended` goes out first; the router lets the session go right after (a few Redis calls later).
        await play.wait_output(lambda _: router.sessions == {}, "the router to let the session go")
    assert events(out, EventName.ENDED)[0].detail == "client_closed"
    pending = await bus.redis.xpending(names.control, "router")
    assert pending["pending"] == 0, "the start was acked"
    assert await bus.redis.smembers(names.owned("router", "router-1")) == set(), "the session was released"
    assert 0 < await bus.redis.ttl(names.session_output(SID)) <= 10, "its streams are deleted soon"


async def test_a_session_taken_over_from_a_dead_router_goes_on_from_where_it_was(
    bus: Bus, names: StreamNames
) -> None:
    play = Player(bus)
    await play.dialogue(" already routed")
    for seq in range(10):  # what the dead router wrote
        await bus.append(names.session_output(SID), OutputText(session_id=SID, seq=seq, text="x"))
    await play.start("moshiko", "native")
    dead = SessionOwnership(
        bus,
        SessionStore(bus, 60),
        service="router",
        group="router",
        worker_id="dead-router",
        field="router_worker",
    )
    assert await dead.take(SID) is TakeOutcome.TAKEN  # it never beats: its presence is gone
    async with running_router(bus) as router:
        await play.wait_output(lambda _: SID in router.sessions, "the session taken over")
        await play.dialogue(" new")
        out = await play.wait_output(lambda o: len(audio(o)) == 1, "an audio frame")
    fresh = out[10:]
    assert [m.text for m in fresh if isinstance(m, OutputText)] == [" new"], "old frames are not replayed"
    assert [m.seq for m in fresh] == list(range(10, 10 + len(fresh)))


async def test_the_start_of_a_session_that_is_already_over_is_ignored(bus: Bus, names: StreamNames) -> None:
    await bus.append_control(SessionStart(session_id="gone"))  # no session hash: it expired long ago
    play = Player(bus)
    async with running_router(bus) as router:
        await play.start("moshiko", "native")
        await play.wait_output(lambda _: SID in router.sessions, "the live session taken")
        assert "gone" not in router.sessions


async def test_output_that_could_not_be_written_is_not_lost_but_written_next_round(
    names: StreamNames,
) -> None:
    """A write that fails (Redis paused past the socket timeout) keeps the session's output: `ended` or
    `ready` must reach the client, not vanish with the failed round."""
    with EmbeddedRedis() as server:
        bus = await Bus.connect(server.url, names, socket_timeout_s=0.5)
        try:
            router = Router(bus, RouterSettings(worker_id="router-1"), EnergyGate())
            start = await router.ownership.admit(await open_session(bus, SID, voice="moshiko"))
            assert start is not None
            await router._open(start, failover=False)
            session = router.sessions[SID]
            session.pending.merge(session.mixer.end("client_closed"))
            await bus.redis.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            with pytest.raises(RedisTimeoutError):
                await router._publish([session])
            assert [m.name for m in session.pending.messages if isinstance(m, SessionEvent)] == ["ended"]
            await asyncio.sleep(1.5)  # the pause is over
            await router._publish([session])
            written = [OUTPUT.decode(e.fields) for e in await bus.range(names.session_output(SID))]
            assert [m.name for m in written if isinstance(m, SessionEvent)] == ["ended"], "once, not lost"
        finally:
            await bus.close()


async def test_a_round_whose_first_write_fails_loses_nothing_it_read(names: StreamNames) -> None:
    """The natively voiced sessions' ticks are written first. When that write fails (Redis paused past the
    socket timeout), the round still scores the user's speech and dispatches the cloned session's tick, and
    a later write carries all of it: the round's cursors moved past what it read, so nothing may stay
    behind."""
    with EmbeddedRedis() as server:
        bus = await Bus.connect(server.url, names, socket_timeout_s=0.5)
        try:
            router = Router(bus, RouterSettings(worker_id="router-1"), EnergyGate())
            players = []
            for sid, voice, mode in (("native", "moshiko", "native"), ("cloned", PROFILE, "cloned")):
                start = await router.ownership.admit(
                    await open_session(bus, sid, voice=voice, voice_mode=mode)
                )
                assert start is not None
                await router._open(start, failover=False)
                play = Player(bus, sid)
                players.append(play)
                for _ in range(2):
                    await play.user(LOUD_VOICE)
                await play.dialogue(" hi")
            await bus.redis.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # reads go on, writes wait
            with pytest.raises(RedisTimeoutError):
                await router.route_once()  # both writes time out
            await asyncio.sleep(1.5)  # the pause is over
            await router._publish(router.sessions.values())
            for play in players:
                out = await play.output()
                assert [m.text for m in out if isinstance(m, OutputText)] == [" hi"], play.sid
                assert len([m for m in out if isinstance(m, OutputAudio)]) == 1, play.sid
                speech = [
                    m for m in out if isinstance(m, SessionEvent) and m.name == EventName.SPEECH_STARTED
                ]
                assert len(speech) == 1, play.sid
                assert [m.seq for m in out] == sorted(m.seq for m in out), play.sid
        finally:
            await bus.close()


async def test_speech_is_seen_in_the_round_it_arrived_with_whether_scored_on_the_loop_or_in_a_thread(
    bus: Bus,
) -> None:
    """A round of few user frames is scored on the event loop, one of many in a thread: either way the
    round that read them sees the speech. A cloned session's tick waits for it (a barge-in drops the cloned
    audio queued for that tick): `speech_started` comes first. A natively voiced session's tick goes ahead
    of the detector, which has nothing to drop for it: its audio first, `speech_started` in the same round."""
    router = Router(bus, RouterSettings(worker_id="router-1"), EnergyGate())
    async with tts_worker(bus):
        for voice, mode, order in (
            ("moshiko", "native", [OutputAudio, SessionEvent]),
            (PROFILE, "cloned", [SessionEvent, OutputAudio]),
        ):
            for size, frames in (("few", 2), ("many", INLINE_SPEECH_FRAMES + 1)):
                sid = f"{size}-{mode}"
                play = Player(bus, sid)
                start = await router.ownership.admit(
                    await open_session(bus, sid, voice=voice, voice_mode=mode)
                )
                assert start is not None
                await router._open(start, failover=False)
                for _ in range(frames):
                    await play.user(LOUD_VOICE)
                await play.dialogue(" hi")
                await router.route_once()  # one round
                out = [
                    m
                    for m in await play.output()
                    if isinstance(m, OutputAudio)
                    or (isinstance(m, SessionEvent) and m.name != EventName.READY)
                ]
                assert [type(m) for m in out if not _is_switch(m)] == order, sid
                assert [m.name for m in out if isinstance(m, SessionEvent) and not _is_switch(m)] == [
                    EventName.SPEECH_STARTED
                ], sid


def _is_switch(message: OutputMessage) -> bool:
    return isinstance(message, SessionEvent) and message.name == EventName.VOICE_CHANGED


async def test_native_cloned_and_switching_sessions_with_speech_coming_and_going_lose_nothing(
    bus: Bus,
) -> None:
    """A natively voiced, a cloned and a switching session on one running router; user speech coming and
    going, 7 frames per session and tick (a round of more than INLINE_SPEECH_FRAMES of them is scored in a
    thread, while the natively voiced ticks are written); the switcher's voice changed on its control
    stream at random. Every session's `:out`
    keeps every tick's audio and text once, its seqs contiguous, its speech edges alternating."""
    rng, ticks = random.Random(7), 40
    voices: list[tuple[str, VoiceMode]] = [("moshiko", "native"), (PROFILE, "cloned"), (PROFILE, "auto")]
    async with tts_worker(bus), running_router(bus) as router:
        players = {}
        for sid, (voice, mode) in {"native": voices[0], "cloned": voices[1], "switch": voices[0]}.items():
            players[sid] = play = Player(bus, sid)
            await play.start(voice, mode)
        await players["native"].wait_output(lambda _: len(router.sessions) == 3, "the three sessions taken")
        loud = False
        for tick in range(ticks):
            if tick % 5 == 0:  # five ticks of speech, five of silence
                loud = not loud
            for play in players.values():
                for _ in range(7):
                    await play.user(LOUD_VOICE if loud else silence_frame())
                if play.sid != "native":
                    await play.phrase(f" w{tick}", 2)
            if rng.random() < 0.3:
                voice, mode = rng.choice(voices)
                await bus.append_control(SessionUpdate(session_id="switch", voice=voice, voice_mode=mode))
            for play in players.values():
                await play.dialogue(f" t{tick}")
            await asyncio.sleep(0.03)
        for play in players.values():
            await play.wait_output(lambda o: len(audio(o)) >= ticks, "every tick's audio")
    for play in players.values():
        out = await play.output()
        assert [m.seq for m in out] == list(range(len(out))), play.sid
        assert len(audio(out)) == ticks, play.sid
        assert [m.text for m in out if isinstance(m, OutputText)] == [f" t{i}" for i in range(ticks)], (
            play.sid
        )
        edges = [m.name for m in out if isinstance(m, SessionEvent) and m.name in SPEECH_EDGES]
        assert edges and all(a != b for a, b in zip(edges, edges[1:], strict=False)), (play.sid, edges)


def _without_time(message: OutputMessage) -> dict[str, bytes]:
    """An `:out` entry's fields, but for when it was made."""
    return {name: value for name, value in encode(message).items() if name != "created_at"}


async def test_the_lean_path_writes_what_the_schema_path_writes_and_refuses_malformed_entries_as_before(
    bus: Bus, names: StreamNames, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames are read lean (their fields, not their models): the router's `:out` is what a mixer fed the
    codec's messages writes, and every malformed `:dlg` or `:in` entry is skipped and logged with the
    codec's reason, as before."""
    play = Player(bus)
    await play.dialogue_event(EventName.READY)
    for level, piece in enumerate((" Hello", "", " there", "", "!")):
        await play.dialogue(piece, pcm(100 * level))
    frame = encode(DialogueFrame(session_id=SID, seq=90, pcm=NATIVE))
    for bad in ({"pcm": NATIVE[:-2]}, {"session_id": b"../x"}, {"seq": b"-1"}, {"text": b"\xff"}):
        await bus.redis.xadd(names.session_dialogue(SID), {**frame, **bad})
    await bus.redis.xadd(
        names.session_input(SID), {**encode(UserAudio(session_id=SID, pcm=NATIVE)), "v": b"2"}
    )
    await play.user(pcm(3))
    await play.dialogue(" end")
    with caplog.at_level(logging.WARNING, logger="services.router.routing"):
        async with running_router(bus):
            await play.start("moshiko", "auto")
            out = await play.wait_output(lambda o: len(audio(o)) == 6, "six audio frames")
    settings = RouterSettings()
    mixer = Mixer(
        SID, budget_frames=settings.router_budget_frames, queue_frames=settings.router_cloned_queue_frames
    )
    expected: list[OutputMessage] = []
    refused: list[str] = []
    for entry in await bus.range(names.session_input(SID)) + await bus.range(names.session_dialogue(SID)):
        try:
            message = (INPUT if entry.stream == names.session_input(SID) else DIALOGUE).decode(entry.fields)
        except MalformedMessage as exc:
            refused.append(f"malformed entry skipped: {exc.detail}")
            continue
        if not isinstance(message, UserAudio):
            expected.extend(mixer.on_dialogue(message).messages)
    assert [_without_time(m) for m in out] == [_without_time(m) for m in expected]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("malformed entry skipped")]
    assert len(refused) == 5
    assert sorted(logged) == sorted(refused)
