"""Names `vulture` (the dead-code check of `make lint`) cannot see used, each with who uses it.

Vulture reads shared/, services/, chorus/ and bench/ but not tests/: code that only tests call counts as
dead. Routes, exception handlers and pydantic validators are skipped by their decorators
(pyproject.toml, [tool.vulture]). Add a name here only with the reason it is not dead.
"""

import logging
import weakref

import av
import onnxruntime
import uvicorn
from moshi.modules.streaming import State
from moshi.modules.transformer import _MHAState
from tokenizers import Tokenizer
from websockets.server import ServerProtocol

from chorus.devtools import compose
from services.dialogue.sampling import RowSampledLMGen
from services.gateway.adapters import AdapterOut
from services.gateway.client_secrets import ExpiresAfter
from services.gateway.fair_websocket import FairWebSocketProtocol
from services.gateway.http_protocol import BoundedHttpProtocol
from services.gateway.problems import ProblemJSONResponse
from services.gateway.protocols import realtime_events
from services.gateway.protocols.response_carver import ResponseCarver
from services.gateway.sessions import TranscriptExport
from services.gateway.voices import VoiceList
from services.router.mixer import Mixer
from services.tts.voice_states import VoiceStates
from shared.adapter_store import AdapterRecord
from shared.bus import Handled
from shared.logging import JsonFormatter
from shared.messages import Flushed
from shared.ownership import TakeOutcome
from shared.runtime import EmbeddedUvicorn
from shared.sessions import SessionInfo

# Called by the libraries they subclass or configure.
ProblemJSONResponse.media_type  # starlette's Response reads the class's media type
FairWebSocketProtocol.handle_parser_exception  # uvicorn's websockets-sansio protocol calls it
FairWebSocketProtocol.handshake_complete  # read by uvicorn's protocol
FairWebSocketProtocol.close_timer  # cancelled by uvicorn's protocol when the connection closes
BoundedHttpProtocol.send_400_response  # uvicorn's httptools protocol calls it on a parser error
BoundedHttpProtocol.on_chunk_header  # httptools' parser calls it (a chunked body's next chunk)
BoundedHttpProtocol.on_chunk_complete  # httptools' parser calls it
BoundedHttpProtocol.timeout_keep_alive_task  # cancelled by uvicorn's protocol on the next bytes or the close
BoundedHttpProtocol.server_state.total_requests  # uvicorn counts answered requests (limit_max_requests)
uvicorn.protocols.http.httptools_impl.RequestResponseCycle.disconnected  # its send and receive read it
EmbeddedUvicorn.capture_signals  # uvicorn.Server.serve enters it
uvicorn.Server.should_exit  # uvicorn's main loop polls it
JsonFormatter.formatTime  # logging.Formatter calls it for asctime
JsonFormatter.process_log_record  # python-json-logger calls it before serialising
logging.Formatter.datefmt  # the name of formatTime's parameter, which is logging.Formatter's
weakref.finalize.atexit  # read by weakref's exit hook (shared/audio.py LibopusEncoder)
onnxruntime.SessionOptions.intra_op_num_threads  # read by onnxruntime when the session is made
onnxruntime.SessionOptions.inter_op_num_threads
Tokenizer.pre_tokenizer  # read by the tokenizers library
State.__class__  # services/dialogue/batcher.py: a moshi state's class swapped for its in-place subclass
RowSampledLMGen.depformer_step  # moshi's LMGen graphs and calls it for the audio codebooks
_MHAState.offset_cpu  # services/dialogue/quantized.py advances it as moshi's attention does; moshi reads it

# Wire fields: serialised to clients or validated on what they send, never read by name.
ExpiresAfter.anchor
VoiceList.voice_kinds  # GET /v1/voices: which voice kinds a session can use now
TranscriptExport.end_reason
realtime_events.SessionConfig.output_audio_format  # the beta shape: accepted, type-checked, unused
realtime_events.SessionConfig.temperature
realtime_events.SessionObject.output_modalities
realtime_events.ResponseObject.output_modalities
realtime_events.ResponseObject.conversation_id
realtime_events._ContentEvent.output_index
realtime_events._ContentEvent.content_index
realtime_events.OutputAudioDelta.delta
realtime_events.OutputAudioTranscriptDelta.delta
realtime_events.InputAudioBufferCommitted.previous_item_id  # wire fields of server events
realtime_events.ConversationItemAdded.previous_item_id
realtime_events.RateLimit.reset_seconds
realtime_events.SpeechStarted.audio_start_ms
realtime_events.SpeechStopped.audio_end_ms
realtime_events.ErrorDetail.param  # the OpenAI error shape's field, sent as null
AdapterRecord.size_bytes  # /v1/adapters shows it; stored in adapter.json
AdapterOut.size_bytes

# Made from a value the Redis script returns (`TakeOutcome(result)`).
TakeOutcome.OWNED

# Dev tools the test harnesses call (chorus/devtools is shared by `chorus`, the tests and the benchmarks).
compose.service_environment  # tests/support/compose.py

# Read only by tests, kept as the observable state their specifications assert (not test plumbing):
ResponseCarver.responding  # tests/services/gateway/test_response_carver.py: whether a response is open
Mixer.queued_frames  # tests/services/router/test_mixer.py: the queue the mixer bounds, frame by frame
VoiceStates.computed  # tests/services/tts: a state is computed once per profile (the metric is global)

# Session hash and event payload fields: written by one service, read by clients or operators by name.
Handled.DONE  # the outcome a handler returning None stands for (spelled out where a handler says it)
Flushed.dropped_phrases  # the `flush` event's payload, forwarded to clients
Flushed.dropped_words
SessionInfo.updated_at  # parsed from the hash; shown by operators' tools

# PyAV's codec and frame properties, set for libopus (bench/bench_opus.py PyAVEncoder): read by PyAV, in C.
av.AudioCodecContext.layout
av.AudioCodecContext.bit_rate
av.AudioFrame.pts

# websockets' server protocol reads it when it answers the handshake (services/gateway/fair_websocket.py).
ServerProtocol.available_extensions
