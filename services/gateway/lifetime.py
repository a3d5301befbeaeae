"""A session's lifetime policies, as the gateway enforces them: a maximum length and an idle timeout.

The gateway enforces both because it owns the socket and the session's lease: ending the session is its
`Conversation.stop`, whatever the reason. The maximum length is wall-clock time from the session's
`ready` (the wait for a slot and the priming do not count: the user gets all of it).
Idleness is "no user speech": the router's speech detector already turns the user's audio into
`speech_started` / `speech_stopped` events on `:out`, so the gateway counts the output frames (one per
80 ms dialogue tick) since the user last stopped speaking, and none while they speak. Time in frames, not
the wall clock: a session whose pipeline stalls (a failover) is not idle meanwhile, and the tests play it
frame by frame. A frame counts once the next one has come with no speech edge between them: the router
writes a natively voiced session's tick before it has scored that round's user audio, so the edge of the
tick the user started speaking on follows its audio (in the same round, a script call later). Counted on
arrival, that tick could end the session for idleness while the user speaks; the timeout comes one frame
(80 ms) later instead.

A router taken over mid-utterance starts its detector afresh and may never send that utterance's
`speech_stopped`: the session is then not idle until the user speaks again (the maximum length holds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.audio import FRAME_SEC
from shared.errors import IdleTimeout, LifetimeReached, SessionExpired
from shared.messages import EventName, OutputAudio, OutputMessage, SessionEvent


@dataclass
class Lifetime:
    """`max_s` and `idle_s` are the policies (0 = off); `observe` each output message, and `reached`
    says whether one of them ends the session now."""

    max_s: float = 0.0
    idle_s: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    speaking: bool = False
    quiet_frames: int = 0  # output frames since the user last spoke (or since the session's output began)
    latest_unsettled: bool = False  # the latest quiet frame, not counted until the next one comes

    def observe(self, message: OutputMessage) -> None:
        if isinstance(message, SessionEvent) and message.name in (
            EventName.SPEECH_STARTED,
            EventName.SPEECH_STOPPED,
        ):
            self.speaking = message.name == EventName.SPEECH_STARTED
            self.quiet_frames = 0
            self.latest_unsettled = False
        elif isinstance(message, OutputAudio) and not self.speaking:
            if self.latest_unsettled:
                self.quiet_frames += 1
            self.latest_unsettled = True

    @property
    def quiet_ms(self) -> int:
        return round(self.quiet_frames * FRAME_SEC * 1000)

    def reached(self, now: float) -> LifetimeReached | None:
        """The policy that ends the session at `now` (monotonic), as the error the client is told."""
        if self.max_s and now - self.started_at >= self.max_s:
            return SessionExpired(
                f"the session reached its maximum length of {_duration(self.max_s)}; start a new session "
                "to go on"
            )
        if self.idle_s and self.quiet_frames * FRAME_SEC >= self.idle_s:
            return IdleTimeout(f"no speech from the user for {_duration(self.idle_s)}; the session ended")
        return None


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute" + ("s" if minutes != 1 else "")
    return f"{seconds:g} s"
