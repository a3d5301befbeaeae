"""The router's per-session mixer: what reaches the client, one audio frame per dialogue tick.

A pure state machine: no I/O and no wall clock. Time is the dialogue clock: every new `DialogueFrame` is
one 80 ms tick, and the mixer answers it with exactly one `OutputAudio` (Moshi's native audio, a queued
cloned frame, or silence), preceded by the tick's text piece and any event. So tests drive it frame by
frame, faster than real time.

Policy (docs/architecture.md, "router"):
- text always flows: every non-empty text piece becomes an `OutputText`, whatever the audio source;
- voice `moshiko`/`moshika` or mode `native`: Moshi's audio;
- mode `cloned`: queued cloned frames (silence when none), Moshi muted; native only while the TTS is down;
- mode `auto`: cloned while the TTS keeps up: the oldest text piece no cloned audio has covered yet is at
  most `budget_frames` old; native otherwise;
- a switch to native happens on the tick it is known; a switch back to cloned waits for a cloned frame
  that starts a phrase, so no phrase is heard cut;
- barge-in: user speech starting while cloned audio is queued or owed drops it and asks for a TTS flush.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass, field

from shared.audio import silence_frame
from shared.messages import (
    AudioSource,
    ClonedAudio,
    DialogueFrame,
    DialogueMessage,
    EventData,
    EventName,
    LeanFrame,
    OutputAudio,
    OutputMessage,
    OutputText,
    PhraseDone,
    SessionEvent,
    SwitchReason,
    TtsMessage,
    VoiceChanged,
    VoiceMode,
    spoken_by_tts,
)


class DropReason(enum.StrEnum):
    QUEUE_FULL = "queue_full"
    BARGE_IN = "barge_in"
    SUPERSEDED = "superseded"  # cloned audio not played because native audio covered those words
    FLUSHED = "flushed"  # cloned audio of text flushed by a barge-in, still in flight
    DUPLICATE = "duplicate"


VoiceSwitch = tuple[AudioSource, SwitchReason]


@dataclass
class MixerOutput:
    """What one or more mixer calls produced, in order; the worker appends `messages` to `:out`."""

    messages: list[OutputMessage] = field(default_factory=list)
    flush_tts: bool = False
    switches: list[VoiceSwitch] = field(default_factory=list)
    dropped: Counter[DropReason] = field(default_factory=Counter)

    def merge(self, other: MixerOutput) -> MixerOutput:
        self.messages.extend(other.messages)
        self.flush_tts = self.flush_tts or other.flush_tts
        if other.switches:  # most merges carry messages only: the empty ones cost nothing
            self.switches.extend(other.switches)
        if other.dropped:
            self.dropped.update(other.dropped)
        return self


@dataclass
class _TextDebt:
    """A text piece Moshi said that no cloned audio has covered yet."""

    tick: int
    chars: str  # its letters and digits, lowercased: what a phrase's text is matched against
    seq: int  # the dialogue frame it came on: a finished phrase settles every debt up to its last


def _speakable(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


class Mixer:
    def __init__(
        self,
        session_id: str,
        voice: str = "moshiko",
        mode: VoiceMode = "auto",
        *,
        budget_frames: int = 19,
        queue_frames: int = 375,
        first_seq: int = 0,
    ) -> None:
        self.session_id = session_id
        self.voice = voice
        self.mode: VoiceMode = mode
        self._wants_tts = spoken_by_tts(voice, mode) is not None
        self.budget_frames = budget_frames
        self.queue_frames = queue_frames
        self.tick = 0
        self.source: AudioSource = "cloned" if self.wants_tts else "native"
        self.tts_present = True
        self.tts_failed = False
        self.user_speaking = False
        self.ended = False
        self._seq = first_seq
        self._last_dialogue_seq = -1
        self._last_cloned_seq = -1
        self._queue: deque[ClonedAudio] = deque()
        # Bounded like the queue: at most one text piece per tick is owed.
        self._debts: deque[_TextDebt] = deque(maxlen=queue_frames)
        self._native_reason = SwitchReason.VOICE_UPDATE
        self._flush_window_until: int | None = None  # after a barge-in: tick until which old audio is dropped
        self._out = MixerOutput()

    # --- state ---------------------------------------------------------------------------------

    @property
    def tts_up(self) -> bool:
        return self.tts_present and not self.tts_failed

    @property
    def queued_frames(self) -> int:
        return len(self._queue)

    @property
    def behind(self) -> bool:
        """The oldest text piece still waiting for cloned audio is older than the budget."""
        return bool(self._debts) and self.tick - self._debts[0].tick > self.budget_frames

    @property
    def next_seq(self) -> int:
        return self._seq

    @property
    def wants_tts(self) -> bool:
        """The TTS synthesises this session's words (a profile's or a catalog voice, mode not native).
        Known from the voice and mode, so worked out when they change, not on every tick."""
        return self._wants_tts

    # --- inputs --------------------------------------------------------------------------------

    def on_dialogue(self, message: DialogueMessage | LeanFrame) -> MixerOutput:
        if isinstance(message, SessionEvent):
            return self.on_dialogue_event(message)
        return self.on_frame(message)

    def on_frame(self, frame: DialogueFrame | LeanFrame) -> MixerOutput:
        """One dialogue tick: its text piece (if any) and exactly one audio frame. The frame comes as
        its model or, read on the router's lean path, as its fields: the same tick either way."""
        if frame.seq <= self._last_dialogue_seq:
            self._out.dropped[DropReason.DUPLICATE] += 1
            return self._take()
        self._last_dialogue_seq = frame.seq
        self.tick += 1
        if frame.text:
            self._emit(OutputText(session_id=self.session_id, seq=self._seq, text=frame.text))
            if self.wants_tts and self.tts_up and (chars := _speakable(frame.text)):
                self._debts.append(_TextDebt(self.tick, chars, frame.seq))
        self._settle_source()
        self._emit(
            OutputAudio(session_id=self.session_id, seq=self._seq, pcm=self._audio(frame), source=self.source)
        )
        return self._take()

    def on_dialogue_event(self, event: SessionEvent) -> MixerOutput:
        """Dialogue events (ready, resumed, error, no_capacity, ended...) go to the client unchanged."""
        if event.name == EventName.RESUMED:
            # A new dialogue worker may number its frames afresh: debts are settled by their frame's
            # number, so the old ones (text before the takeover) are let go.
            self._last_dialogue_seq = -1
            self._debts.clear()
        if event.name == EventName.ENDED:
            if self.ended:
                return self._take()
            self.ended = True
        self._event(event.name, event.detail, event.data)
        return self._take()

    def on_tts(self, message: TtsMessage) -> MixerOutput:
        if isinstance(message, SessionEvent):
            return self.on_tts_event(message)
        return self.on_cloned(message)

    def on_cloned(self, frame: ClonedAudio) -> MixerOutput:
        if frame.seq <= self._last_cloned_seq:
            self._out.dropped[DropReason.DUPLICATE] += 1
            return self._take()
        self._last_cloned_seq = frame.seq
        self.tts_failed = False  # it is producing audio again
        if not self.wants_tts:
            self._out.dropped[DropReason.SUPERSEDED] += 1
        elif self._in_flush_window(frame):
            self._out.dropped[DropReason.FLUSHED] += 1
        else:
            self._pay_debts(_speakable(frame.text))
            self._enqueue(frame)
        return self._take()

    def on_tts_event(self, event: SessionEvent) -> MixerOutput:
        if event.name in (EventName.ERROR, EventName.ENDED):
            self.tts_failed = True
        elif event.name in (EventName.READY, EventName.RESUMED):
            self.tts_failed = False
            if event.name == EventName.RESUMED:
                self._last_cloned_seq = -1
        elif event.name == EventName.FLUSH:
            # The TTS confirms the flush; its stream is in order, so what follows is fresh audio.
            self._flush_window_until = None
        elif isinstance(event.data, PhraseDone):
            self._settle_debts(event.data.dialogue_seq[1])
        return self._take()

    def on_user_speech(self, started: bool) -> MixerOutput:
        """An edge of user speech from the VAD; speech starting over queued cloned audio is a barge-in."""
        if started == self.user_speaking:
            return self._take()
        self.user_speaking = started
        self._event(EventName.SPEECH_STARTED if started else EventName.SPEECH_STOPPED)
        if started and (self._queue or self._debts):
            self._out.dropped[DropReason.BARGE_IN] += len(self._queue)
            self._queue.clear()
            self._debts.clear()
            self._out.flush_tts = True
            self._flush_window_until = self.tick + self.budget_frames
        return self._take()

    def set_voice(self, voice: str | None = None, mode: VoiceMode | None = None) -> MixerOutput:
        """A mid-session voice / voice mode change; the audio source settles on the next tick."""
        new_voice = voice is not None and voice != self.voice
        self.voice = voice or self.voice
        self.mode = mode or self.mode
        self._wants_tts = spoken_by_tts(self.voice, self.mode) is not None
        if new_voice or not self.wants_tts:
            self._out.dropped[DropReason.SUPERSEDED] += len(self._queue)
            self._queue.clear()
            self._debts.clear()
        if new_voice and self.source == "cloned" and self.wants_tts:
            # Same source, another profile: no switch, but the client is told its voice changed.
            self._event(
                EventName.VOICE_CHANGED,
                data=VoiceChanged(source="cloned", reason=SwitchReason.VOICE_UPDATE, voice=self.voice),
            )
        return self._take()

    def set_tts_available(self, available: bool) -> MixerOutput:
        """Whether a live TTS worker serves this session (from worker presence)."""
        self.tts_present = available
        return self._take()

    def end(self, reason: str = "") -> MixerOutput:
        """The session stops: an `ended` event, once."""
        if not self.ended:
            self.ended = True
            self._event(EventName.ENDED, reason)
        return self._take()

    # --- policy --------------------------------------------------------------------------------

    def _wanted(self) -> tuple[AudioSource, SwitchReason]:
        if not self.wants_tts:
            return "native", SwitchReason.VOICE_UPDATE
        if not self.tts_up:
            return "native", SwitchReason.TTS_DOWN
        if self.mode == "auto" and self.behind:
            return "native", SwitchReason.TTS_BEHIND
        if self._native_reason == SwitchReason.VOICE_UPDATE:
            return "cloned", SwitchReason.VOICE_UPDATE
        return "cloned", SwitchReason.TTS_RECOVERED

    def _settle_source(self) -> None:
        wanted, reason = self._wanted()
        if wanted == "native":
            # While native audio plays, cloned audio of the same words is never played later.
            if self._queue:  # a native tick with nothing queued counts nothing (not a zero every tick)
                self._out.dropped[DropReason.SUPERSEDED] += len(self._queue)
                self._queue.clear()
            if reason == SwitchReason.TTS_DOWN:
                self._debts.clear()  # a TTS that takes over starts from new text: old debts stay unpaid
            if self.source == "cloned":
                self._native_reason = reason
                self._switch("native", reason)
            return
        if self.source == "cloned":
            return
        if self.mode == "cloned" and reason == SwitchReason.VOICE_UPDATE:
            # Asked for the cloned voice only: Moshi is muted at once, cloned audio plays when it comes.
            self._switch("cloned", reason)
            return
        while self._queue and not self._queue[0].text:
            self._queue.popleft()
            self._out.dropped[DropReason.SUPERSEDED] += 1
        if self._queue:  # a phrase starts here: switch without cutting one
            self._switch("cloned", reason)

    def _switch(self, to: AudioSource, reason: SwitchReason) -> None:
        self.source = to
        self._out.switches.append((to, reason))
        self._event(EventName.VOICE_CHANGED, data=VoiceChanged(source=to, reason=reason, voice=self.voice))

    def _audio(self, frame: DialogueFrame | LeanFrame) -> bytes:
        if self.source == "native":
            return frame.pcm
        if self._queue:
            return self._queue.popleft().pcm
        return silence_frame()

    def _enqueue(self, frame: ClonedAudio) -> None:
        if len(self._queue) >= self.queue_frames:
            self._queue.popleft()
            self._out.dropped[DropReason.QUEUE_FULL] += 1
        self._queue.append(frame)

    def _pay_debts(self, chars: str) -> None:
        """A phrase's text covers the oldest owed text pieces, letter for letter."""
        remaining = len(chars)
        while remaining and self._debts:
            oldest = self._debts[0]
            if len(oldest.chars) > remaining:
                oldest.chars = oldest.chars[remaining:]
                return
            remaining -= len(oldest.chars)
            self._debts.popleft()

    def _settle_debts(self, last_seq: int) -> None:
        """A phrase is done: the TTS speaks in order, so the text of every dialogue frame up to its last is
        voiced or never will be (phrases its backlog dropped). Letters alone paid the oldest debts first,
        so a dropped phrase's letters stayed owed for good and `auto` never came back from native."""
        while self._debts and self._debts[0].seq <= last_seq:
            self._debts.popleft()

    def _in_flush_window(self, frame: ClonedAudio) -> bool:
        """After a barge-in, audio of flushed text may still be in flight: drop it until the TTS
        confirms the flush, a phrase about words said after the barge-in starts, or the budget passes."""
        if self._flush_window_until is None:
            return False
        owed = "".join(debt.chars for debt in self._debts)
        chars = _speakable(frame.text)
        if self.tick > self._flush_window_until or (chars and owed.startswith(chars)):
            self._flush_window_until = None
            return False
        return True

    # --- output --------------------------------------------------------------------------------

    def _emit(self, message: OutputMessage) -> None:
        self._out.messages.append(message)
        self._seq += 1

    def _event(self, name: str, detail: str = "", data: EventData | None = None) -> None:
        self._emit(SessionEvent.of(self.session_id, self._seq, name, detail, data))

    def _take(self) -> MixerOutput:
        out, self._out = self._out, MixerOutput()
        return out
