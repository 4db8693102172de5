// lowbit serve's page: plain JS against the same server's OpenAI-style API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, models: [], compare: null };
const MAX_SIDE = 768; // images are downscaled in the browser: smaller requests, the model resizes anyway

function fmtBytes(n) {
  if (!n && n !== 0) return "?";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(n >= 10 || i === 0 ? 0 : 1)} ${units[i]}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The models a panel asks: the --compare pair when it is of this kind, else the first model of the kind.
function targets(kind) {
  const ofKind = state.models.filter((m) => m.lowbit.kind === kind);
  if (state.compare && state.compare.every((id) => ofKind.some((m) => m.id === id))) {
    return state.compare.map((id) => ofKind.find((m) => m.id === id));
  }
  return ofKind.slice(0, 1);
}

async function init() {
  const [models, health] = await Promise.all([fetch("/v1/models").then((r) => r.json()),
                                              fetch("/health").then((r) => r.json())]);
  state.models = models.data;
  state.compare = health.compare;
  $("models").textContent = state.models.map((m) => `${m.id} (${m.lowbit.kind}, ${fmtBytes(m.lowbit.bytes)})`)
    .join(" · ");
  $("chat-card").hidden = targets("generative").length === 0;
  $("classify-card").hidden = targets("dual-encoder").length === 0;
  if (!$("chat-card").hidden && !$("classify-card").hidden) $("classify-title").textContent = "3. Labels";
}

function loadFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, MAX_SIDE / Math.max(img.width, img.height));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.width * scale));
      canvas.height = Math.max(1, Math.round(img.height * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      state.image = canvas.toDataURL("image/png");
      $("preview").src = state.image;
      $("preview").hidden = false;
      $("drop-text").textContent = `${file.name} (${img.width}×${img.height}) · drop or tap to change`;
      showError("");
    };
    img.onerror = () => showError(`cannot read ${file.name} as an image`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function pane(parent, model) {
  const div = document.createElement("div");
  div.className = "pane";
  div.innerHTML = `<h3></h3><div class="body"></div><div class="stats"></div>`;
  div.querySelector("h3").textContent = `${model.id} · ${fmtBytes(model.lowbit.bytes)}`;
  parent.appendChild(div);
  return div;
}

function setStats(div, items) {
  div.querySelector(".stats").innerHTML = items.map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? `${body.error.message} (${body.error.code})` : `HTTP ${response.status}`;
  } catch { return `HTTP ${response.status}`; }
}

// One streamed chat completion into a pane: text as it comes, time to first token, tokens/s, latency.
async function ask(model, question, div) {
  const answer = document.createElement("div");
  answer.className = "answer";
  div.querySelector(".body").appendChild(answer);
  const t0 = performance.now();
  let first = null;
  let usage = null;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: model.id, stream: true, stream_options: { include_usage: true },
      messages: [{ role: "user", content: [{ type: "text", text: question },
                                           { type: "image_url", image_url: { url: state.image } }] }] }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(`${chunk.error.message} (${chunk.error.code})`);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
      if (piece) {
        if (first === null) first = performance.now();
        answer.textContent += piece;
        setStats(div, [["first token", `${((first - t0) / 1000).toFixed(2)} s`]]);
      }
    }
  }
  const end = performance.now();
  const n = usage ? usage.completion_tokens : 0;
  const decode = first === null ? 0 : (end - first) / 1000;
  setStats(div, [
    ["first token", first === null ? "–" : `${((first - t0) / 1000).toFixed(2)} s`],
    ["tokens/s", n > 1 && decode > 0 ? ((n - 1) / decode).toFixed(1) : "–"],
    ["tokens", String(n)],
    ["latency", `${((end - t0) / 1000).toFixed(2)} s`],
    ["weights", fmtBytes(model.lowbit.bytes)],
  ]);
  div.dataset.done = "1";
}

async function classify(model, labels, div) {
  const t0 = performance.now();
  const response = await fetch("/v1/classify", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model: model.id, image: state.image, labels }),
  });
  if (!response.ok) throw new Error(await errorText(response));
  const result = await response.json();
  const end = performance.now();
  const best = Math.max(...result.labels.map((x) => x.probability));
  const bars = document.createElement("div");
  bars.className = "bars";
  for (const { label, probability } of result.labels) {
    const name = document.createElement("span");
    name.textContent = label;
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = probability === best ? "bar top" : "bar";
    bar.style.width = `${(100 * probability).toFixed(1)}%`;
    track.appendChild(bar);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * probability).toFixed(1)}%`;
    bars.append(name, track, pct);
  }
  div.querySelector(".body").appendChild(bars);
  setStats(div, [["top", result.label], ["latency", `${((end - t0) / 1000).toFixed(3)} s`],
                 ["weights", fmtBytes(model.lowbit.bytes)]]);
  div.dataset.done = "1";
}

async function run(button, container, kind, work) {
  if (!state.image) { showError("pick an image first"); return; }
  showError("");
  button.disabled = true;
  container.innerHTML = "";
  try {
    await Promise.all(targets(kind).map((model) => work(model, pane(container, model))));
  } catch (err) {
    showError(String(err.message || err));
  } finally {
    button.disabled = false;
  }
}

$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  loadFile(e.dataTransfer.files[0]);
});
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question) { showError("type a question"); return; }
  run($("ask"), $("answers"), "generative", (model, div) => ask(model, question, div));
});
$("classify-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (!labels.length) { showError("type at least one label"); return; }
  run($("classify"), $("charts"), "dual-encoder", (model, div) => classify(model, labels, div));
});
init().catch((err) => showError(`cannot reach the server: ${err}`));
