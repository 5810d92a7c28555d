// The jobs dashboard's script (app/templates/dashboard.html, served at /watch; this file at
// /static/dashboard/dashboard.js): the jobs with their status, progress, a loss sparkline,
// tokens/s, GPUs and owner, filters, and a compare view of several jobs' loss and eval-loss
// curves on one chart. Self-contained (no CDN: the server may be offline). Its URLs ("jobs",
// "jobs/<id>/logs") are relative to the page, so it works behind a path prefix too.
"use strict";
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
const FIELDS = "id,status,created_at,project,submitted_by,spec,progress,metrics,placement";
const SPARKLINES_AT_ONCE = 6;
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const logsOf = new Map(); // job id -> its step logs

function node(tag, attrs, text, ns) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}
const svgNode = (tag, attrs, text) => node(tag, attrs, text, NS);
function num(v) {
  if (v == null) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}
async function getJSON(url) {
  const r = await fetch(url, {headers: {Accept: "application/json"}});
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.text()).slice(0, 200)}`);
  return r.json();
}
async function logs(id) {
  if (!logsOf.has(id)) logsOf.set(id, getJSON(`jobs/${id}/logs?limit=5000`).then((page) => page.items));
  return logsOf.get(id);
}

// (x, y) points -> an SVG path in a box, y up; null values break the line.
function path(points, box, xs, ys) {
  let d = "", pen = false;
  for (const [x, y] of points) {
    if (y == null || !isFinite(y)) { pen = false; continue; }
    const px = box.x + ((x - xs[0]) / (xs[1] - xs[0] || 1)) * box.w;
    const py = box.y + box.h - ((y - ys[0]) / (ys[1] - ys[0] || 1)) * box.h;
    d += (pen ? "L" : "M") + px.toFixed(1) + "," + py.toFixed(1);
    pen = true;
  }
  return d;
}
const range = (values) => {
  const v = values.filter((x) => x != null && isFinite(x));
  return v.length ? [Math.min(...v), Math.max(...v)] : [0, 1];
};

function sparkline(svg, rows) {
  const points = rows.filter((r) => r.loss != null).map((r) => [r.step, r.loss]);
  svg.replaceChildren();
  if (points.length < 2) { svg.append(svgNode("text", {x: 2, y: 18}, points.length ? num(points[0][1]) : "–")); return; }
  svg.append(svgNode("path", {d: path(points, {x: 1, y: 2, w: 118, h: 24}, range(points.map((p) => p[0])), range(points.map((p) => p[1]))),
    fill: "none", stroke: "#2563eb", "stroke-width": 1.5, class: "spark-line"}));
}

function row(job, selected) {
  const p = job.progress, m = job.metrics || {};
  const tr = node("tr", {"data-job": job.id});
  const box = node("input", {type: "checkbox", class: "pick", value: job.id});
  box.checked = selected.has(job.id);
  box.addEventListener("change", pickChanged);
  const bar = node("div", {class: "bar"});
  bar.append(node("div", {style: `width:${p.percent || 0}%`}));
  const progress = node("td");
  progress.append(bar, node("span", {class: "muted"}, `${p.step}` + (p.total_steps ? ` / ${p.total_steps}` : "")));
  const spark = svgNode("svg", {class: "spark", viewBox: "0 0 120 28"});
  const loss = node("td");
  loss.append(spark, node("span", {class: "loss"}, num(m.loss)));
  const gpus = job.placement && job.placement.gpus ? job.placement.gpus.length : job.spec.gpus || 1;
  const link = node("a", {href: `jobs/${job.id}/watch`}, `#${job.id}`);
  const cells = [
    box, link, node("span", {class: job.status}, job.status), null, null,
    m.tokens_per_second == null ? "–" : Math.round(m.tokens_per_second).toLocaleString(), String(gpus),
    job.project + (job.submitted_by ? ` / ${job.submitted_by}` : ""), job.spec.model || "", (job.created_at || "").slice(0, 16).replace("T", " "),
  ];
  cells.forEach((c, i) => {
    if (i === 3) return tr.append(progress);
    if (i === 4) return tr.append(loss);
    const td = node("td", i === 5 || i === 6 ? {class: "num"} : {});
    if (c instanceof Node) td.append(c); else td.textContent = c;
    tr.append(td);
  });
  return {tr, spark};
}

function selectedIds() {
  return new Set((params.get("compare") || "").split(",").filter(Boolean).map(Number));
}
function pickChanged() {
  const picked = [...document.querySelectorAll("input.pick:checked")].map((b) => b.value);
  $("compare-button").disabled = picked.length < 2;
}

async function load() {
  const status = $("f-status").value, project = $("f-project").value.trim().toLowerCase();
  const text = $("f-text").value.trim().toLowerCase();
  const q = new URLSearchParams({limit: "200", fields: FIELDS});
  if (status) q.set("status", status);
  const page = await getJSON("jobs?" + q);
  const jobs = page.items.filter((j) => (!project || (j.project || "").toLowerCase() === project)
    && (!text || [j.spec.model, j.submitted_by || "", j.project].join(" ").toLowerCase().includes(text)));
  const tbody = document.querySelector("#jobs tbody"), selected = selectedIds();
  tbody.replaceChildren();
  const sparks = [];
  for (const job of jobs) {
    const {tr, spark} = row(job, selected);
    tbody.append(tr);
    sparks.push([job.id, spark]);
  }
  $("empty").hidden = jobs.length > 0;
  pickChanged();
  // A few log reads at a time: a page of many jobs must not open a request per job at once.
  for (let i = 0; i < sparks.length; i += SPARKLINES_AT_ONCE) {
    await Promise.all(sparks.slice(i, i + SPARKLINES_AT_ONCE).map(async ([id, svg]) => sparkline(svg, await logs(id))));
  }
  $("state").textContent = `${jobs.length} of ${page.items.length}` + (page.next_cursor ? "+" : "") + " jobs";
  document.body.dataset.loaded = "true";
}

async function compare(ids) {
  const section = $("compare"), svg = $("compare-chart"), legend = $("legend");
  section.hidden = false;
  $("compare-title").textContent = ids.map((id) => `#${id}`).join(", ");
  const series = await Promise.all(ids.map(async (id) => [id, await logs(id)]));
  const box = {x: 48, y: 12, w: 656, h: 210};
  const all = series.flatMap(([, rows]) => rows);
  const xs = range(all.map((r) => r.step));
  const ys = range(all.flatMap((r) => [r.loss, r.eval_loss]));
  svg.replaceChildren();
  for (let i = 0; i <= 4; i++) {
    const y = ys[0] + ((ys[1] - ys[0]) * i) / 4, py = box.y + box.h - (box.h * i) / 4;
    svg.append(svgNode("line", {x1: box.x, x2: box.x + box.w, y1: py, y2: py, stroke: "#e5e5e5"}));
    svg.append(svgNode("text", {x: 4, y: py + 4}, num(y)));
  }
  svg.append(svgNode("text", {x: box.x, y: 252}, `step ${xs[0]}`));
  svg.append(svgNode("text", {x: box.x + box.w - 60, y: 252}, `step ${xs[1]}`));
  legend.replaceChildren();
  series.forEach(([id, rows], i) => {
    const color = COLORS[i % COLORS.length];
    const train = rows.map((r) => [r.step, r.loss]), evals = rows.filter((r) => r.eval_loss != null).map((r) => [r.step, r.eval_loss]);
    svg.append(svgNode("path", {d: path(train, box, xs, ys), fill: "none", stroke: color, "stroke-width": 2, class: "loss-line", "data-job": id}));
    if (evals.length) {
      svg.append(svgNode("path", {d: path(evals, box, xs, ys), fill: "none", stroke: color, "stroke-width": 2,
        "stroke-dasharray": "5,4", class: "eval-line", "data-job": id}));
    }
    const item = node("span", {"data-job": id});
    item.append(node("i", {style: `background:${color}`}), `#${id} loss` + (evals.length ? " (dashed: eval loss)" : ""));
    legend.append(item);
  });
  document.body.dataset.compared = ids.join(",");
}

for (const id of ["f-status", "f-project", "f-text"]) {
  const value = params.get(id.slice(2));
  if (value) $(id).value = value;
  $(id).addEventListener("change", () => load().catch(showError));
}
$("compare-button").addEventListener("click", () => {
  const ids = [...document.querySelectorAll("input.pick:checked")].map((b) => b.value);
  const url = new URL(location.href);
  url.searchParams.set("compare", ids.join(","));
  history.replaceState(null, "", url);
  compare(ids.map(Number)).catch(showError);
});
function showError(err) {
  $("state").textContent = String(err.message || err);
  $("state").className = "failed";
  document.body.dataset.error = String(err.message || err);
}
load().then(() => {
  const ids = [...selectedIds()];
  if (ids.length >= 2) return compare(ids);
}).catch(showError);
