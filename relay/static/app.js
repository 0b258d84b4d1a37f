// relay's web client: the reference client for the relay's public interface, and a page to talk to the model.
//
// It uses only what any client may use: POST {BASE}/v1/realtime/calls with an SDP offer (OpenAI's WebRTC
// interface), the `oai-events` data channel for the Realtime API's JSON events, and, when the server has it,
// GET {BASE}/relay/client-config for ICE servers, the session fields the operator locked, and token prices.
// No build step, no library.
"use strict";

// Where the relay is: this page's own origin, or ?base=https://relay.example.org
const BASE = new URLSearchParams(location.search).get("base") || "";
const DEFAULT_CONFIG = { ice_servers: [], locked: [], prices: {} };
const HANGUP_WAIT_MS = 1000;
// Sent by the relay when the model service is gone for good (a refused key, reconnection attempts spent): the call ends.
const CALL_ENDING_ERRORS = new Set(["upstream_closed", "upstream_unavailable", "upstream_refused"]);
const QUIET_ERRORS = new Set([
  "response_cancel_not_active", // Interrupt always cancels; a reply already fully generated makes this harmless
  "input_audio_buffer_commit_empty", // Reply now after the VAD already committed the turn: the reply still comes
]);

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"), connect: $("connect"), disconnect: $("disconnect"), mute: $("mute"), reply: $("reply"),
  interrupt: $("interrupt"), pttBox: $("ptt-box"), ptt: $("ptt"), meterIn: $("meter-in"), meterOut: $("meter-out"),
  audio: $("remote-audio"), error: $("error"), settings: $("settings"), apply: $("apply"),
  instructions: $("instructions"), voice: $("voice"), turn: $("turn"), vadFields: $("vad-fields"),
  threshold: $("threshold"), thresholdValue: $("threshold-value"), prefix: $("prefix"), silence: $("silence"),
  transcription: $("transcription"), transcript: $("transcript"), latencyChart: $("latency-chart"),
  latencyList: $("latency-list"), usageIn: $("usage-in"), usageOut: $("usage-out"), usageCost: $("usage-cost"),
};

// The page's state. Exposed as window.relayApp for tests and curious developers.
const app = {
  config: DEFAULT_CONFIG,
  call: null, // the current Call, or null
  state: "idle",
  muted: false,
  mode: "server_vad", // the turn detection last sent (not the dropdown's unapplied value)
  transcribing: true,
  hold: null, // push-to-talk hold in progress: {source: "key"} or {source: "pointer", id}
  speechStoppedAt: null, // when the user's last turn ended, waiting for the answer's first sound
  latencies: [],
  usage: { input: 0, output: 0, cost: 0 },
  entries: new Map(), // conversation item id -> transcript entry
  heard: new Map(), // item id -> {audio_end_ms, audio_received_ms} from the relay, for items cut by a barge-in
  events: [], // every event received, newest last (capped)
  audioContext: null,
  get pc() { return this.call && this.call.pc; },
};
window.relayApp = app;

// --- state --------------------------------------------------------------------------------------------------------

const STATE_TEXT = {
  idle: "Not connected", connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…",
  ended: "Call ended", error: "Error",
};

function setState(state, reason = "") {
  const wasLive = app.state === "connected" || app.state === "reconnecting";
  app.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = STATE_TEXT[state];
  showError(state === "error" ? reason : "");
  const live = state === "connected" || state === "reconnecting";
  ui.connect.disabled = state === "connecting" || live;
  ui.disconnect.disabled = !(state === "connecting" || live);
  for (const button of [ui.mute, ui.reply, ui.interrupt, ui.apply]) button.disabled = !live;
  syncMic();
  applyLocks();
  // Keep keyboard focus on a usable button when the one focused becomes disabled.
  if (state === "connected" && !wasLive && document.activeElement === document.body) ui.disconnect.focus();
  if ((state === "ended" || state === "error") && (document.activeElement === document.body || document.activeElement.disabled)) ui.connect.focus();
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

// --- one call -------------------------------------------------------------------------------------------------------

class Cancelled extends Error {}

// One connection attempt and, if it succeeds, the call. Everything it opens (microphone, peer connection, meters)
// it closes itself; its callbacks do nothing once it is no longer the current call.
class Call {
  constructor() {
    this.pc = null; this.channel = null; this.mic = null; this.callId = null;
    this.closed = false; this.hangingUp = false; this.meters = [];
  }

  current() { return app.call === this && !this.closed; }

  check() { if (!this.current()) throw new Cancelled(); }

  async start() {
    app.config = await loadConfig();
    this.check();
    applyLocks();
    this.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    this.check();
    const pc = (this.pc = new RTCPeerConnection({ iceServers: app.config.ice_servers || [] }));
    pc.addTrack(this.mic.getAudioTracks()[0], this.mic);
    pc.ontrack = (event) => {
      if (!this.current()) return;
      ui.audio.srcObject = event.streams[0] || new MediaStream([event.track]);
      this.meters.push(watchLevel(ui.audio.srcObject, ui.meterOut));
    };
    pc.onconnectionstatechange = () => this.onConnectionState();
    const channel = (this.channel = pc.createDataChannel("oai-events"));
    channel.onopen = () => {
      if (!this.current()) return;
      setState("connected");
      sendSessionUpdate();
    };
    channel.onmessage = (message) => { if (this.current()) onMessage(message.data); };
    channel.onclose = () => { if (this.current() && !this.hangingUp) lose("the connection to the relay was lost"); };
    this.meters.push(watchLevel(this.mic, ui.meterIn));
    syncMic();

    await pc.setLocalDescription(await pc.createOffer()); // no need to wait for ICE: the relay learns from checks
    this.check();
    const response = await fetch(`${BASE}/v1/realtime/calls`, {
      method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" },
    });
    if (response.ok) this.callId = (response.headers.get("Location") || "").split("/").pop() || null;
    if (!this.current()) { this.hangUp(); throw new Cancelled(); } // the user gave up while we waited
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `the relay answered ${response.status}`);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  }

  onConnectionState() {
    if (!this.current()) return;
    const state = this.pc.connectionState;
    if (state === "disconnected" && app.state === "connected") setState("reconnecting");
    if (state === "connected" && app.state === "reconnecting") setState("connected");
    if (state === "failed" || (state === "closed" && !this.hangingUp)) lose("the connection to the relay was lost");
  }

  async hangUp() {
    this.hangingUp = true;
    this.stopLocal(); // the microphone goes off the moment the user hangs up
    if (this.callId) {
      // Tell the relay first (briefly), so it ends the call itself rather than noticing the peer leave.
      const done = fetch(`${BASE}/v1/realtime/calls/${this.callId}/hangup`, { method: "POST" }).catch(() => {});
      await Promise.race([done, new Promise((resolve) => setTimeout(resolve, HANGUP_WAIT_MS))]);
    }
    this.close();
  }

  stopLocal() {
    if (this.mic) this.mic.getTracks().forEach((track) => track.stop());
    for (const stop of this.meters) stop();
    this.meters = [];
  }

  close() {
    this.closed = true;
    this.stopLocal();
    if (this.pc) this.pc.close();
  }
}

async function loadConfig() {
  try {
    const response = await fetch(`${BASE}/relay/client-config`);
    if (!response.ok) return DEFAULT_CONFIG;
    return { ...DEFAULT_CONFIG, ...(await response.json()) };
  } catch {
    return DEFAULT_CONFIG; // not a relay (e.g. OpenAI itself): defaults, no locks
  }
}

async function connect() {
  if (app.call) return;
  resumeAudio();
  const call = (app.call = new Call());
  setState("connecting");
  try {
    await call.start();
  } catch (error) {
    if (error instanceof Cancelled || app.call !== call) return;
    app.call = null;
    call.close();
    resetTurn();
    setState("error", error.message || String(error));
  }
}

function disconnect() {
  const call = app.call;
  if (!call) return;
  app.call = null;
  resetTurn();
  setState("ended");
  call.hangUp();
  ui.audio.srcObject = null;
}

function lose(reason) {
  const call = app.call;
  app.call = null;
  resetTurn();
  if (call) call.close();
  ui.audio.srcObject = null;
  setState("error", reason);
}

function resetTurn() {
  if (app.hold) endHold(false);
  app.speechStoppedAt = null;
}

// --- sending events ---------------------------------------------------------------------------------------------

function send(event) {
  const channel = app.call && app.call.channel;
  if (channel && channel.readyState === "open") channel.send(JSON.stringify(event));
}

function turnDetection() {
  switch (ui.turn.value) {
    case "server_vad":
      return { type: "server_vad", threshold: Number(ui.threshold.value),
               prefix_padding_ms: Number(ui.prefix.value), silence_duration_ms: Number(ui.silence.value) };
    case "semantic_vad":
      return { type: "semantic_vad" };
    default:
      return null; // push to talk: the client decides when a turn ends
  }
}

function sendSessionUpdate() {
  const locked = new Set(app.config.locked || []);
  const session = { type: "realtime", audio: { input: {}, output: {} } };
  if (!locked.has("instructions")) session.instructions = ui.instructions.value;
  if (!locked.has("voice")) session.audio.output.voice = ui.voice.value;
  if (!locked.has("turn_detection")) {
    session.audio.input.turn_detection = turnDetection();
    app.mode = ui.turn.value;
  }
  if (!locked.has("transcription")) {
    session.audio.input.transcription = ui.transcription.checked ? { model: "gpt-4o-mini-transcribe" } : null;
  }
  send({ type: "session.update", session });
  syncMic();
}

// The session as the server has it (session.created / session.updated): the controls show what is in force.
function reflectSession(session) {
  if (!session) return;
  if (typeof session.instructions === "string") ui.instructions.value = session.instructions;
  const audio = session.audio || {};
  const input = audio.input || {};
  const output = audio.output || {};
  if (typeof output.voice === "string" && [...ui.voice.options].some((o) => o.value === output.voice)) {
    ui.voice.value = output.voice;
  }
  if ("turn_detection" in input) {
    const td = input.turn_detection;
    app.mode = td ? td.type : "push_to_talk";
    ui.turn.value = app.mode;
    if (td && td.type === "server_vad") {
      if (typeof td.threshold === "number") { ui.threshold.value = td.threshold; ui.thresholdValue.textContent = td.threshold; }
      if (typeof td.prefix_padding_ms === "number") ui.prefix.value = td.prefix_padding_ms;
      if (typeof td.silence_duration_ms === "number") ui.silence.value = td.silence_duration_ms;
    }
  }
  if ("transcription" in input) {
    app.transcribing = Boolean(input.transcription);
    ui.transcription.checked = app.transcribing;
  }
  syncMic();
  applyLocks();
}

// --- the controls -------------------------------------------------------------------------------------------------

function pushToTalk() {
  return app.mode === "push_to_talk";
}

function syncMic() {
  const live = app.state === "connected" || app.state === "reconnecting";
  ui.pttBox.hidden = !pushToTalk();
  ui.ptt.disabled = !live || app.muted;
  ui.ptt.setAttribute("aria-pressed", String(Boolean(app.hold)));
  ui.ptt.classList.toggle("held", Boolean(app.hold));
  const mic = app.call && app.call.mic;
  const track = mic && mic.getAudioTracks()[0];
  if (track) track.enabled = !app.muted && (!pushToTalk() || Boolean(app.hold));
}

function toggleMute() {
  app.muted = !app.muted;
  ui.mute.setAttribute("aria-pressed", String(app.muted));
  if (app.muted && app.hold) endHold(false);
  syncMic();
}

function replyNow() {
  app.speechStoppedAt = performance.now();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

function interrupt() {
  send({ type: "response.cancel" });
  send({ type: "output_audio_buffer.clear" });
}

function startHold(source) {
  if (app.hold || ui.ptt.disabled || !pushToTalk()) return;
  app.hold = source;
  interrupt(); // talking over the model stops it, as a voice would
  send({ type: "input_audio_buffer.clear" }); // only what is said while held counts
  syncMic();
}

// Release: `send` true asks for the reply; false drops the turn (the page lost focus mid-hold, or muted).
function endHold(sendTurn = true) {
  if (!app.hold) return;
  app.hold = null;
  syncMic();
  if (sendTurn) replyNow();
  else send({ type: "input_audio_buffer.clear" });
}

function pttTarget(target) {
  return target === document.body || target === ui.ptt;
}

function applyLocks() {
  const locked = new Set(app.config.locked || []);
  const controls = { instructions: [ui.instructions], voice: [ui.voice], turn_detection: [ui.turn],
                     transcription: [ui.transcription] };
  for (const [field, elements] of Object.entries(controls)) {
    for (const element of elements) element.disabled = locked.has(field);
    const note = document.querySelector(`.locked-note[data-for="${field}"]`);
    note.hidden = !locked.has(field);
    note.textContent = locked.has(field) ? "Set by the operator of this relay: it cannot be changed here." : "";
  }
  ui.vadFields.disabled = locked.has("turn_detection") || ui.turn.value !== "server_vad";
}

// --- events from the relay ----------------------------------------------------------------------------------------

function onMessage(text) {
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    return;
  }
  app.events.push(event);
  if (app.events.length > 2000) app.events.shift();
  const handler = HANDLERS[event.type];
  if (handler) handler(event);
}

const HANDLERS = {
  "session.created": (e) => reflectSession(e.session),
  "session.updated": (e) => reflectSession(e.session),
  "input_audio_buffer.speech_stopped": () => { app.speechStoppedAt = performance.now(); },
  "conversation.item.added": (e) => {
    const item = e.item || {};
    if (item.type !== "message" || (item.role !== "user" && item.role !== "assistant")) return;
    const entry = transcriptEntry(item.id, item.role);
    const text = (item.content || []).map((part) => part.text || part.transcript || "").join("");
    if (text) setText(entry, text);
  },
  "conversation.item.done": (e) => {
    const item = e.item || {};
    const audio = (item.content || []).find((part) => part.type === "input_audio");
    if (item.role === "user" && audio && !app.transcribing) setText(transcriptEntry(item.id, "user"), "(speech, not transcribed)");
  },
  "conversation.item.input_audio_transcription.delta": (e) => {
    const entry = transcriptEntry(e.item_id, "user");
    if (entry.pending) { entry.pending = false; setText(entry, ""); }
    addText(entry, e.delta || "");
  },
  "conversation.item.input_audio_transcription.completed": (e) => setText(transcriptEntry(e.item_id, "user"), e.transcript),
  "conversation.item.input_audio_transcription.failed": (e) => {
    setText(transcriptEntry(e.item_id, "user"), `(transcription failed${e.error && e.error.message ? `: ${e.error.message}` : ""})`);
  },
  "response.output_audio_transcript.delta": (e) => addAssistantText(e.item_id, e.delta),
  "response.output_text.delta": (e) => addAssistantText(e.item_id, e.delta),
  "output_audio_buffer.started": () => {
    if (app.speechStoppedAt === null) return;
    recordLatency(performance.now() - app.speechStoppedAt);
    app.speechStoppedAt = null;
  },
  "relay.item.truncated": (e) => app.heard.set(e.item_id, e),
  "conversation.item.truncated": (e) => showCut(e.item_id, e.audio_end_ms),
  "conversation.item.deleted": (e) => showCut(e.item_id, 0),
  "response.done": (e) => addUsage((e.response || {}).usage),
  "error": (e) => {
    const error = e.error || {};
    if (CALL_ENDING_ERRORS.has(error.code)) lose(error.message || "the model service closed the call");
    else if (!QUIET_ERRORS.has(error.code)) note(`${error.code || "error"}: ${error.message || ""}`);
  },
  "relay.upstream.reconnecting": () => setState("reconnecting"),
  "relay.upstream.reconnected": () => setState("connected"),
  // Settings the operator fixed stayed as they were; the rest of the update was applied.
  "relay.policy.fields_kept": (e) => note(e.message || "Some settings are fixed by the operator of this relay."),
};

// --- the transcript -----------------------------------------------------------------------------------------------

function transcriptEntry(itemId, role) {
  let entry = app.entries.get(itemId);
  if (!entry) {
    const element = document.createElement("li");
    element.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = role === "user" ? "…" : "";
    element.append(who, text);
    entry = { element, text, pending: role === "user", cut: false };
    app.entries.set(itemId, entry);
    append(element);
  }
  return entry;
}

function setText(entry, text) {
  entry.pending = false;
  entry.text.textContent = text;
}

function addText(entry, delta) {
  const atBottom = isAtBottom();
  entry.text.append(delta);
  if (atBottom) scrollToBottom();
}

function addAssistantText(itemId, delta) {
  const entry = transcriptEntry(itemId, "assistant");
  if (!entry.cut) addText(entry, delta || ""); // after a cut, the struck text stays as it was
}

// A reply cut by a barge-in: strike what the user never heard. The relay says what share of the audio it had was
// heard (relay.item.truncated); the transcript received so far is cut at that share, at a word boundary.
// Without that (another server), the whole reply is marked as interrupted.
function showCut(itemId, audioEndMs) {
  const entry = app.entries.get(itemId);
  if (!entry || entry.cut) return;
  entry.cut = true;
  const full = entry.text.textContent;
  const heard = app.heard.get(itemId);
  let keep = 0;
  if (audioEndMs > 0 && heard && heard.audio_received_ms > 0) {
    const share = Math.min(1, heard.audio_end_ms / heard.audio_received_ms);
    const words = full.split(/(\s+)/);
    let length = 0;
    for (const piece of words) {
      if (length + piece.length > full.length * share) break;
      length += piece.length;
    }
    keep = length;
  }
  const cut = document.createElement("span");
  cut.className = "cut";
  cut.textContent = full.slice(keep);
  entry.text.replaceChildren(full.slice(0, keep), cut);
  const mark = document.createElement("span");
  mark.className = "note";
  mark.textContent = audioEndMs > 0 ? `interrupted after ${(audioEndMs / 1000).toFixed(2)} s` : "interrupted before it was heard";
  entry.element.append(mark);
  app.heard.delete(itemId);
}

function note(message) {
  const element = document.createElement("li");
  element.className = "system";
  element.textContent = message;
  append(element);
}

function append(element) {
  const atBottom = isAtBottom();
  ui.transcript.append(element);
  if (atBottom) scrollToBottom();
}

function isAtBottom() {
  const list = ui.transcript;
  return list.scrollHeight - list.scrollTop - list.clientHeight < 24;
}

function scrollToBottom() {
  ui.transcript.scrollTop = ui.transcript.scrollHeight; // the list only: the page stays where the user put it
}

// --- latency, usage, meters ---------------------------------------------------------------------------------------

function recordLatency(ms) {
  app.latencies.push(ms);
  const item = document.createElement("li");
  item.textContent = `${Math.round(ms)} ms`;
  ui.latencyList.append(item);
  drawLatencyChart();
}

function drawLatencyChart() {
  const values = app.latencies.slice(-30);
  const top = Math.max(500, ...values);
  const width = 300 / Math.max(values.length, 10);
  ui.latencyChart.replaceChildren(...values.map((ms, i) => {
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const height = (ms / top) * 95;
    rect.setAttribute("x", String(i * width + 1));
    rect.setAttribute("y", String(100 - height));
    rect.setAttribute("width", String(Math.max(1, width - 2)));
    rect.setAttribute("height", String(height));
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${Math.round(ms)} ms`;
    rect.append(title);
    return rect;
  }));
}

function addUsage(usage) {
  if (!usage) return;
  const input = usage.input_token_details || {};
  const output = usage.output_token_details || {};
  const cached = input.cached_tokens_details || {};
  const prices = app.config.prices || {};
  const per = (tokens, price) => ((tokens || 0) * (price || 0)) / 1e6;
  app.usage.input += usage.input_tokens || 0;
  app.usage.output += usage.output_tokens || 0;
  app.usage.cost +=
    per((input.audio_tokens || 0) - (cached.audio_tokens || 0), prices.audio_input) +
    per(cached.audio_tokens, prices.cached_audio_input) +
    per((input.text_tokens || 0) - (cached.text_tokens || 0), prices.text_input) +
    per(cached.text_tokens, prices.cached_text_input) +
    per(output.audio_tokens, prices.audio_output) +
    per(output.text_tokens, prices.text_output);
  ui.usageIn.textContent = String(app.usage.input);
  ui.usageOut.textContent = String(app.usage.output);
  ui.usageCost.textContent = `$${app.usage.cost.toFixed(4)}`;
}

function resumeAudio() {
  // Created (or resumed) inside the click that connects: browsers only allow audio to start from a user gesture.
  try {
    app.audioContext = app.audioContext || new AudioContext();
    app.audioContext.resume();
  } catch {
    app.audioContext = null;
  }
}

// Drive `meter` from `stream`'s level; returns a function that stops it and resets the meter.
function watchLevel(stream, meter) {
  if (!app.audioContext) return () => {};
  const source = app.audioContext.createMediaStreamSource(stream);
  const analyser = app.audioContext.createAnalyser();
  analyser.fftSize = 512;
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  let frame = 0;
  const update = () => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    meter.value = Math.min(1, Math.max(0, (20 * Math.log10(rms + 1e-9) + 60) / 60)); // -60..0 dBFS
    frame = requestAnimationFrame(update);
  };
  frame = requestAnimationFrame(update);
  return () => {
    cancelAnimationFrame(frame);
    source.disconnect();
    meter.value = 0;
  };
}

// --- wiring -------------------------------------------------------------------------------------------------------

ui.connect.addEventListener("click", connect);
ui.disconnect.addEventListener("click", disconnect);
ui.mute.addEventListener("click", toggleMute);
ui.reply.addEventListener("click", replyNow);
ui.interrupt.addEventListener("click", interrupt);

// Push to talk: hold with a pointer (the one that started it ends it), or with the space bar; a keyboard or
// screen-reader click (no pointer) toggles instead, for those who cannot hold.
ui.ptt.addEventListener("pointerdown", (e) => {
  if (e.button !== 0) return;
  ui.ptt.setPointerCapture(e.pointerId);
  startHold({ source: "pointer", id: e.pointerId });
});
for (const type of ["pointerup", "pointercancel"]) {
  ui.ptt.addEventListener(type, (e) => {
    if (app.hold && app.hold.source === "pointer" && app.hold.id === e.pointerId) endHold(type === "pointerup");
  });
}
ui.ptt.addEventListener("click", (e) => {
  if (e.detail !== 0) return; // a pointer click: the hold already happened
  if (app.hold) endHold(true);
  else startHold({ source: "toggle" });
});
ui.ptt.addEventListener("contextmenu", (e) => e.preventDefault());
document.addEventListener("keydown", (e) => {
  if (e.code !== "Space" || !pushToTalk() || ui.ptt.disabled) return;
  if (!pttTarget(e.target) && !(app.hold && app.hold.source === "key")) return;
  e.preventDefault(); // also on key repeat: the page must not scroll
  if (!e.repeat) startHold({ source: "key" });
});
document.addEventListener("keyup", (e) => {
  if (e.code !== "Space" || !app.hold || app.hold.source !== "key") return;
  e.preventDefault();
  endHold(true); // wherever the focus went meanwhile
});
window.addEventListener("blur", () => endHold(false));
document.addEventListener("visibilitychange", () => { if (document.hidden) endHold(false); });

ui.settings.addEventListener("submit", (e) => { e.preventDefault(); sendSessionUpdate(); });
ui.turn.addEventListener("change", applyLocks);
ui.threshold.addEventListener("input", () => { ui.thresholdValue.textContent = ui.threshold.value; });

loadConfig().then((config) => { if (!app.call) { app.config = config; applyLocks(); } });
setState("idle");
