// alignd dashboard: plain JS, no build step, no dependencies. Talks to the same API as the CLI with the
// API key the user pastes (kept in sessionStorage, sent as "Authorization: Bearer" on every request).
"use strict";

const KEY = "alignd.apiKey";
const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const COLORS = ["#3056d3", "#c23434", "#1f8a4c", "#b7791f", "#7b3fc4", "#0f8a8a"];
// Chart panels: the first metric name a job reports in each list is drawn (all that it reports, in order).
const CHARTS = [
  { id: "loss", title: "Loss", names: ["loss", "eval/loss", "val/vf_loss"] },
  { id: "reward", title: "Reward", names: ["rewards/margins", "rewards/chosen", "rewards/rejected", "objective/scores"] },
  { id: "kl", title: "KL", names: ["objective/kl", "policy/approxkl"] },
];

let timer = null;          // the current page's poll timer
let pageToken = 0;         // bumped on every navigation, so stale polls stop

// --- tiny DOM helper ------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const app = () => $("#app");
function render(...nodes) { app().replaceChildren(...nodes); }

// --- API ------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status; this.param = error.param; this.code = error.code;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` },
  });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    route("Your API key was refused; paste a valid key.");
    throw new ApiError(401, { message: "invalid API key" });
  }
  if (!response.ok) {
    let error = { message: `HTTP ${response.status}` };
    try { error = (await response.json()).error || error; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, error);
  }
  return options.raw ? response : response.json();
}

async function download(path, filename) {
  const response = await api(path, { raw: true });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  return blob.size;
}

// --- formatting -----------------------------------------------------------------------------------------
const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "–");
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);
function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds >= 3600) return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
  if (seconds >= 60) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
  return `${seconds}s`;
}
function progressBar(progress, big) {
  const step = (progress && progress.step) || 0, total = progress && progress.total_steps;
  const pct = total ? Math.min(100, (100 * step) / total) : 0;
  return h("span", {},
    h("span", { class: big ? "bar big" : "bar" }, h("span", { style: `width:${pct}%` })),
    `${step}/${total || "?"}`);
}
function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(4);
}

// --- chart (inline SVG) ---------------------------------------------------------------------------------
function drawChart(container, series) {
  const W = 520, H = 200, L = 54, R = 10, T = 10, B = 24;
  const all = series.flatMap((s) => s.points);
  container.dataset.points = String(all.length);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  add("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafbfc", stroke: "#e3e6ec" });
  if (!all.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7385", "font-size": 13 }, "waiting for metrics…");
  } else {
    let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
    let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 0.5; y1 += Math.abs(y1) * 0.05 || 0.5; }
    const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      add("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#eef0f4" });
      add("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end", fill: "#6b7385", "font-size": 10 }, fmt(y));
    }
    add("text", { x: L, y: H - 6, fill: "#6b7385", "font-size": 10 }, `step ${x0}`);
    add("text", { x: W - R, y: H - 6, "text-anchor": "end", fill: "#6b7385", "font-size": 10 }, `step ${x1}`);
    series.forEach((s) => {
      if (!s.points.length) return;
      const pts = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      add("polyline", { points: pts, fill: "none", stroke: s.color, "stroke-width": 1.8, "vector-effect": "non-scaling-stroke",
        "data-series": s.name, "data-points": s.points.length });
      if (s.points.length === 1) add("circle", { cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.color });
    });
  }
  const legend = h("div", { class: "legend" },
    series.map((s) => h("span", {}, h("i", { style: `background:${s.color}` }), `${s.name} ${s.points.length ? fmt(s.points[s.points.length - 1][1]) : ""}`)));
  container.querySelector(".plot").replaceChildren(svg, legend);
}

// --- pages ----------------------------------------------------------------------------------------------
function loginPage(message) {
  $("#nav").hidden = true; $("#logout").hidden = true;
  const input = h("input", { id: "api-key", type: "password", placeholder: "sk-alignd-…", autocomplete: "off", required: true });
  const error = h("p", { class: "error", id: "login-error" }, message || "");
  const form = h("form", {
    id: "login-form",
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      try {
        await api("/v1/fine_tuning/jobs?limit=1");
        location.hash = location.hash && location.hash !== "#/login" ? location.hash : "#/";
        route();
      } catch (err) {
        if (err.status !== 401) error.textContent = err.message;
      }
    },
  }, input, h("button", { id: "login", class: "primary", type: "submit" }, "Log in"));
  render(h("div", { class: "card login" },
    h("h1", {}, "Log in to alignd"),
    h("p", { class: "muted" }, "Paste an API key (", h("code", {}, "alignd keys create --org ORG"),
      "). It stays in this tab's session storage and is sent as a Bearer token."),
    form, error));
  input.focus();
}

async function jobsPage(token) {
  const body = h("tbody", { id: "jobs-body" });
  render(h("h1", {}, "Fine-tuning jobs"),
    h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Model", "Progress", "Created", "Fine-tuned model"].map((t) => h("th", {}, t)))), body),
    h("p", { class: "muted", id: "jobs-note" }));
  const load = async () => {
    const list = await api("/v1/fine_tuning/jobs?limit=100");
    if (token !== pageToken) return;
    body.replaceChildren(...list.data.map((j) => h("tr", { "data-job": j.id },
      h("td", { class: "mono" }, h("a", { href: `#/jobs/${j.id}` }, j.id)),
      h("td", {}, badge(j.status)),
      h("td", {}, (j.method && j.method.type) || "–"),
      h("td", {}, j.model),
      h("td", {}, progressBar(j.progress)),
      h("td", {}, when(j.created_at)),
      h("td", { class: "mono" }, j.fine_tuned_model || "–"))));
    $("#jobs-note").textContent = list.data.length ? "" : "No jobs yet. Create one with `alignd jobs create` or POST /v1/fine_tuning/jobs.";
  };
  await poll(token, load);
}

async function jobPage(token, jobId) {
  const summary = h("div", { class: "summary", id: "job-summary" });
  const actions = h("div", { class: "actions" });
  const status = h("p", { class: "error", id: "job-error" });
  const charts = CHARTS.map((c) => h("div", { class: "card chart", id: `chart-${c.id}`, "data-points": "0" }, h("h3", {}, c.title), h("div", { class: "plot" })));
  const events = h("tbody", { id: "events-body" });
  const checkpoints = h("tbody", { id: "checkpoints-body" });
  render(
    h("p", {}, h("a", { href: "#/" }, "← all jobs")),
    h("h1", {}, "Job ", h("span", { class: "mono" }, jobId), " ", h("span", { id: "job-status" })),
    h("div", { class: "card" }, summary, actions, status),
    h("h2", {}, "Metrics"), h("div", { class: "charts" }, charts),
    h("h2", {}, "Events"), h("div", { class: "card events" }, h("table", { id: "events" }, events)),
    h("h2", {}, "Checkpoints"),
    h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Step", "Checkpoint", "Metrics", ""].map((t) => h("th", {}, t)))), checkpoints));

  const points = new Map();   // metric name -> Map(step -> value)
  let metricsFrom = 0, lastEvent = null, lastCkpt = -1, finalFetch = false, job = null;

  const act = (name) => async () => {
    try { job = await api(`/v1/fine_tuning/jobs/${jobId}/${name}`, { method: "POST" }); showJob(); }
    catch (err) { status.textContent = `${name} failed: ${err.message}`; }
  };
  const downloadButton = h("button", { id: "download-adapter", class: "primary", disabled: true, onclick: async () => {
    try { const n = await download(`/v1/fine_tuning/jobs/${jobId}/adapter`, `${jobId}-adapter.tar.gz`); status.textContent = ""; downloadButton.dataset.bytes = n; }
    catch (err) { status.textContent = `download failed: ${err.message}`; }
  } }, "Download adapter (.tar.gz)");
  const pause = h("button", { id: "pause", onclick: act("pause") }, "Pause");
  const resume = h("button", { id: "resume", onclick: act("resume") }, "Resume");
  const cancel = h("button", { id: "cancel", class: "danger", onclick: act("cancel") }, "Cancel");
  actions.append(downloadButton, pause, resume, cancel);

  function showJob() {
    const p = job.progress || {};
    $("#job-status").replaceChildren(badge(job.status));
    const eta = job.status === "running" && job.estimated_finish ? duration(job.estimated_finish - Date.now() / 1000) : "–";
    const hp = job.hyperparameters || {};
    const item = (label, ...value) => h("div", {}, h("b", {}, label), ...value);
    summary.replaceChildren(
      item("progress", progressBar(p, true)),
      item("ETA", eta),
      item("method", (job.method && job.method.type) || "–"),
      item("model", job.model),
      item("training file", h("span", { class: "mono" }, job.training_file)),
      item("created", when(job.created_at)),
      item("finished", when(job.finished_at)),
      item("trained tokens", job.trained_tokens ?? "–"),
      item("fine-tuned model", h("span", { class: "mono" }, job.fine_tuned_model || "–")),
      item("hyperparameters", h("span", { class: "mono" }, Object.entries(hp).filter(([, v]) => v !== null).map(([k, v]) => `${k}=${v}`).join(" "))));
    if (job.error) status.textContent = `${job.error.code}: ${job.error.message}`;
    downloadButton.disabled = job.status !== "succeeded";
    cancel.disabled = TERMINAL.has(job.status);
    pause.disabled = job.status !== "running";
    resume.disabled = job.status !== "paused";
  }

  function showCharts() {
    CHARTS.forEach((c, i) => {
      const names = c.names.filter((n) => points.has(n));
      const series = names.map((n, k) => ({
        name: n, color: COLORS[k % COLORS.length],
        points: [...points.get(n).entries()].sort((a, b) => a[0] - b[0]),
      }));
      drawChart(charts[i], series);
    });
  }

  const load = async () => {
    job = await api(`/v1/fine_tuning/jobs/${jobId}`);
    if (token !== pageToken) return;
    showJob();
    if (!finalFetch) {
      const m = await api(`/v1/fine_tuning/jobs/${jobId}/metrics?step_from=${metricsFrom}`);
      for (const p of m.data) {
        if (!points.has(p.name)) points.set(p.name, new Map());
        points.get(p.name).set(p.step, p.value);
        metricsFrom = Math.max(metricsFrom, p.step);
      }
      if (token !== pageToken) return;
      showCharts();
    }
    for (;;) {
      const qs = `order=asc&limit=200${lastEvent ? `&after=${lastEvent}` : ""}`;
      const ev = await api(`/v1/fine_tuning/jobs/${jobId}/events?${qs}`);
      if (token !== pageToken) return;
      for (const e of ev.data) {
        events.prepend(h("tr", { class: e.level, "data-type": e.type }, h("td", {}, when(e.created_at)), h("td", {}, e.level), h("td", {}, e.message)));
        lastEvent = e.id;
      }
      if (!ev.has_more) break;
    }
    if ((job.progress && job.progress.step) !== lastCkpt || TERMINAL.has(job.status)) {
      lastCkpt = job.progress && job.progress.step;
      const cks = await api(`/v1/fine_tuning/jobs/${jobId}/checkpoints?limit=100`);
      if (token !== pageToken) return;
      checkpoints.replaceChildren(...cks.data.map((c) => h("tr", {},
        h("td", {}, c.step_number),
        h("td", { class: "mono" }, c.fine_tuned_model_checkpoint),
        h("td", { class: "mono" }, Object.entries(c.metrics || {}).slice(0, 4).map(([k, v]) => `${k}=${fmt(v)}`).join(" ")),
        h("td", {}, h("button", { onclick: () => download(`/v1/fine_tuning/jobs/${jobId}/checkpoints/${c.id}/content`, `${jobId}-step-${c.step_number}.tar.gz`) }, "Download")))));
      if (!cks.data.length) checkpoints.replaceChildren(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "No checkpoints yet.")));
    }
    if (TERMINAL.has(job.status)) finalFetch = true;
  };
  await poll(token, load);
}

function analysisView(a) {
  if (!a) return h("p", { class: "muted" }, "No analysis.");
  const rec = a.recommendation || {};
  const rows = [
    ["format", `${a.format} (${a.variant})`], ["examples", a.examples],
    ["tokens (estimated)", `${a.tokens.total} total, ${a.tokens.mean_per_example} mean, ${a.tokens.max_per_example} max per example`],
    ["turns", `mean ${a.turns.mean}, max ${a.turns.max}, ${a.turns.multi_turn_examples} multi-turn`],
    ["duplicate prompts", `${a.duplicate_prompts.count} (${(100 * a.duplicate_prompts.share).toFixed(1)}%)`],
  ];
  const p = a.preference;
  if (p) rows.push(
    ["chosen longer", `${(100 * p.chosen_longer_share).toFixed(1)}% of pairs`],
    ["mean length ratio (chosen/rejected)", p.mean_length_ratio],
    ["identical prefix", `${(100 * p.identical_prefix_share).toFixed(1)}% (first ${p.prefix_words} words)`],
    ["near-duplicate pairs", `${p.near_duplicate_pairs} (Jaccard ≥ ${p.near_duplicate_threshold})`]);
  return h("div", {},
    h("table", {}, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))),
    h("h2", {}, "Recommendation: ", h("span", { id: "recommended-method" }, rec.method || "–")),
    h("ul", { class: "reasons" }, (rec.reasons || []).map((r) => h("li", {}, r))),
    (rec.warnings || []).map((w) => h("p", { class: "error" }, `⚠ ${w}`)));
}

async function filesPage(token) {
  const body = h("tbody", {});
  render(h("h1", {}, "Files"),
    h("table", { id: "files" }, h("thead", {}, h("tr", {}, ["File", "Name", "Status", "Format", "Examples", "Recommended", "Created"].map((t) => h("th", {}, t)))), body));
  const list = await api("/v1/files?limit=100");
  if (token !== pageToken) return;
  body.replaceChildren(...list.data.map((f) => h("tr", {},
    h("td", { class: "mono" }, h("a", { href: `#/files/${f.id}` }, f.id)), h("td", {}, f.filename), h("td", {}, badge(f.status)),
    h("td", {}, f.format || "–"), h("td", {}, f.examples),
    h("td", {}, (f.analysis && f.analysis.recommendation && f.analysis.recommendation.method) || "–"), h("td", {}, when(f.created_at)))));
}

async function filePage(token, fileId) {
  const f = await api(`/v1/files/${fileId}`);
  if (token !== pageToken) return;
  render(h("p", {}, h("a", { href: "#/files" }, "← all files")),
    h("h1", {}, f.filename, " ", badge(f.status)),
    f.status_details ? h("pre", { class: "error" }, f.status_details) : null,
    h("div", { class: "card" }, analysisView(f.analysis)));
}

// --- routing and polling --------------------------------------------------------------------------------
async function poll(token, load) {
  const tick = async () => {
    if (token !== pageToken) return;
    try { await load(); } catch (err) {
      if (err.status !== 401 && token === pageToken) {
        const note = $("#job-error") || $("#jobs-note");
        if (note) note.textContent = err.message;
      }
    }
    if (token === pageToken) timer = setTimeout(tick, POLL_MS);
  };
  await tick();
}

function route(message) {
  clearTimeout(timer);
  const token = ++pageToken;
  if (!sessionStorage.getItem(KEY)) return loginPage(message);
  $("#nav").hidden = false; $("#logout").hidden = false;
  const path = (location.hash || "#/").slice(1);
  let m;
  const fail = (err) => { if (err.status !== 401 && token === pageToken) render(h("p", { class: "error" }, err.message)); };
  if ((m = path.match(/^\/jobs\/([\w-]+)$/))) jobPage(token, m[1]).catch(fail);
  else if (path === "/files") filesPage(token).catch(fail);
  else if ((m = path.match(/^\/files\/([\w-]+)$/))) filePage(token, m[1]).catch(fail);
  else jobsPage(token).catch(fail);
}

$("#logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); location.hash = "#/"; route(); });
window.addEventListener("hashchange", () => route());
route();
