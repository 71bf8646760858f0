// streamtc serve web page: streams, the current frame with the STC overlay, live charts, questions.
// Plain browser JavaScript, no build step. Talks to the same server's /v1 API; a token given as
// ?token= in the page address is sent with every request (header, or ?token= where a header cannot be).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const COLORS = ["#3d7dff", "#e4572e", "#20a070", "#a23bec", "#f0a202", "#00a6b6", "#d6336c", "#6c757d"];
const HISTORY = 120; // points per chart series

const state = {
  streams: new Map(), // id -> {info, color, sockets, time: [], tokens: [], last: frame event, answers: []}
  selected: null,
  camera: null,
};

const $ = (id) => document.getElementById(id);

function withToken(path) {
  if (!TOKEN) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(method, path, body) {
  const headers = {};
  if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${method} ${path}: HTTP ${response.status}`);
  return data;
}

function socketUrl(path) {
  const base = new URL(path, location.href);
  base.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return withToken(base.href);
}

function showError(error) {
  $("error").textContent = error ? String(error.message || error) : "";
}

// -- streams ------------------------------------------------------------------------------------

function track(info) {
  if (state.streams.has(info.id)) {
    state.streams.get(info.id).info = info;
    return;
  }
  const entry = { info, color: COLORS[state.streams.size % COLORS.length], time: [], tokens: [], last: null,
                  answers: [], seq: 0, socket: null };
  state.streams.set(info.id, entry);
  subscribe(entry);
  if (!state.selected) select(info.id);
}

function label(info) {
  const stc = info.stc ? "STC" : "no STC";
  const memory = info.memory === "full" ? "" : ` · ${info.memory}${info.window_tokens ? ` ${info.window_tokens}` : ""}`;
  return `${info.name || info.source || "push"} · ${stc}${memory}`;
}

function renderStreams() {
  const list = $("streams");
  list.replaceChildren();
  for (const [id, entry] of state.streams) {
    const item = document.createElement("li");
    item.dataset.id = id;
    item.dataset.state = entry.info.state;
    item.className = id === state.selected ? "selected" : "";
    const swatch = `<span class="swatch" style="background:${entry.color}"></span>`;
    item.innerHTML = `<span>${swatch}${escapeHtml(label(entry.info))} <small>${entry.info.state}</small></span>`;
    const close = document.createElement("button");
    close.textContent = "×";
    close.title = "close this stream";
    close.onclick = (event) => { event.stopPropagation(); remove(id); };
    item.append(close);
    item.onclick = () => select(id);
    list.append(item);
  }
  renderChartLegend();
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function select(id) {
  state.selected = id;
  renderStreams();
  renderAnswers();
  const entry = state.streams.get(id);
  if (entry && entry.last) showFrame(entry);
}

async function remove(id) {
  try {
    await api("DELETE", `v1/streams/${id}`);
  } catch (error) { showError(error); }
  const entry = state.streams.get(id);
  if (entry && entry.socket) entry.socket.close();
  state.streams.delete(id);
  if (state.selected === id) state.selected = state.streams.keys().next().value || null;
  renderStreams();
  drawCharts();
}

async function refresh() {
  try {
    const { streams } = await api("GET", "v1/streams");
    for (const info of streams) track(info);
    renderStreams();
  } catch (error) { showError(error); }
}

async function createStreams(event) {
  event.preventDefault();
  showError(null);
  const source = $("source").value.trim();
  const base = {
    source: source || null, fps: Number($("fps").value) || 1, realtime: $("realtime").checked,
    loop: $("loop").checked, memory: $("memory").value || null,
    window_tokens: $("window").value ? Number($("window").value) : null,
  };
  const variants = [{ ...base, stc: $("stc").value === "off" ? null : "default" }];
  if ($("compare").checked && $("stc").value !== "off") variants.push({ ...base, stc: null });
  try {
    for (const body of variants) {
      body.name = source.split("/").pop() || "push";
      const info = await api("POST", "v1/streams", body);
      track(info);
      if (body === variants[0]) select(info.id);
    }
    renderStreams();
  } catch (error) { showError(error); }
}

// -- events -------------------------------------------------------------------------------------

function subscribe(entry) {
  const socket = new WebSocket(socketUrl(`v1/streams/${entry.info.id}/events?after=${entry.seq}`));
  entry.socket = socket;
  socket.onmessage = (message) => onEvent(entry, JSON.parse(message.data));
  socket.onclose = () => {
    if (state.streams.get(entry.info.id) === entry && entry.socket === socket) {
      setTimeout(() => { if (state.streams.get(entry.info.id) === entry) subscribe(entry); }, 1000);
    }
  };
}

function push(series, point) {
  series.push(point);
  if (series.length > HISTORY) series.shift();
}

function onEvent(entry, event) {
  if (event.seq) entry.seq = event.seq;
  if (event.type === "frame") {
    entry.last = event;
    push(entry.time, event.vit_ms + event.prefill_ms);
    push(entry.tokens, event.cache_tokens);
    if (entry.info.id === state.selected) showFrame(entry);
    drawCharts();
  } else if (event.type === "answer") {
    entry.answers.push(event);
    if (entry.info.id === state.selected) renderAnswers();
  } else if (event.type === "state") {
    entry.info.state = event.state;
    if (event.error) showError(`${entry.info.id}: ${event.error}`);
    renderStreams();
  } else if (event.type === "error") {
    showError(`${entry.info.id}: ${event.error}`);
  } else if (event.type === "end") {
    entry.info.state = "closed";
    renderStreams();
  }
}

// -- the frame and its overlay ------------------------------------------------------------------

function showFrame(entry) {
  const image = $("frame");
  const event = entry.last;
  image.onload = () => drawOverlay(event);
  image.src = withToken(`v1/streams/${entry.info.id}/frame.jpg?seq=${event.seq}`);
  const cacher = event.cacher;
  const share = cacher ? cacher.recomputed_per_layer[0] / cacher.tokens : null;
  $("frame-info").textContent =
    `t = ${event.timestamp.toFixed(1)} s · frame ${event.frame} · ViT ${event.vit_ms.toFixed(1)} ms · ` +
    `pre-fill ${event.prefill_ms.toFixed(1)} ms · kept ${event.tokens_kept}/${event.tokens_encoded} tokens · ` +
    (cacher ? (cacher.refresh ? "Cacher refresh" : `Cacher recomputed ${(100 * share).toFixed(0)}% per layer`)
            : "no Cacher") + ` · ${event.cache_tokens} tokens in cache`;
}

function drawOverlay(event) {
  const canvas = $("overlay");
  const image = $("frame");
  canvas.width = image.clientWidth;
  canvas.height = image.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  // Pruner: kept tokens outlined in green, pruned ones dimmed, on the pruner's [rows, cols] grid
  const pruner = event.pruner;
  if (pruner && pruner.grid) {
    const [rows, cols] = pruner.grid;
    const kept = new Set(pruner.kept);
    const w = canvas.width / cols, h = canvas.height / rows;
    for (let i = 0; i < rows * cols; i++) {
      const x = (i % cols) * w, y = Math.floor(i / cols) * h;
      if (kept.has(i)) {
        ctx.fillStyle = "rgba(32, 192, 112, 0.22)";
        ctx.fillRect(x, y, w, h);
        ctx.strokeStyle = "#20c070";
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
      } else {
        ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
        ctx.fillRect(x, y, w, h);
      }
    }
  }
  // Cacher: the ViT tokens it recomputed, as blue squares on the tower's patch grid, more opaque
  // the more layers recomputed the token; a refresh (every token) gets an orange frame instead
  const cacher = event.cacher;
  let recomputedCells = "none";
  if (cacher) {
    const share = cacher.recomputed_per_layer[0] / cacher.tokens;
    ctx.strokeStyle = cacher.refresh ? "#ff8c00" : "#3d7dff";
    ctx.lineWidth = 6;
    ctx.strokeRect(3, 3, canvas.width - 6, canvas.height - 6);
    if (cacher.recomputed && cacher.grid) {
      const [rows, cols] = cacher.grid;
      const w = canvas.width / cols, h = canvas.height / rows;
      let cells = 0;
      cacher.recomputed.forEach((count, i) => {
        if (!count) return;
        cells += 1;
        const x = (i % cols) * w, y = Math.floor(i / cols) * h;
        ctx.fillStyle = `rgba(61, 125, 255, ${(0.25 + 0.6 * count / cacher.layers).toFixed(3)})`;
        ctx.fillRect(x + w * 0.2, y + h * 0.2, w * 0.6, h * 0.6);
      });
      recomputedCells = String(cells);
    } else if (cacher.refresh) {
      recomputedCells = "all";
    }
    // share of ViT tokens recomputed in this frame, as a bar along the bottom edge
    ctx.fillStyle = cacher.refresh ? "#ff8c00" : "#3d7dff";
    ctx.fillRect(0, canvas.height - 8, canvas.width * share, 8);
  }
  canvas.dataset.frames = String(Number(canvas.dataset.frames) + 1);
  canvas.dataset.kept = pruner ? String(pruner.kept.length) : "all";
  canvas.dataset.refresh = cacher ? String(cacher.refresh) : "none";
  canvas.dataset.recomputed = recomputedCells;
  if (recomputedCells !== "none" && recomputedCells !== "all") {
    canvas.dataset.recomputedSeen = String(Number(canvas.dataset.recomputedSeen || 0) + 1);
  }
}

// -- charts -------------------------------------------------------------------------------------

function drawChart(canvas, key) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const all = [...state.streams.values()];
  const max = Math.max(1, ...all.flatMap((e) => e[key]));
  ctx.fillStyle = "#888";
  ctx.font = "10px system-ui";
  ctx.fillText(max.toFixed(0), 2, 10);
  ctx.fillText("0", 2, height - 2);
  for (const entry of all) {
    const series = entry[key];
    if (series.length < 2) continue;
    ctx.strokeStyle = entry.color;
    ctx.lineWidth = entry.info.id === state.selected ? 2.5 : 1.2;
    ctx.beginPath();
    series.forEach((value, i) => {
      const x = 20 + (i / (HISTORY - 1)) * (width - 24);
      const y = height - 4 - (value / max) * (height - 16);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function drawCharts() {
  drawChart($("chart-time"), "time");
  drawChart($("chart-tokens"), "tokens");
}

function renderChartLegend() {
  const legend = $("chart-legend");
  legend.replaceChildren();
  for (const entry of state.streams.values()) {
    const item = document.createElement("span");
    item.innerHTML = `<span class="swatch" style="display:inline-block;width:.8em;height:.8em;background:${entry.color}"></span> ` +
      escapeHtml(`${entry.info.id}: ${label(entry.info)}`);
    legend.append(item);
  }
}

// -- questions ------------------------------------------------------------------------------------

function renderAnswers() {
  const list = $("answers");
  list.replaceChildren();
  const entry = state.streams.get(state.selected);
  if (!entry) return;
  for (const answer of [...entry.answers].reverse()) {
    const item = document.createElement("li");
    const stamp = answer.timestamp === null ? "–" : `${answer.timestamp.toFixed(1)} s`;
    const text = answer.text || `(no text: token ids ${answer.token_ids.slice(0, 8).join(" ")}…; random weights)`;
    item.innerHTML = `<span class="time">[${stamp}]</span> ${escapeHtml(answer.question)} → ` +
      `<span class="answer">${escapeHtml(text)}</span> <small>(${answer.latency_ms.toFixed(0)} ms)</small>`;
    list.append(item);
  }
}

async function ask(event) {
  event.preventDefault();
  showError(null);
  const question = $("question").value.trim();
  if (!question || !state.selected) return;
  const options = $("options").value.split(",").map((o) => o.trim()).filter(Boolean);
  $("ask").disabled = true;
  try {
    await api("POST", `v1/streams/${state.selected}/ask`, { question, options: options.length ? options : null });
    $("question").value = "";
  } catch (error) { showError(error); }
  $("ask").disabled = false;
}

// -- the browser's camera as a push stream --------------------------------------------------------

async function toggleCamera() {
  if (state.camera) {
    clearInterval(state.camera.timer);
    state.camera.media.getTracks().forEach((t) => t.stop());
    state.camera.socket.close();
    state.camera = null;
    $("camera").textContent = "Push my camera";
    return;
  }
  showError(null);
  try {
    const media = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: false });
    const video = $("camera-video");
    video.srcObject = media;
    await video.play();
    const fps = Number($("fps").value) || 1;
    const info = await api("POST", "v1/streams", { source: null, fps, name: "camera",
                                                   stc: $("stc").value === "off" ? null : "default" });
    track(info);
    select(info.id);
    renderStreams();
    const socket = new WebSocket(socketUrl(`v1/streams/${info.id}/push`));
    const canvas = document.createElement("canvas");
    const camera = { media, socket, sent: 0, acked: 0, timer: null };
    state.camera = camera;
    socket.onmessage = (message) => {
      const reply = JSON.parse(message.data);
      if (reply.error) showError(`camera: ${reply.error}`); else camera.acked += 1;
      $("camera-status").textContent = `camera → ${info.id}: ${camera.sent} sent, ${camera.acked} accepted`;
    };
    socket.onopen = () => {
      camera.timer = setInterval(() => {
        canvas.width = video.videoWidth || 320;
        canvas.height = video.videoHeight || 240;
        canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
        canvas.toBlob((blob) => {
          if (blob && socket.readyState === WebSocket.OPEN) { socket.send(blob); camera.sent += 1; }
        }, "image/jpeg", 0.8);
      }, 1000 / fps);
    };
    $("camera").textContent = "Stop my camera";
  } catch (error) { showError(error); }
}

// -- start --------------------------------------------------------------------------------------

async function start() {
  $("create-form").onsubmit = createStreams;
  $("ask-form").onsubmit = ask;
  $("camera").onclick = toggleCamera;
  try {
    const info = await api("GET", "v1/info");
    const stc = info.default_stc ? "STC on by default" : "STC off by default";
    $("info").textContent = `${info.model} · ${info.replicas} replica(s) · ${stc}` +
      (info.model.includes("/") ? "" : " · random weights: answers are meaningless");
  } catch (error) { showError(error); }
  await refresh();
  setInterval(refresh, 5000);
  drawCharts();
}

start();
