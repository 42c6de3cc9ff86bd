// mctp web page: record or upload a question, stream the answer from /v1/chat/completions,
// play the audio chunks as they arrive and show the first-chunk latency.
"use strict";

const $ = (id) => document.getElementById(id);
let question = null; // {wav: ArrayBuffer} of the recorded or uploaded audio (16-bit WAV)
let recorder = null;

function setStatus(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.className = isError ? "error" : "";
}

// Any audio the browser can decode -> mono 16-bit WAV bytes (the server reads WAV).
async function toWav(arrayBuffer) {
  const ctx = new OfflineAudioContext(1, 1, 16000);
  const audio = await ctx.decodeAudioData(arrayBuffer);
  const n = audio.length;
  const mono = new Float32Array(n);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const d = audio.getChannelData(c);
    for (let i = 0; i < n; i++) mono[i] += d[i] / audio.numberOfChannels;
  }
  return encodeWav(mono, audio.sampleRate);
}

function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + 2 * samples.length);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * samples.length, true); str(8, "WAVE");
  str(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true);
  v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + 2 * i, Math.round(s * 32767), true);
  }
  return buf;
}

function toBase64(buf) {
  const bytes = new Uint8Array(buf);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function pcm16ToFloat(b64) {
  const bin = atob(b64);
  const out = new Float32Array(bin.length / 2);
  for (let i = 0; i < out.length; i++) {
    let x = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
    if (x >= 0x8000) x -= 0x10000;
    out[i] = x / 32768;
  }
  return out;
}

$("file").addEventListener("change", async (ev) => {
  const f = ev.target.files[0];
  if (!f) return;
  try {
    question = { wav: await toWav(await f.arrayBuffer()) };
    setStatus("input-status", `loaded ${f.name}`);
  } catch (e) {
    question = null;
    setStatus("input-status", `cannot decode ${f.name}: ${e}`, true);
  }
});

$("record").addEventListener("click", async () => {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const parts = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => parts.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      const blob = new Blob(parts, { type: recorder.mimeType });
      question = { wav: await toWav(await blob.arrayBuffer()) };
      setStatus("input-status", "recorded");
    };
    recorder.start();
    $("record").disabled = true;
    $("stop").disabled = false;
    setStatus("input-status", "recording...");
  } catch (e) {
    setStatus("input-status", `no microphone: ${e}`, true);
  }
});

$("stop").addEventListener("click", () => {
  if (recorder) recorder.stop();
  $("record").disabled = false;
  $("stop").disabled = true;
});

async function send() {
  const content = [];
  const text = $("text").value.trim();
  if (text) content.push({ type: "text", text });
  if (question) {
    content.push({ type: "input_audio", input_audio: { data: toBase64(question.wav), format: "wav" } });
  }
  if (!content.length) { setStatus("status", "record, upload or type a question first", true); return; }
  $("answer").textContent = "";
  $("latency").textContent = "...";
  setStatus("status", "waiting for the answer...");
  document.body.dataset.state = "sending";
  const ctx = new AudioContext();
  let playAt = 0;
  const pieces = [];
  let rate = 16000;
  const t0 = performance.now();
  let first = null;
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      messages: [{ role: "user", content }],
      modalities: ["text", "audio"],
      audio: { voice: "default", format: "pcm16" },
      mode: $("mode").value,
      stream: true,
    }),
  });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    setStatus("status", `error ${resp.status}: ${(err.error || {}).message || resp.statusText}`, true);
    document.body.dataset.state = "error";
    return;
  }
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, cut).trim();
      buf = buf.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") continue;
      const msg = JSON.parse(data);
      if (msg.error) throw new Error(`the server stopped the answer: ${msg.error.message}`);
      const delta = msg.choices[0].delta || {};
      if (delta.content) $("answer").textContent += delta.content;
      if (delta.audio && delta.audio.transcript) $("answer").textContent += delta.audio.transcript;
      if (delta.audio && delta.audio.data) {
        rate = delta.audio.sample_rate || rate;
        const samples = pcm16ToFloat(delta.audio.data);
        if (first === null) {
          first = performance.now() - t0;
          $("latency").textContent = `${first.toFixed(0)} ms`;
        }
        pieces.push(samples);
        const b = ctx.createBuffer(1, samples.length, rate);
        b.copyToChannel(samples, 0);
        const src = ctx.createBufferSource();
        src.buffer = b;
        src.connect(ctx.destination);
        playAt = Math.max(playAt, ctx.currentTime);
        src.start(playAt);
        playAt += b.duration;
      }
      if (msg.mctp) {
        const fc = msg.mctp.first_chunk_ms;
        $("server-latency").textContent = fc === null ? "no audio" : `${fc.toFixed(0)} ms`;
        $("tps").textContent = msg.mctp.tokens_per_s.toFixed(0);
      }
    }
  }
  if (first === null) $("latency").textContent = "no audio";
  const total = pieces.reduce((n, p) => n + p.length, 0);
  const all = new Float32Array(total);
  let o = 0;
  for (const p of pieces) { all.set(p, o); o += p.length; }
  const player = $("player");
  player.src = URL.createObjectURL(new Blob([encodeWav(all, rate)], { type: "audio/wav" }));
  setStatus("status", `done: ${(total / rate).toFixed(2)} s of audio`);
  document.body.dataset.state = "done";
  player.play().catch((e) => setStatus("status", `press play (${e})`));
}

$("send").addEventListener("click", () => {
  send().catch((e) => { setStatus("status", `error: ${e}`, true); document.body.dataset.state = "error"; });
});

fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; });
