"""The realtime response carver, frame by frame: Moshi's output in, OpenAI Realtime server events out.
Time is the output's own frames, so nothing here sleeps."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from services.gateway.protocols import realtime_events as ev
from services.gateway.protocols.response_carver import AUDIBLE_DBFS, ResponseCarver, audible
from shared.audio import FRAME_SAMPLES, float_to_pcm16, pcm16_to_float, rms_dbfs, silence_frame
from shared.errors import ChorusError
from shared.messages import ContextRollover, EventName, OutputAudio, OutputText, SessionEvent

SID = "s1"
END_FRAMES = 3

SPEECH = np.full(FRAME_SAMPLES, 3000, dtype="<i2").tobytes()  # about -21 dBFS: audible
HUSH = np.full(FRAME_SAMPLES, 20, dtype="<i2").tobytes()  # about -64 dBFS: below AUDIBLE_DBFS
SILENCE = silence_frame()


class Moshi:
    """Plays Moshi's output into one carver, numbering its entries like the router does."""

    def __init__(self, end_frames: int = END_FRAMES) -> None:
        self.carver = ResponseCarver(end_frames)
        self.seq = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def says(self, text: str) -> list[ev.ServerEvent]:
        return self.carver.on_output(OutputText(session_id=SID, seq=self._next(), text=text), heard_ms=0)

    def sounds(self, pcm: bytes = SPEECH) -> list[ev.ServerEvent]:
        return self.carver.on_output(OutputAudio(session_id=SID, seq=self._next(), pcm=pcm), heard_ms=0)

    def quiet(self, frames: int) -> list[ev.ServerEvent]:
        return [event for _ in range(frames) for event in self.sounds(SILENCE)]

    def event(self, name: str, heard_ms: int = 0, detail: str = "") -> list[ev.ServerEvent]:
        message = SessionEvent(session_id=SID, seq=self._next(), name=name, detail=detail)
        return self.carver.on_output(message, heard_ms)


def types(events: list[ev.ServerEvent]) -> list[str]:
    return [event.model_dump()["type"] for event in events]


CLOSE = ["response.output_audio.done", "response.output_audio_transcript.done", "response.done"]


def test_silence_before_any_speech_sends_nothing() -> None:
    moshi = Moshi()
    assert moshi.quiet(20) == []
    assert moshi.sounds() == [], "audio outside a response is not sent"
    assert not moshi.carver.responding


def test_a_text_piece_after_silence_opens_a_response_with_its_transcript_delta() -> None:
    moshi = Moshi()
    moshi.quiet(5)
    created, delta = moshi.says("Hello")
    assert isinstance(created, ev.ResponseCreated) and created.response.status == "in_progress"
    assert isinstance(delta, ev.OutputAudioTranscriptDelta)
    assert (delta.response_id, delta.delta) == (created.response.id, "Hello")
    assert moshi.carver.responding


def test_audio_in_an_open_response_is_a_delta_of_its_item() -> None:
    moshi = Moshi()
    _, first = moshi.says("Hi")
    (audio,) = moshi.sounds()
    assert isinstance(first, ev.OutputAudioTranscriptDelta) and isinstance(audio, ev.OutputAudioDelta)
    assert (audio.response_id, audio.item_id) == (first.response_id, first.item_id)
    assert base64.b64decode(audio.delta) == SPEECH
    (more,) = moshi.says(" there")
    assert isinstance(more, ev.OutputAudioTranscriptDelta) and more.item_id == first.item_id


def test_trailing_silence_closes_the_response_with_its_whole_transcript() -> None:
    moshi = Moshi()
    created, _ = moshi.says("Hello")
    moshi.says(" world")
    moshi.sounds()
    short_pause = moshi.quiet(END_FRAMES - 1)
    assert types(short_pause) == ["response.output_audio.delta"] * (END_FRAMES - 1), "a pause is speech"
    closing = moshi.sounds(SILENCE)
    assert types(closing) == CLOSE, "the frame that ends it is not sent"
    audio_done, transcript_done, done = closing
    assert isinstance(audio_done, ev.OutputAudioDone) and isinstance(
        transcript_done, ev.OutputAudioTranscriptDone
    )
    assert isinstance(done, ev.ResponseDone) and isinstance(created, ev.ResponseCreated)
    assert transcript_done.transcript == "Hello world"
    assert done.response.id == created.response.id and done.response.status == "completed"
    (item,) = done.response.output
    assert item["id"] == audio_done.item_id == transcript_done.item_id
    assert item["content"] == [{"type": "output_audio", "transcript": "Hello world"}]
    assert not moshi.carver.responding
    assert moshi.quiet(10) == []


def test_text_keeps_a_response_open_through_quiet_audio() -> None:
    moshi = Moshi()
    moshi.says("Well")
    for _ in range(3 * END_FRAMES):
        moshi.quiet(END_FRAMES - 1)
        assert moshi.says(".")[0].model_dump()["type"] == "response.output_audio_transcript.delta"
    assert moshi.carver.responding


def test_audio_below_the_audible_level_counts_as_silence() -> None:
    moshi = Moshi()
    moshi.says("Hm")
    events = [e for _ in range(END_FRAMES) for e in moshi.sounds(HUSH)]
    assert types(events)[-3:] == CLOSE


def test_the_audible_check_decides_as_the_loudness_in_dbfs_does() -> None:
    levels = np.arange(-53, -47, 0.25)  # around AUDIBLE_DBFS (-50): a constant 103.6 in PCM16
    noise = np.random.default_rng(0).standard_normal(FRAME_SAMPLES).astype(np.float32)
    frames = [
        b"",
        SILENCE,
        SPEECH,
        np.full(FRAME_SAMPLES, -32768, dtype="<i2").tobytes(),
        *(np.full(FRAME_SAMPLES, level, dtype="<i2").tobytes() for level in range(95, 115)),
        *(float_to_pcm16(noise * 10 ** (db / 20)) for db in levels),
    ]
    for pcm in frames:
        assert audible(pcm) == (rms_dbfs(pcm16_to_float(pcm)) > AUDIBLE_DBFS)


def test_audible_audio_without_text_keeps_the_response_open() -> None:
    moshi = Moshi()
    moshi.says("La")
    for _ in range(3 * END_FRAMES):
        assert types(moshi.sounds()) == ["response.output_audio.delta"]


def test_the_next_utterance_is_a_new_response() -> None:
    moshi = Moshi()
    first, _ = moshi.says("One")
    moshi.quiet(END_FRAMES)
    second, delta = moshi.says("Two")
    assert isinstance(first, ev.ResponseCreated) and isinstance(second, ev.ResponseCreated)
    assert second.response.id != first.response.id
    assert isinstance(delta, ev.OutputAudioTranscriptDelta) and delta.delta == "Two"


def test_a_cancelled_response_closes_at_once_and_the_rest_of_its_utterance_is_muted() -> None:
    moshi = Moshi()
    created, _ = moshi.says("I was saying")
    cancelled = moshi.carver.cancel()
    assert types(cancelled) == CLOSE
    done = cancelled[-1]
    assert isinstance(done, ev.ResponseDone) and isinstance(created, ev.ResponseCreated)
    assert (done.response.id, done.response.status) == (created.response.id, "cancelled")
    assert moshi.says(" that") == [] and moshi.sounds() == [], "the rest of the utterance is not sent"
    assert moshi.quiet(END_FRAMES - 1) == []
    assert moshi.says("still") == [], "text resets the quiet count: still the same utterance"
    moshi.quiet(END_FRAMES)
    assert types(moshi.says("New")) == ["response.created", "response.output_audio_transcript.delta"]


def test_cancel_without_a_response_does_nothing() -> None:
    moshi = Moshi()
    assert moshi.carver.cancel() == []
    assert types(moshi.says("Hi"))[0] == "response.created", "and mutes nothing"


def test_finish_completes_an_open_response_and_nothing_else() -> None:
    moshi = Moshi()
    assert moshi.carver.finish() == []
    moshi.says("Bye")
    finished = moshi.carver.finish()
    assert types(finished) == CLOSE
    assert isinstance(finished[-1], ev.ResponseDone) and finished[-1].response.status == "completed"
    assert moshi.carver.finish() == []


def test_speech_started_and_stopped_share_an_item_and_carry_the_audio_clock() -> None:
    moshi = Moshi()
    (started,) = moshi.event(EventName.SPEECH_STARTED, heard_ms=800)
    (stopped,) = moshi.event(EventName.SPEECH_STOPPED, heard_ms=2400)
    assert isinstance(started, ev.SpeechStarted) and isinstance(stopped, ev.SpeechStopped)
    assert (started.audio_start_ms, stopped.audio_end_ms) == (800, 2400)
    assert started.item_id == stopped.item_id


def test_speech_stopped_without_a_start_gets_an_item_of_its_own() -> None:
    (stopped,) = Moshi().event(EventName.SPEECH_STOPPED, heard_ms=80)
    assert isinstance(stopped, ev.SpeechStopped) and stopped.item_id.startswith("item_")


def test_a_session_error_becomes_an_error_event() -> None:
    (error,) = Moshi().event(EventName.ERROR, detail="tts failed")
    assert isinstance(error, ev.ErrorEvent)
    assert (error.error.type, error.error.code, error.error.message) == (
        "invalid_request_error",
        "session_error",
        "tts failed",
    )
    (bare,) = Moshi().event(EventName.ERROR)
    assert isinstance(bare, ev.ErrorEvent) and bare.error.message == "session error"


def test_other_session_events_pass_through_as_chorus_events() -> None:
    moshi = Moshi()
    moshi.says("Hi")
    (event,) = moshi.event(EventName.RESUMED, detail="moved to another worker")
    assert isinstance(event, ev.ChorusEvent)
    assert (event.name, event.detail) == (EventName.RESUMED, "moved to another worker")
    assert moshi.carver.responding, "an event neither opens nor closes a response"


def test_a_context_rollover_reaches_the_client_as_a_chorus_event_with_its_data() -> None:
    moshi = Moshi()
    moshi.says("Hi")
    data = ContextRollover(kind="free_slot", frames=2910, primer_tokens=52, gap_frames=0)
    rollover = SessionEvent(session_id=SID, seq=moshi.seq + 1, name=EventName.CONTEXT_ROLLOVER, data=data)
    (event,) = moshi.carver.on_output(rollover, heard_ms=0)
    assert event.model_dump(exclude={"event_id"}) == {
        "type": "chorus.event",
        "name": "context_rollover",
        "detail": "",
        "data": {"kind": "free_slot", "frames": 2910, "primer_tokens": 52, "gap_frames": 0},
    }
    assert moshi.carver.responding, "the response in progress goes on"


def test_the_end_of_the_session_makes_no_event() -> None:
    moshi = Moshi()
    moshi.says("Hi")
    assert moshi.event(EventName.ENDED) == []
    assert moshi.carver.responding, "the caller finishes the response when the output ends"


def test_truncating_a_done_item_keeps_the_text_that_came_before_audio_end_ms() -> None:
    moshi = Moshi()
    moshi.says("Hello")  # at 0 ms of the item's audio
    moshi.sounds()
    moshi.sounds()  # 160 ms
    moshi.says(" there,")  # at 160 ms
    moshi.sounds()
    moshi.says(" friend")  # at 240 ms
    moshi.sounds()
    done = moshi.quiet(END_FRAMES)[-1]
    assert isinstance(done, ev.ResponseDone)
    item_id = done.response.output[0]["id"]
    assert done.response.output[0]["content"][0]["transcript"] == "Hello there, friend"
    (truncated,) = moshi.carver.truncate(item_id, 0, 200)
    assert isinstance(truncated, ev.ConversationItemTruncated) and truncated.audio_end_ms == 200
    item = moshi.carver.items.get(item_id)
    assert item.transcript == "Hello there,", "what was heard until 200 ms"
    assert item.wire()["content"][0]["transcript"] == "Hello there,"


def test_truncating_the_item_being_spoken_cancels_its_response() -> None:
    moshi = Moshi()
    created, _ = moshi.says("Hi")
    assert isinstance(created, ev.ResponseCreated)
    moshi.sounds()
    (piece,) = moshi.says(" you")  # at 80 ms
    moshi.sounds()
    item_id = piece.model_dump()["item_id"]
    *closing, truncated = moshi.carver.truncate(item_id, 0, 120)
    assert types(closing) == CLOSE and isinstance(closing[-1], ev.ResponseDone)
    assert closing[-1].response.status == "cancelled"
    assert closing[-1].response.output[0]["content"][0]["transcript"] == "Hi you"
    assert isinstance(truncated, ev.ConversationItemTruncated)
    assert moshi.carver.items.get(item_id).transcript == "Hi you", "both pieces came before 120 ms"
    assert moshi.sounds() == [], "the rest of the utterance is muted"


@pytest.mark.parametrize(
    ("content_index", "audio_end_ms", "code"),
    [(0, 10_000, "invalid_request"), (1, 0, "invalid_request")],
)
def test_a_truncation_past_the_items_audio_is_refused(
    content_index: int, audio_end_ms: int, code: str
) -> None:
    moshi = Moshi()
    moshi.says("Hi")
    moshi.sounds()
    done = moshi.quiet(END_FRAMES)[-1]
    assert isinstance(done, ev.ResponseDone)
    with pytest.raises(ChorusError) as refused:
        moshi.carver.truncate(done.response.output[0]["id"], content_index, audio_end_ms)
    assert refused.value.code == code
    with pytest.raises(ev.ItemNotFound):
        moshi.carver.truncate("item_nope", 0, 0)


@pytest.mark.parametrize(("content_index", "audio_end_ms"), [(1, 0), (0, 10_000)])
def test_a_refused_truncation_of_the_item_being_spoken_leaves_its_response_open(
    content_index: int, audio_end_ms: int
) -> None:
    moshi = Moshi()
    created, piece = moshi.says("Hi")
    assert isinstance(created, ev.ResponseCreated)
    moshi.sounds()
    item_id = piece.model_dump()["item_id"]
    with pytest.raises(ChorusError):
        moshi.carver.truncate(item_id, content_index, audio_end_ms)
    assert moshi.carver.response_id == created.response.id, "not cancelled without a response.done"
    assert types(moshi.sounds()) == ["response.output_audio.delta"], "its audio goes on"
    assert moshi.carver.items.get(item_id).status == "in_progress"
