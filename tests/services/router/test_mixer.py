"""The mixer, frame by frame: time is the dialogue clock, so nothing here sleeps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.router.mixer import DropReason, Mixer, MixerOutput
from shared.audio import FRAME_SAMPLES, silence_frame
from shared.messages import (
    ClonedAudio,
    DialogueFrame,
    EventData,
    EventName,
    Flushed,
    OutputAudio,
    OutputText,
    PhraseDone,
    Placement,
    SessionEvent,
    SwitchReason,
    VoiceChanged,
    VoiceMode,
)

SID = "s1"
PROFILE = "profile:alice"
BUDGET = 5


def pcm(level: int) -> bytes:
    return np.full(FRAME_SAMPLES, level, dtype="<i2").tobytes()


NATIVE = pcm(1000)
CLONED = pcm(2000)
SILENCE = silence_frame()


class Conversation:
    """Plays dialogue and TTS into one mixer with their own seq counters."""

    def __init__(self, voice: str = PROFILE, mode: VoiceMode = "auto", queue_frames: int = 375) -> None:
        self.mixer = Mixer(SID, voice, mode, budget_frames=BUDGET, queue_frames=queue_frames)
        self.dlg_seq = 0
        self.tts_seq = 0
        self.phrase = 0

    def tick(self, text: str = "") -> MixerOutput:
        self.dlg_seq += 1
        return self.mixer.on_frame(DialogueFrame(session_id=SID, seq=self.dlg_seq, pcm=NATIVE, text=text))

    def ticks(self, n: int) -> list[OutputAudio]:
        return [audio(self.tick()) for _ in range(n)]

    def phrase_audio(self, text: str, frames: int, level: int = 2000) -> MixerOutput:
        """A phrase of cloned audio: its first frame carries the words it covers."""
        self.phrase += 1
        out = MixerOutput()
        for i in range(frames):
            self.tts_seq += 1
            frame = ClonedAudio(
                session_id=SID,
                seq=self.tts_seq,
                pcm=pcm(level),
                text=text if i == 0 else "",
                phrase_id=self.phrase,
            )
            out.merge(self.mixer.on_cloned(frame))
        return out

    def tts_event(self, name: str, data: EventData | None = None) -> MixerOutput:
        self.tts_seq += 1
        return self.mixer.on_tts_event(SessionEvent.of(SID, self.tts_seq, name, data=data))


def audio(out: MixerOutput) -> OutputAudio:
    frames = [m for m in out.messages if isinstance(m, OutputAudio)]
    assert len(frames) == 1, "every dialogue tick yields exactly one audio frame"
    return frames[0]


def events(out: MixerOutput, name: str) -> list[SessionEvent]:
    return [m for m in out.messages if isinstance(m, SessionEvent) and m.name == name]


def texts(out: MixerOutput) -> list[str]:
    return [m.text for m in out.messages if isinstance(m, OutputText)]


def sources(frames: Sequence[OutputAudio]) -> list[str]:
    return [f.source for f in frames]


def test_a_native_voice_passes_moshis_audio_and_text_through() -> None:
    talk = Conversation(voice="moshiko", mode="auto")
    out = talk.tick(" Hello")
    assert texts(out) == [" Hello"]
    assert audio(out).pcm == NATIVE and audio(out).source == "native"
    assert all(f.pcm == NATIVE for f in talk.ticks(3))


def test_native_mode_plays_moshi_even_with_a_cloned_voice() -> None:
    talk = Conversation(mode="native")
    talk.phrase_audio("hello", 3)
    assert [f.pcm for f in talk.ticks(3)] == [NATIVE] * 3


def test_cloned_mode_plays_queued_cloned_frames_and_mutes_moshi() -> None:
    talk = Conversation(mode="cloned")
    assert audio(talk.tick()).pcm == SILENCE, "nothing queued yet: silence, not Moshi"
    talk.phrase_audio("hi there", 2)
    played = talk.ticks(3)
    assert [f.pcm for f in played] == [CLONED, CLONED, SILENCE]
    assert sources(played) == ["cloned"] * 3


def test_text_flows_whatever_the_audio_source() -> None:
    for voice, mode in (("moshiko", "auto"), (PROFILE, "cloned"), (PROFILE, "auto"), (PROFILE, "native")):
        talk = Conversation(voice=voice, mode=mode)  # type: ignore[arg-type]
        said = [texts(talk.tick(piece)) for piece in (" Hel", "lo", "", " you")]
        assert said == [[" Hel"], ["lo"], [], [" you"]]


def test_cloned_mode_falls_back_to_native_within_three_frames_when_the_tts_is_down() -> None:
    talk = Conversation(mode="cloned")
    talk.phrase_audio("hello", 10)
    talk.ticks(2)
    talk.mixer.set_tts_available(False)
    outs = [talk.tick() for _ in range(3)]
    assert NATIVE in [audio(o).pcm for o in outs]
    switched = [e for o in outs for e in events(o, EventName.VOICE_CHANGED)]
    assert [e.data_as(VoiceChanged).source for e in switched] == ["native"]
    assert switched[0].data_as(VoiceChanged).reason == SwitchReason.TTS_DOWN
    assert outs[0].switches == [("native", SwitchReason.TTS_DOWN)]


def test_an_error_event_from_the_tts_counts_as_down() -> None:
    talk = Conversation(mode="cloned")
    talk.phrase_audio("hello", 10)
    talk.tts_event(EventName.ERROR)
    out = talk.tick()
    assert audio(out).source == "native"
    assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).reason == SwitchReason.TTS_DOWN


def test_after_recovery_cloned_audio_resumes_at_a_phrase_boundary() -> None:
    talk = Conversation(mode="cloned")
    talk.mixer.set_tts_available(False)
    assert audio(talk.tick()).source == "native"
    talk.mixer.set_tts_available(True)
    # The tail of a phrase (no text on its frames) is not played: it would start mid-phrase.
    talk.tts_seq += 1
    tail = ClonedAudio(session_id=SID, seq=talk.tts_seq, pcm=pcm(3000), phrase_id=99)
    talk.mixer.on_cloned(tail)
    assert audio(talk.tick()).source == "native"
    talk.phrase_audio("next phrase", 2)
    out = talk.tick()
    assert audio(out).pcm == CLONED and audio(out).source == "cloned"
    assert events(out, EventName.VOICE_CHANGED)[0].data == VoiceChanged(
        source="cloned", reason=SwitchReason.TTS_RECOVERED, voice=PROFILE
    )


def test_auto_mode_stays_cloned_while_the_tts_keeps_up() -> None:
    talk = Conversation(mode="auto")
    for step in range(20):
        talk.tick(" word")
        talk.phrase_audio("word", 1)
        assert talk.mixer.source == "cloned", f"step {step}"


def test_auto_mode_falls_back_to_native_when_the_tts_falls_behind_the_budget() -> None:
    talk = Conversation(mode="auto")
    talk.tick(" Hello")  # owed from tick 1
    played = talk.ticks(BUDGET + 3)
    assert sources(played[:BUDGET]) == ["cloned"] * BUDGET
    assert "native" in sources(played[BUDGET : BUDGET + 3]), "fallback within 3 frames of being behind"
    assert talk.mixer.behind


def test_auto_mode_returns_to_cloned_at_a_phrase_start_once_the_tts_catches_up() -> None:
    talk = Conversation(mode="auto")
    talk.tick(" Hello")
    talk.ticks(BUDGET + 1)
    assert talk.mixer.source == "native"
    talk.phrase_audio("Hello", 3)
    out = talk.tick()
    assert audio(out).pcm == CLONED and audio(out).source == "cloned"
    assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).reason == SwitchReason.TTS_RECOVERED


def test_barge_in_drops_queued_cloned_audio_flushes_the_tts_and_says_speech_started() -> None:
    talk = Conversation(mode="cloned")
    talk.tick(" A long answer")
    talk.phrase_audio("A long answer", 20)
    talk.ticks(2)
    out = talk.mixer.on_user_speech(True)
    assert out.flush_tts
    assert out.dropped[DropReason.BARGE_IN] == 18
    assert len(events(out, EventName.SPEECH_STARTED)) == 1
    assert talk.mixer.queued_frames == 0
    assert audio(talk.tick()).pcm == SILENCE


def test_user_speech_edges_always_become_events_and_only_queued_audio_is_flushed() -> None:
    talk = Conversation(voice="moshiko")
    started = talk.mixer.on_user_speech(True)
    again = talk.mixer.on_user_speech(True)
    stopped = talk.mixer.on_user_speech(False)
    assert len(events(started, EventName.SPEECH_STARTED)) == 1 and not started.flush_tts
    assert again.messages == [], "a repeated edge is not an event"
    assert len(events(stopped, EventName.SPEECH_STOPPED)) == 1


def test_cloned_audio_of_flushed_text_still_in_flight_is_not_played() -> None:
    talk = Conversation(mode="cloned")
    talk.tick(" Old words")
    talk.mixer.on_user_speech(True)
    late = talk.phrase_audio("Old words", 3)
    assert late.dropped[DropReason.FLUSHED] == 3
    talk.tick(" New")
    talk.phrase_audio("New", 2, level=2500)
    assert audio(talk.tick()).pcm == pcm(2500)


def test_the_tts_confirming_the_flush_ends_the_drop_window() -> None:
    talk = Conversation(mode="cloned")
    talk.tick(" Old")
    talk.mixer.on_user_speech(True)
    talk.tts_event(EventName.FLUSH, Flushed(dropped_phrases=1, dropped_words=0, next_phrase_id=2))
    talk.phrase_audio("something else", 1)
    assert talk.mixer.queued_frames == 1


def test_duplicate_frames_are_ignored_by_seq() -> None:
    talk = Conversation(mode="cloned")
    frame = DialogueFrame(session_id=SID, seq=1, pcm=NATIVE, text=" hi")
    assert texts(talk.mixer.on_frame(frame)) == [" hi"]
    repeat = talk.mixer.on_frame(frame)
    assert repeat.messages == [] and repeat.dropped[DropReason.DUPLICATE] == 1
    cloned = ClonedAudio(session_id=SID, seq=1, pcm=CLONED, text="hi")
    talk.mixer.on_cloned(cloned)
    talk.mixer.on_cloned(cloned)
    assert talk.mixer.queued_frames == 1


def test_the_cloned_queue_is_bounded_and_overflow_drops_the_oldest() -> None:
    talk = Conversation(mode="cloned", queue_frames=10)
    out = talk.phrase_audio("first", 8, level=100)
    out.merge(talk.phrase_audio("second", 8, level=200))
    assert talk.mixer.queued_frames == 10
    assert out.dropped[DropReason.QUEUE_FULL] == 6
    assert [f.pcm for f in talk.ticks(3)] == [pcm(100), pcm(100), pcm(200)]


def test_dialogue_events_reach_the_client_with_the_routers_own_seq() -> None:
    talk = Conversation(voice="moshiko")
    ready = talk.mixer.on_dialogue(SessionEvent(session_id=SID, seq=0, name=EventName.READY))
    talk.tick()
    placement = Placement(worker="d2", slot=3, previous_worker="d1")
    resumed = talk.mixer.on_dialogue(
        SessionEvent(session_id=SID, seq=7, name=EventName.RESUMED, detail="worker died", data=placement)
    )
    forwarded = [*events(ready, EventName.READY), *events(resumed, EventName.RESUMED)]
    assert [(e.seq, e.detail, e.data) for e in forwarded] == [
        (0, "", Placement()),
        (2, "worker died", placement),
    ]
    # A resumed dialogue may number its frames afresh: they are not taken for duplicates.
    assert audio(talk.mixer.on_frame(DialogueFrame(session_id=SID, seq=1, pcm=NATIVE))).pcm == NATIVE


def test_output_seq_increases_by_one_per_entry_from_the_first_seq() -> None:
    mixer = Mixer(SID, "moshiko", "auto", first_seq=40)
    out = mixer.on_frame(DialogueFrame(session_id=SID, seq=5, pcm=NATIVE, text=" a"))
    out.merge(mixer.on_user_speech(True))
    out.merge(mixer.end("client_closed"))
    assert [m.seq for m in out.messages] == [40, 41, 42, 43]


def test_a_voice_update_switches_the_source_mid_session() -> None:
    talk = Conversation(voice="moshiko", mode="auto")
    assert audio(talk.tick()).source == "native"
    talk.mixer.set_voice(PROFILE, "cloned")
    out = talk.tick()
    assert audio(out).source == "cloned", "cloned mode mutes Moshi at once"
    assert events(out, EventName.VOICE_CHANGED)[0].data_as(VoiceChanged).reason == SwitchReason.VOICE_UPDATE
    talk.phrase_audio("hi", 5)
    talk.tick()
    talk.mixer.set_voice("moshika")
    out = talk.tick()
    assert audio(out).pcm == NATIVE
    assert events(out, EventName.VOICE_CHANGED)[0].data == VoiceChanged(
        source="native", reason=SwitchReason.VOICE_UPDATE, voice="moshika"
    )
    assert talk.mixer.queued_frames == 0


def test_ended_is_said_once() -> None:
    mixer = Mixer(SID)
    dialogue_ended = mixer.on_dialogue(SessionEvent(session_id=SID, name=EventName.ENDED))
    assert len(events(dialogue_ended, EventName.ENDED)) == 1
    assert mixer.end("stop").messages == []


def test_auto_mode_comes_back_to_cloned_after_the_tts_dropped_phrases() -> None:
    """A TTS whose backlog overflowed drops its oldest phrases: their text is never voiced. Letters alone
    paid the oldest debts first, so the dropped phrases' letters stayed owed, the oldest debt aged past
    the budget for good and `auto` played native for the rest of the session. A finished phrase names
    the dialogue frames it came from; everything up to its last is settled."""
    talk = Conversation(mode="auto")
    played: list[OutputAudio] = []
    for k in range(12):
        first = talk.dlg_seq + 1
        played += [audio(talk.tick(f" alpha{k}")), audio(talk.tick(f" beta{k}")), *talk.ticks(2)]
        if k in (3, 4):  # dropped from the TTS's full backlog: never voiced, never done
            continue
        talk.phrase_audio(f"alpha{k} beta{k}", 4)
        done = PhraseDone(phrase_id=talk.phrase, frames=4, dialogue_seq=(first, first + 1))
        talk.tts_event(EventName.PHRASE_DONE, done)
    assert "native" in sources(played[16:28]), "behind while the dropped phrases' words went unvoiced"
    assert sources(played[-12:]) == ["cloned"] * 12, sources(played)
    assert not talk.mixer.behind


def test_a_dialogue_worker_taking_over_lets_the_debts_of_its_old_numbering_go() -> None:
    """A resumed dialogue may number its frames afresh: debts settled by frame number must not outlive the
    numbering they were taken in (the new frames' phrases could never settle them)."""
    talk = Conversation(mode="auto")
    talk.tick(" before")
    talk.mixer.on_dialogue_event(SessionEvent.of(SID, 99, EventName.RESUMED))
    talk.dlg_seq = 0
    assert not talk.mixer.behind and sources(talk.ticks(BUDGET + 2)) == ["cloned"] * (BUDGET + 2)
