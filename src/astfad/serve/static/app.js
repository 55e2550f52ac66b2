// astfad inspection page: plain JavaScript, talks only to this server's REST API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const PARALLEL_UPLOADS = 4; // requests in flight; the server batches those that arrive together

const state = {
  models: [],          // summaries from GET /models
  model: null,         // selected model name
  thresholds: {},      // model name -> threshold set with the slider
  results: [],         // every result of the session, newest last
};

// ------------------------------------------------------------------ server calls
function apiKey() { return localStorage.getItem("astfad-api-key") || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("X-API-Key", apiKey());
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (response.status === 401) $("#key-box").hidden = false;
  if (!response.ok) {
    const reason = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    throw new Error(reason);
  }
  return body;
}

function say(text, isError = false) {
  const line = document.createElement("div");
  line.className = "message" + (isError ? " error" : "");
  line.textContent = text;
  $("#messages").append(line);
  setTimeout(() => line.remove(), isError ? 9000 : 4000);
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));

// ------------------------------------------------------------------ models
async function loadModels(select) {
  const { models } = await api("/models");
  state.models = models;
  const box = $("#model-select");
  box.innerHTML = "";
  if (!models.length) box.append(new Option("no model yet: fit one below", ""));
  for (const m of models) box.append(new Option(m.error ? `${m.name} (unreadable)` : m.name, m.name));
  const keep = select || state.model;
  if (keep && models.some((m) => m.name === keep)) box.value = keep;
  chooseModel(box.value || null);
}

function currentModel() { return state.models.find((m) => m.name === state.model) || null; }

function chooseModel(name) {
  state.model = name;
  const m = currentModel();
  const info = $("#model-info");
  info.innerHTML = "";
  const rows = !m ? [] : m.error ? [["error", m.error]] : [
    ["strategy", m.strategy + (m.requested_strategy && m.requested_strategy !== m.strategy ? ` (${m.requested_strategy})` : "")],
    ["shots", m.shots], ["threshold", fmt(m.threshold)], ["pixel thr.", fmt(m.pixel_threshold)],
    ["size", `${(m.size_bytes / 1048576).toFixed(1)} MB`], ["fitted in", `${fmt(m.fit_seconds, 3)} s`],
  ];
  for (const [k, v] of rows) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v;
    info.append(dt, dd);
  }
  $("#delete-model").disabled = !m;
  setupSlider();
}

async function deleteModel() {
  const name = state.model;
  if (!name || !confirm(`Delete model '${name}'? Its file is removed.`)) return;
  try {
    await api(`/models/${encodeURIComponent(name)}`, { method: "DELETE" });
    say(`deleted ${name}`);
    await loadModels();
  } catch (err) { say(err.message, true); }
}

// ------------------------------------------------------------------ fitting
async function fitModel(event) {
  event.preventDefault();
  const files = [...$("#fit-files").files];
  if (!files.length) { say("choose or drop some good images first", true); return; }
  const form = new FormData();
  form.append("name", $("#fit-name").value.trim());
  form.append("strategy", $("#fit-strategy").value);
  if ($("#fit-shots").value) form.append("shots", $("#fit-shots").value);
  for (const f of files) form.append("images", f, f.name);
  $("#fit-start").disabled = true;
  $("#fit-progress").hidden = false;
  try {
    const job = await api("/models", { method: "POST", body: form });
    await followJob(job.url);
  } catch (err) {
    say(err.message, true);
    $("#fit-stage").textContent = "failed";
  } finally {
    $("#fit-start").disabled = false;
  }
}

async function followJob(url) {
  for (;;) {
    const job = await api(url);
    $("#fit-progress progress").value = job.progress;
    $("#fit-stage").textContent = `${job.stage} ${Math.round(job.progress)}%`;
    for (const skipped of job.skipped.splice(0)) say(`skipped: ${skipped}`, true);
    if (job.status === "done") {
      say(`model '${job.name}' is ready (${job.model.strategy})`);
      for (const warning of job.warnings) say(`warning: ${warning}`, true);
      $("#fit-stage").textContent = "done";
      await loadModels(job.name);
      return;
    }
    if (job.status === "failed") throw new Error(`fit failed: ${job.error}`);
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
}

// ------------------------------------------------------------------ inspecting
function inspect(files) {
  if (!state.model) { say("choose or fit a model first", true); return; }
  const queue = files.map((file) => ({ file, result: addCard(file) }));
  const next = async () => {
    for (let item = queue.shift(); item; item = queue.shift()) await score(item.file, item.result);
  };
  for (let i = 0; i < Math.min(PARALLEL_UPLOADS, queue.length); i++) next();
}

function addCard(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".file").textContent = file.name;
  card.querySelector(".file").title = file.name;
  const result = { file: file.name, model: state.model, card, url: URL.createObjectURL(file),
                   score: null, serverThreshold: null, area: null, error: null, time: new Date().toISOString() };
  card.querySelector("img.original").src = result.url;
  $("#results").append(card);
  state.results.push(result);
  return result;
}

async function score(file, result) {
  const form = new FormData();
  form.append("images", file, file.name);
  try {
    const body = await api(`/models/${encodeURIComponent(result.model)}/predict?overlay=true`,
                           { method: "POST", body: form });
    const r = body.results[0];
    if (r.error) throw new Error(r.error);
    Object.assign(result, { score: r.score, serverThreshold: r.threshold, area: r.anomalous_area });
    result.card.querySelector("img.overlay").src = "data:image/png;base64," + r.overlay_png;
    drawOutline(result, "data:image/png;base64," + r.mask_png);
  } catch (err) {
    result.error = err.message;
    say(`${file.name}: ${err.message}`, true);
  }
  setupSlider();
  render(result);
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot show image"));
    img.src = src;
  });
}

// The mask's outline drawn over the original (at most 512 px on the long side).
async function drawOutline(result, maskSrc) {
  const [image, mask] = await Promise.all([loadImage(result.url), loadImage(maskSrc)]);
  const scale = Math.min(1, 512 / Math.max(image.naturalWidth, image.naturalHeight));
  const w = Math.max(1, Math.round(image.naturalWidth * scale));
  const h = Math.max(1, Math.round(image.naturalHeight * scale));
  const canvas = result.card.querySelector("canvas.outline");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, w, h);
  const scratch = document.createElement("canvas");
  scratch.width = w; scratch.height = h;
  const sctx = scratch.getContext("2d");
  sctx.drawImage(mask, 0, 0, w, h);
  const m = sctx.getImageData(0, 0, w, h).data;
  const inside = (x, y) => x >= 0 && y >= 0 && x < w && y < h && m[(y * w + x) * 4] > 127;
  const out = ctx.getImageData(0, 0, w, h);
  const thick = Math.max(2, Math.round(Math.max(w, h) / 180)); // half-width in pixels
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      if (!inside(x, y) || (inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1))) continue;
      for (let dy = -thick + 1; dy < thick; dy++) {
        for (let dx = -thick + 1; dx < thick; dx++) {
          const xx = x + dx, yy = y + dy;
          if (xx < 0 || yy < 0 || xx >= w || yy >= h) continue;
          const i = (yy * w + xx) * 4;
          out.data[i] = 255; out.data[i + 1] = 230; out.data[i + 2] = 0; out.data[i + 3] = 255;
        }
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

// ------------------------------------------------------------------ threshold and verdicts
function thresholdOf(result) {
  const chosen = state.thresholds[result.model];
  return chosen !== undefined ? chosen : result.serverThreshold;
}

function verdictOf(result) {
  if (result.error) return "error";
  if (result.score === null) return "pending";
  return result.score > thresholdOf(result) ? "anomalous" : "normal";
}

function render(result) {
  const card = result.card;
  const verdict = verdictOf(result);
  card.className = "result " + (verdict === "error" ? "failed" : verdict);
  card.querySelector(".verdict").textContent = verdict === "pending" ? "scoring…" : verdict;
  if (result.score === null) {
    card.querySelector(".numbers").textContent = result.error || "";
    return;
  }
  const t = thresholdOf(result);
  const top = Math.max(2 * t, result.score) * 1.05;
  card.querySelector(".fill").style.width = `${(100 * result.score) / top}%`;
  card.querySelector(".mark").style.left = `${(100 * t) / top}%`;
  card.querySelector(".numbers").textContent =
    `score ${fmt(result.score)} vs threshold ${fmt(t)} · anomalous area ${(100 * result.area).toFixed(2)}% · ${result.model}`;
}

function renderAll() {
  state.results.forEach(render);
  const scored = state.results.filter((r) => r.score !== null);
  const bad = scored.filter((r) => verdictOf(r) === "anomalous").length;
  $("#summary").textContent = scored.length ? `${bad} anomalous of ${scored.length} scored` : "";
  $("#download-csv").disabled = !state.results.length;
}

function setupSlider() {
  const m = currentModel();
  const slider = $("#threshold");
  const usable = m && !m.error && m.threshold !== null && m.threshold !== undefined;
  slider.disabled = !usable;
  $("#reset-threshold").disabled = !usable;
  if (!usable) { $("#threshold-value").textContent = "–"; renderAll(); return; }
  const scores = state.results.filter((r) => r.model === m.name && r.score !== null).map((r) => r.score);
  const top = Math.max(2 * m.threshold, ...scores.map((s) => 1.1 * s));
  const value = state.thresholds[m.name] !== undefined ? state.thresholds[m.name] : m.threshold;
  slider.min = 0;
  slider.max = top;
  slider.step = top / 1000;
  slider.value = value;
  $("#threshold-value").textContent = fmt(value);
  renderAll();
}

function onSlide() {
  const m = currentModel();
  if (!m) return;
  state.thresholds[m.name] = Number($("#threshold").value);
  $("#threshold-value").textContent = fmt(state.thresholds[m.name]);
  renderAll();
}

function resetThreshold() {
  const m = currentModel();
  if (m) delete state.thresholds[m.name];
  setupSlider();
}

// ------------------------------------------------------------------ CSV
function csvCell(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function downloadCsv() {
  const header = ["file", "model", "score", "threshold", "verdict", "model_threshold", "anomalous_area", "error", "time"];
  const rows = state.results.map((r) => [r.file, r.model, r.score, r.score === null ? "" : thresholdOf(r),
    verdictOf(r), r.serverThreshold, r.area, r.error, r.time]);
  const text = [header, ...rows].map((row) => row.map(csvCell).join(",")).join("\n") + "\n";
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  link.download = "astfad-results.csv";
  document.body.append(link);
  link.click();
  link.remove();
}

// ------------------------------------------------------------------ wiring
function dropZone(zone, input, onFiles) {
  for (const type of ["dragenter", "dragover"]) zone.addEventListener(type, () => zone.classList.add("over"));
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("over"));
  input.addEventListener("change", () => onFiles([...input.files]));
}

async function start() {
  $("#api-key").value = apiKey();
  $("#api-key").addEventListener("change", () => {
    localStorage.setItem("astfad-api-key", $("#api-key").value);
    loadModels().catch((err) => say(err.message, true));
  });
  $("#model-select").addEventListener("change", (e) => chooseModel(e.target.value || null));
  $("#delete-model").addEventListener("click", deleteModel);
  $("#fit-form").addEventListener("submit", fitModel);
  dropZone($("#fit-drop"), $("#fit-files"), (files) => {
    $("#fit-count").textContent = `${files.length} image(s) chosen`;
  });
  dropZone($("#test-drop"), $("#test-files"), (files) => {
    inspect(files);
    $("#test-files").value = "";
  });
  $("#threshold").addEventListener("input", onSlide);
  $("#reset-threshold").addEventListener("click", resetThreshold);
  $("#download-csv").addEventListener("click", downloadCsv);
  try {
    const health = await api("/health");
    $("#server-status").textContent = `astfad ${health.version} · queue ${health.queue_depth}`;
    if (health.api_key_required) $("#key-box").hidden = false;
    await loadModels();
  } catch (err) {
    say(err.message, true);
  }
}

start();
