"""A realtime session's audio formats: what the client appends is decoded to the conversation's 24 kHz
PCM16, and Moshi's 24 kHz PCM16 is encoded as the client asked (`pcm16` 24 kHz, or G.711 μ-law /
A-law 8 kHz for telephony bridges, resampled with a stream resampler per direction so chunk edges do not
click). The codecs themselves are in shared/audio.py."""

from __future__ import annotations

from services.gateway.protocols.realtime_events import CODEC_RATES, AudioCodec
from shared.audio import (
    SAMPLE_RATE,
    StreamResampler,
    float_to_pcm16,
    g711_decode,
    g711_encode,
    pcm16_to_float,
)
from shared.errors import InvalidRequest


class RealtimeAudio:
    def __init__(self) -> None:
        self.input: AudioCodec = "pcm16"
        self.output: AudioCodec = "pcm16"
        self._upsample: StreamResampler | None = None
        self._downsample: StreamResampler | None = None

    def set_formats(self, input_codec: AudioCodec | None, output_codec: AudioCodec | None) -> None:
        if input_codec is not None and input_codec != self.input:
            self.input, self._upsample = input_codec, None
        if output_codec is not None and output_codec != self.output:
            self.output, self._downsample = output_codec, None

    def end_output(self) -> None:
        """A response ended: what the resampler holds of it is not carried into the next one."""
        self._downsample = None

    def input_seconds(self, data: bytes) -> float:
        """How much audio `data` holds in the input format (what the socket's audio pace counts)."""
        sample_bytes = 2 if self.input == "pcm16" else 1
        return len(data) / (sample_bytes * CODEC_RATES[self.input])

    def decode_input(self, data: bytes) -> bytes:
        """What the client appended, as the conversation's 24 kHz PCM16 (PCM16 is that already)."""
        if self.input == "pcm16":
            if len(data) % 2:
                raise InvalidRequest("audio must be PCM16: an even number of bytes")
            return data
        if self._upsample is None:
            self._upsample = StreamResampler(CODEC_RATES[self.input], SAMPLE_RATE)
        return float_to_pcm16(self._upsample.push(pcm16_to_float(g711_decode(data, self.input))))

    def encode_output(self, pcm: bytes) -> bytes:
        """Moshi's 24 kHz PCM16 in the client's output format (empty while the resampler fills)."""
        if self.output == "pcm16":
            return pcm
        if self._downsample is None:
            self._downsample = StreamResampler(SAMPLE_RATE, CODEC_RATES[self.output])
        return g711_encode(float_to_pcm16(self._downsample.push(pcm16_to_float(pcm))), self.output)
