// Chorus browser client: microphone -> /v1/realtime (PCM16 24 kHz, base64) -> speaker + live transcript.
// No build step: plain ES module. State is exposed on window.chorus for the headless browser test.
// The API key (pasted once, kept in this browser's localStorage) only ever travels in an Authorization
// header: each conversation opens its WebSocket with a one-use client secret minted for it, since a
// browser's WebSocket cannot send headers and a URL ends up in histories and proxies' logs.
const RATE = 24000;
const FRAME = 1920; // 80 ms
const $ = (id) => document.getElementById(id);
const state = { status: "idle", sessionId: null, transcript: "", audioDeltas: 0, sentFrames: 0, events: [], errors: [] };
window.chorus = state;

function apiKey() { return $("apiKey").value.trim(); }
function authHeaders() { return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {}; }
function setStatus(text) { state.status = text; $("status").textContent = text; }
function logEvent(text) {
  state.events.push(text);
  const line = document.createElement("div");
  line.textContent = text;
  $("events").prepend(line);
}

// A one-use secret for one WebSocket (POST /v1/realtime/client_secrets, OpenAI's shape). No voice: the
// persona's (the secret names no model either: one would decide the voice).
async function clientSecret(voice) {
  const session = voice ? { type: "realtime", audio: { output: { voice } } } : { type: "realtime" };
  const response = await fetch("/v1/realtime/client_secrets", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ session }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail ?? `HTTP ${response.status}`);
  return body.value;
}

async function fetchJson(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) return null;
  return response.json();
}

async function loadPickers() {
  const personas = (await fetchJson("/v1/personas")) ?? { items: [{ id: "default", name: "Default" }] };
  const voices = (await fetchJson("/v1/voices")) ?? { items: [] };
  const personaItems = personas.items ?? personas;
  $("persona").replaceChildren(...personaItems.map((p) => new Option(p.name ?? p.id, p.id)));
  const voiceOptions = [new Option("The persona's voice", ""), new Option("Moshiko (native)", "moshiko"),
    new Option("Moshika (native)", "moshika")];
  for (const v of voices.items ?? voices) voiceOptions.push(new Option(`${v.name} (cloned)`, `profile:${v.id}`));
  for (const v of voices.catalog ?? []) voiceOptions.push(new Option(`${v.name} (catalog, ${v.language})`, v.voice));
  $("voice").replaceChildren(...voiceOptions);
  showVoiceKinds(voices.voice_kinds ?? ["native"]);
}

// Which voice kinds work now (GET /v1/voices, from the TTS workers): without the gated cloning weights,
// uploads are refused, so the page says so before anyone records a clip.
function showVoiceKinds(kinds) {
  state.voiceKinds = kinds;
  const cloning = kinds.includes("cloned");
  $("voiceKinds").textContent = `Voices available now: ${kinds.join(", ")}.` + (cloning ? "" :
    " Cloning is off: the TTS workers lack Pocket TTS's voice-cloning weights (see docs/voices.md).");
  $("upload").disabled = !cloning;
}

function toBase64(int16) {
  const bytes = new Uint8Array(int16.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

function fromBase64(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Int16Array(bytes.buffer);
}

// Captures the microphone in 80 ms PCM16 frames inside an AudioWorklet (off the main thread).
const workletSource = `
class Capture extends AudioWorkletProcessor {
  constructor() { super(); this.buffer = new Float32Array(${FRAME}); this.filled = 0; }
  process(inputs) {
    const input = inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      this.buffer[this.filled++] = input[i];
      if (this.filled === ${FRAME}) {
        const pcm = new Int16Array(${FRAME});
        for (let j = 0; j < ${FRAME}; j++) pcm[j] = Math.max(-32768, Math.min(32767, Math.round(this.buffer[j] * 32768)));
        this.port.postMessage(pcm, [pcm.buffer]);
        this.filled = 0;
      }
    }
    return true;
  }
}
registerProcessor("chorus-capture", Capture);`;

let socket = null, context = null, stream = null, playhead = 0;

function play(int16) {
  const buffer = context.createBuffer(1, int16.length, RATE);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < int16.length; i++) channel[i] = int16[i] / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  playhead = Math.max(playhead, context.currentTime + 0.05);
  source.start(playhead);
  playhead += buffer.duration;
}

function onServerEvent(event) {
  switch (event.type) {
    case "session.created": state.sessionId = event.session.id; logEvent(`session ${event.session.id}`); break;
    case "response.output_audio.delta": state.audioDeltas++; play(fromBase64(event.delta)); break;
    case "response.output_audio_transcript.delta":
      state.transcript += event.delta; $("transcript").textContent = state.transcript; break;
    case "response.created": setStatus("Chorus is speaking…"); break;
    case "response.done": setStatus("Listening…"); break;
    case "error": state.errors.push(event.error.message); logEvent(`error: ${event.error.message}`); break;
    default: logEvent(event.type + (event.name ? ` ${event.name}` : ""));
  }
}

async function start() {
  $("start").disabled = true;
  setStatus("Starting microphone…");
  context = new AudioContext({ sampleRate: RATE });
  stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  const url = URL.createObjectURL(new Blob([workletSource], { type: "application/javascript" }));
  await context.audioWorklet.addModule(url);
  const capture = new AudioWorkletNode(context, "chorus-capture");
  context.createMediaStreamSource(stream).connect(capture);

  const voice = $("voice").value;  // "": the persona's
  const secret = await clientSecret(voice);
  const query = new URLSearchParams({ persona: $("persona").value, client_secret: secret });
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/v1/realtime?${query}`);
  socket.onopen = () => {
    const input = { format: { type: "audio/pcm", rate: RATE } };
    const audio = voice ? { input, output: { voice } } : { input };
    socket.send(JSON.stringify({ type: "session.update", session: { type: "realtime", audio } }));
    setStatus("Listening…");
    $("stop").disabled = false;
  };
  socket.onmessage = (message) => onServerEvent(JSON.parse(message.data));
  socket.onclose = () => { setStatus("Closed."); cleanup(); };
  capture.port.onmessage = (message) => {
    if (socket?.readyState !== WebSocket.OPEN) return;
    socket.send(JSON.stringify({ type: "input_audio_buffer.append", audio: toBase64(message.data) }));
    state.sentFrames++;
  };
}

function cleanup() {
  stream?.getTracks().forEach((t) => t.stop());
  context?.close();
  stream = context = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

function stop() { socket?.close(); cleanup(); }

async function upload() {
  const file = $("clip").files[0];
  if (!file) { $("uploadStatus").textContent = "Pick a file first."; return; }
  const form = new FormData();
  form.append("file", file);
  form.append("name", $("clipName").value || file.name);
  form.append("consent", $("consent").checked ? "true" : "false");
  const response = await fetch("/v1/voices", { method: "POST", body: form, headers: authHeaders() });
  const body = await response.json();
  $("uploadStatus").textContent = response.ok ? `Added voice ${body.name} (${body.id}).` : `Refused: ${body.detail}`;
  if (response.ok) await loadPickers();
}

$("start").onclick = () => start().catch((e) => { state.errors.push(String(e)); setStatus(`Failed: ${e}`); cleanup(); });
$("stop").onclick = stop;
$("upload").onclick = upload;
$("apiKey").value = localStorage.getItem("chorus.apiKey") ?? "";
$("apiKey").onchange = () => { localStorage.setItem("chorus.apiKey", apiKey()); loadPickers(); };
loadPickers().then(() => { state.ready = true; });
