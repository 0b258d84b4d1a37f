// relay's web client: the reference client for the relay's public interface, and a page to talk to the model.
//
// It uses only what any client may use: POST /v1/realtime/calls with an SDP offer (OpenAI's WebRTC interface),
// the `oai-events` data channel for the Realtime API's JSON events, and GET /relay/client-config for the relay's
// ICE servers, the session fields the operator has locked, and token prices. No build step, no library.
"use strict";

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

// Everything about the current call. Exposed as window.relayApp for tests and for curious developers.
const app = {
  config: { ice_servers: [], locked: [], prices: {} },
  pc: null, channel: null, mic: null, callId: null, state: "idle",
  muted: false, pttHeld: false,
  speechStoppedAt: null, // when the user's last turn ended (performance.now()), waiting for the answer's first sound
  latencies: [], // ms, one per turn
  usage: { input: 0, output: 0, cost: 0 },
  entries: new Map(), // conversation item id -> its transcript element
  truncated: new Map(), // item id -> audio_end_ms, for items cut by a barge-in
  events: [], // every event received, newest last (capped)
  audioContext: null, meters: [],
};
window.relayApp = app;

// --- state --------------------------------------------------------------------------------------------------------

const STATE_TEXT = {
  idle: "Not connected", connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…",
  ended: "Call ended", error: "Error",
};

function setState(state, reason) {
  app.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = reason ? `${STATE_TEXT[state]}: ${reason}` : STATE_TEXT[state];
  const live = state === "connected" || state === "reconnecting";
  ui.connect.disabled = state === "connecting" || live;
  ui.disconnect.disabled = !(state === "connecting" || live);
  for (const button of [ui.mute, ui.reply, ui.interrupt, ui.ptt, ui.apply]) button.disabled = !live;
  applyLocks();
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

// --- connecting ---------------------------------------------------------------------------------------------------

async function connect() {
  showError("");
  setState("connecting");
  try {
    app.config = await (await fetch("/relay/client-config")).json();
    applyLocks();
    app.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const pc = (app.pc = new RTCPeerConnection({ iceServers: app.config.ice_servers }));
    const [track] = app.mic.getAudioTracks();
    track.enabled = !app.muted && !isPushToTalk();
    pc.addTrack(track, app.mic);
    pc.ontrack = (event) => {
      ui.audio.srcObject = event.streams[0] || new MediaStream([event.track]);
      watchLevel(ui.audio.srcObject, ui.meterOut);
    };
    pc.onconnectionstatechange = () => {
      if (pc !== app.pc) return;
      if (pc.connectionState === "failed") endCall("error", "the connection to the relay failed");
      if (pc.connectionState === "closed" && app.state !== "ended") endCall("ended");
    };
    const channel = (app.channel = pc.createDataChannel("oai-events"));
    channel.onopen = () => {
      setState("connected");
      sendSessionUpdate();
    };
    channel.onmessage = (message) => onEvent(JSON.parse(message.data));
    channel.onclose = () => { if (app.state === "connected") endCall("ended"); };
    watchLevel(app.mic, ui.meterIn);

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, 1000); // not required by the relay (it learns addresses from checks), but faster
    const response = await fetch("/v1/realtime/calls", {
      method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `the relay answered ${response.status}`);
    }
    app.callId = (response.headers.get("Location") || "").split("/").pop();
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  } catch (error) {
    endCall("error", error.message || String(error));
  }
}

function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function disconnect() {
  if (app.callId) {
    fetch(`/v1/realtime/calls/${app.callId}/hangup`, { method: "POST" }).catch(() => {});
  }
  endCall("ended");
}

function endCall(state, reason) {
  const pc = app.pc;
  app.pc = null;
  if (pc) pc.close();
  if (app.mic) app.mic.getTracks().forEach((t) => t.stop());
  app.mic = null;
  app.channel = null;
  app.callId = null;
  setState(state, reason);
  if (state === "error" && reason) showError(reason);
}

// --- sending events -----------------------------------------------------------------------------------------------

function send(event) {
  if (app.channel && app.channel.readyState === "open") app.channel.send(JSON.stringify(event));
}

function isPushToTalk() {
  return ui.turn.value === "push_to_talk";
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
  if (!locked.has("turn_detection")) session.audio.input.turn_detection = turnDetection();
  if (!locked.has("transcription")) {
    session.audio.input.transcription = ui.transcription.checked ? { model: "gpt-4o-mini-transcribe" } : null;
  }
  send({ type: "session.update", session });
  syncMicToMode();
}

function syncMicToMode() {
  ui.pttBox.hidden = !isPushToTalk();
  ui.vadFields.disabled = ui.turn.value !== "server_vad" || (app.config.locked || []).includes("turn_detection");
  const track = app.mic && app.mic.getAudioTracks()[0];
  if (track) track.enabled = !app.muted && (!isPushToTalk() || app.pttHeld);
}

// --- the controls -------------------------------------------------------------------------------------------------

function toggleMute() {
  app.muted = !app.muted;
  ui.mute.setAttribute("aria-pressed", String(app.muted));
  ui.mute.textContent = app.muted ? "Unmute" : "Mute";
  syncMicToMode();
}

function replyNow() {
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
}

function interrupt() {
  send({ type: "response.cancel" });
  send({ type: "output_audio_buffer.clear" });
}

function pttDown() {
  if (app.pttHeld || ui.ptt.disabled || !isPushToTalk()) return;
  app.pttHeld = true;
  ui.ptt.classList.add("held");
  interrupt(); // talking over the model stops it, as a voice would
  send({ type: "input_audio_buffer.clear" }); // only what is said while held counts
  syncMicToMode();
}

function pttUp() {
  if (!app.pttHeld) return;
  app.pttHeld = false;
  ui.ptt.classList.remove("held");
  syncMicToMode();
  app.speechStoppedAt = performance.now();
  replyNow();
}

function applyLocks() {
  const locked = new Set(app.config.locked || []);
  const controls = { instructions: [ui.instructions], voice: [ui.voice], turn_detection: [ui.turn, ui.vadFields],
                     transcription: [ui.transcription] };
  for (const [field, elements] of Object.entries(controls)) {
    for (const element of elements) element.disabled = locked.has(field);
    const note = document.querySelector(`.locked-note[data-for="${field}"]`);
    note.hidden = !locked.has(field);
    note.textContent = locked.has(field) ? "Set by the operator of this relay: it cannot be changed here." : "";
  }
  if (!locked.has("turn_detection")) ui.vadFields.disabled = ui.turn.value !== "server_vad";
}

// --- events from the relay ----------------------------------------------------------------------------------------

function onEvent(event) {
  app.events.push(event);
  if (app.events.length > 2000) app.events.shift();
  const handler = HANDLERS[event.type];
  if (handler) handler(event);
}

const HANDLERS = {
  "input_audio_buffer.speech_stopped": () => { app.speechStoppedAt = performance.now(); },
  "conversation.item.added": (e) => {
    const item = e.item || {};
    if (item.type === "message" && (item.role === "user" || item.role === "assistant")) entry(item.id, item.role);
  },
  "conversation.item.input_audio_transcription.completed": (e) => setText(entry(e.item_id, "user"), e.transcript),
  "response.output_audio_transcript.delta": (e) => addText(entry(e.item_id, "assistant"), e.delta),
  "response.output_text.delta": (e) => addText(entry(e.item_id, "assistant"), e.delta),
  "output_audio_buffer.started": () => {
    if (app.speechStoppedAt === null) return;
    recordLatency(performance.now() - app.speechStoppedAt);
    app.speechStoppedAt = null;
  },
  "conversation.item.truncated": (e) => {
    app.truncated.set(e.item_id, e.audio_end_ms);
    send({ type: "conversation.item.retrieve", item_id: e.item_id }); // what is left of it, as the model knows it
  },
  "conversation.item.retrieved": (e) => {
    const item = e.item || {};
    if (!app.truncated.has(item.id)) return;
    const part = (item.content || [])[0] || {};
    showCut(item.id, part.transcript || "", app.truncated.get(item.id));
  },
  "response.done": (e) => addUsage((e.response || {}).usage),
  "error": (e) => {
    const error = e.error || {};
    if (error.code === "upstream_closed") endCall("error", error.message);
    else if (error.code !== "response_cancel_not_active") note(`${error.code || "error"}: ${error.message || ""}`);
    // (Interrupt always sends response.cancel; when the reply was already fully generated that is harmless.)
  },
  "relay.upstream.reconnecting": () => setState("reconnecting"),
  "relay.upstream.reconnected": () => setState("connected"),
};

// --- the transcript -----------------------------------------------------------------------------------------------

function entry(itemId, role) {
  let element = app.entries.get(itemId);
  if (!element) {
    element = document.createElement("li");
    element.className = role;
    element.dataset.itemId = itemId;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = role === "user" ? "…" : "";
    element.append(who, text);
    ui.transcript.append(element);
    app.entries.set(itemId, element);
  }
  element.scrollIntoView({ block: "nearest" });
  return element;
}

function setText(element, text) {
  element.querySelector(".text").textContent = text;
}

function addText(element, delta) {
  element.querySelector(".text").textContent += delta;
}

function showCut(itemId, heard, audioEndMs) {
  // Show what the user heard and strike what the barge-in cut. The model keeps a transcript only of what was heard
  // (or none: then all of it is struck).
  const element = app.entries.get(itemId);
  if (!element) return;
  const text = element.querySelector(".text");
  const full = text.textContent;
  text.textContent = "";
  const kept = full.startsWith(heard) ? heard : "";
  const cut = document.createElement("span");
  cut.className = "cut";
  cut.textContent = full.slice(kept.length);
  text.append(kept, cut);
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = `interrupted after ${(audioEndMs / 1000).toFixed(2)} s` + (kept || !heard ? "" : `; heard: “${heard}”`);
  element.append(note);
}

function note(message) {
  const element = document.createElement("li");
  element.className = "system";
  element.textContent = message;
  ui.transcript.append(element);
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

function watchLevel(stream, meter) {
  try {
    app.audioContext = app.audioContext || new AudioContext();
    const analyser = app.audioContext.createAnalyser();
    analyser.fftSize = 512;
    app.audioContext.createMediaStreamSource(stream).connect(analyser);
    app.meters.push({ analyser, meter, samples: new Float32Array(analyser.fftSize) });
    if (app.meters.length === 1) requestAnimationFrame(updateMeters);
  } catch (error) {
    note(`level meter unavailable: ${error.message}`);
  }
}

function updateMeters() {
  for (const { analyser, meter, samples } of app.meters) {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    meter.value = Math.min(1, Math.max(0, (20 * Math.log10(rms + 1e-9) + 60) / 60)); // -60..0 dBFS
  }
  requestAnimationFrame(updateMeters);
}

// --- wiring -------------------------------------------------------------------------------------------------------

ui.connect.addEventListener("click", connect);
ui.disconnect.addEventListener("click", disconnect);
ui.mute.addEventListener("click", toggleMute);
ui.reply.addEventListener("click", () => { app.speechStoppedAt = performance.now(); replyNow(); });
ui.interrupt.addEventListener("click", interrupt);
ui.ptt.addEventListener("pointerdown", pttDown);
ui.ptt.addEventListener("pointerup", pttUp);
ui.ptt.addEventListener("pointerleave", pttUp);
ui.ptt.addEventListener("keydown", (e) => { if (e.key === "Enter") pttDown(); });
ui.ptt.addEventListener("keyup", (e) => { if (e.key === "Enter") pttUp(); });
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && !e.repeat && isPushToTalk() && !isTyping(e.target)) { e.preventDefault(); pttDown(); }
});
document.addEventListener("keyup", (e) => {
  if (e.code === "Space" && isPushToTalk() && !isTyping(e.target)) { e.preventDefault(); pttUp(); }
});
ui.settings.addEventListener("submit", (e) => { e.preventDefault(); sendSessionUpdate(); });
ui.turn.addEventListener("change", () => { syncMicToMode(); applyLocks(); });
ui.threshold.addEventListener("input", () => { ui.thresholdValue.textContent = ui.threshold.value; });

function isTyping(target) {
  return target instanceof HTMLTextAreaElement || (target instanceof HTMLInputElement && target.type !== "checkbox")
      || target instanceof HTMLSelectElement;
}

fetch("/relay/client-config").then((r) => r.json()).then((config) => { app.config = config; applyLocks(); })
  .catch(() => {});
setState("idle");
syncMicToMode();
