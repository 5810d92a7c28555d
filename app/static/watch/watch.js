// The watch page's script (app/templates/watch.html, served at /jobs/<id>/watch; this file at
// /static/watch/watch.js). Self-contained: no CDN, the server may be offline. The relative URLs
// ("stream", "checkpoints") resolve against the page, /jobs/<id>/watch, not against this file, so
// the page works behind a path prefix too.
"use strict";
const JOB_ID = Number(document.documentElement.dataset.jobId), NS = "http://www.w3.org/2000/svg", FINISHED = ["succeeded", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);
const logs = [];
let lastStep = null, lastEventId = null, finished = false, drawPending = false, method = "sft";
// Each method's own figures (TRL's names, in the step logs' method_metrics): shown beside the loss,
// and charted.
const METHOD_FIGURES = {
  dpo: {title: "Rewards (DPO)", names: ["rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"]},
  orpo: {title: "Rewards (ORPO)", names: ["rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss"]},
  kto: {title: "Rewards (KTO)", names: ["rewards/margins", "kl", "rewards/chosen", "rewards/rejected"]},
  grpo: {title: "Reward (GRPO)", names: ["reward", "reward_std", "kl", "completions/mean_length"]},
};
const COLORS = ["#7c3aed", "#0891b2", "#db2777", "#65a30d"];

function num(v) {
  if (v == null) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}
const gib = (v) => (v == null ? "–" : v.toFixed(1) + " GiB");
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function duration(s) {
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}
function node(tag, attrs, text, ns) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}
const svgNode = (tag, attrs, text) => node(tag, attrs, text, NS);

function showJob(job) {
  const p = job.progress, m = job.metrics, v = job.vram;
  const cancelling = job.cancel_requested && job.status === "running";
  const phase = job.phase && job.phase !== "training" ? `: ${job.phase.replace("_", " ")}` : "";
  $("status").textContent = job.status + phase + (cancelling ? " (cancelling)" : "");
  $("status").className = job.status;
  $("model").textContent = `${job.spec.model} on ${job.spec.dataset.source}`
    + (job.backend ? ` · ${job.backend}` : "");
  $("bar").style.width = (p.percent || 0) + "%";
  const parts = [`step ${p.step}` + (p.total_steps ? ` / ${p.total_steps}` : "")];
  if (p.percent != null) parts.push(p.percent.toFixed(1) + " %");
  if (p.epoch != null) parts.push(`epoch ${p.epoch.toFixed(2)}`);
  if (p.eta_seconds != null && job.status === "running") parts.push(`ETA ${duration(p.eta_seconds)}`);
  $("progress").textContent = parts.join(" · ");
  $("error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("loss").textContent = num(m.loss);
  $("eval").textContent = m.eval_loss == null ? "–" : `${num(m.eval_loss)} (step ${m.eval_step})`;
  $("lr").textContent = num(m.learning_rate);
  $("gn").textContent = num(m.grad_norm);
  $("tps").textContent = m.tokens_per_second == null ? "–" : Math.round(m.tokens_per_second);
  $("alloc").textContent = gib(v.allocated_gib);
  $("peak").textContent = gib(v.peak_allocated_gib);
  $("device").textContent = `${gib(v.device_used_gib)} / ${gib(v.device_total_gib)}`;
  showMethod(job, m.method_metrics || {});
  if (FINISHED.includes(job.status) && !finished) {
    finished = true;  // the server ends the stream itself, after this poll's logs and events
    loadCheckpoints();
    scheduleDraw();  // empty charts now say "no data", not "yet"
  }
}

function showMethod(job, figures) {
  method = job.spec.method || "sft";
  const known = METHOD_FIGURES[method];
  if (!known) return;
  $("method-section").hidden = false;
  $("method-figures").hidden = false;
  $("method-title").textContent = known.title;
  const trainer = job.trainer ? ` · ${job.trainer.trainer_class} (${job.trainer.path})` : "";
  $("model").textContent += ` · ${method}${trainer}`;
  $("method-figures").replaceChildren(...known.names.map((name) => {
    const cell = node("div", {}, name);
    cell.append(node("b", {}, num(figures[name])));
    return cell;
  }));
}

// The y axis of a chart: where a value sits, from 0 (bottom) to 1 (top), and the values to label.
// "log": a loss falls by orders of magnitude in a run's first steps and then by hundredths, which a
// linear axis flattens into a line; train and eval loss share it (one unit). Values of 0 or less
// cannot be drawn on it: then the axis is linear. "zero": linear from 0; "data": linear, min to max.
function yAxis(values, kind) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (kind === "log" && lo > 0) {
    const a = Math.log10(lo), b = Math.max(Math.log10(hi), a + 1e-3);
    const at = (v) => (Math.log10(v) - a) / (b - a);
    // The ends, and 1-2-5 values between them (over several decades, the powers of ten alone),
    // each at least a tenth of the height from the next.
    let inner = [];
    for (let e = Math.floor(a); e <= Math.ceil(b); e++) {
      for (const m of [1, 2, 5]) inner.push(+(m * 10 ** e).toPrecision(12));
    }
    inner = inner.filter((t) => t > lo && t < hi);
    if (inner.length > 6) inner = inner.filter((t) => Math.abs(Math.log10(t) % 1) < 1e-9);
    const ticks = [lo];
    for (const t of [...inner, hi]) {
      if (at(t) - at(ticks[ticks.length - 1]) >= 0.1) ticks.push(t);
      else if (t === hi) ticks[ticks.length - 1] = hi;
    }
    return {log: true, ticks, at};
  }
  if (kind === "zero") lo = 0;
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  return {log: false, ticks: [lo, hi], at: (v) => (v - lo) / (hi - lo)};
}

// series: [{label, color, dots?, points: [[step, value], ...]}]; axis: "log", "zero" or "data" (yAxis);
// draws axes, labelled ticks, polylines.
function chart(svg, series, axis, emptyText) {
  const W = 600, H = 180, L = 52, R = 10, T = 10, B = 22;
  svg.replaceChildren();
  const pts = series.flatMap((s) => s.points);
  const middle = {x: W / 2, y: H / 2, "text-anchor": "middle"};
  if (!pts.length) return svg.append(svgNode("text", middle, emptyText));
  const lo = (i) => pts.reduce((a, p) => Math.min(a, p[i]), Infinity);
  const hi = (i) => pts.reduce((a, p) => Math.max(a, p[i]), -Infinity);
  const x0 = lo(0), x1 = Math.max(hi(0), x0 + 1);
  const y = yAxis(pts.map((p) => p[1]), axis);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => H - B - y.at(v) * (H - T - B);
  const axes = `${L},${T} ${L},${H - B} ${W - R},${H - B}`;
  svg.append(svgNode("polyline", {points: axes, fill: "none", stroke: "#aaa"}));
  for (const t of y.ticks) {
    const at = sy(t);
    if (y.log) svg.append(svgNode("line", {x1: L, x2: W - R, y1: at.toFixed(1), y2: at.toFixed(1), stroke: "#eee"}));
    svg.append(svgNode("text", {x: L - 4, y: Math.min(Math.max(at + 4, T + 8), H - B), "text-anchor": "end"}, num(t)));
  }
  svg.append(svgNode("text", {x: L, y: H - 6}, `step ${x0}`));
  svg.append(svgNode("text", {x: W - R, y: H - 6, "text-anchor": "end"}, `step ${hi(0)}`));
  series.forEach((s, i) => {
    const line = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(svgNode("polyline", {points: line, fill: "none", stroke: s.color, "stroke-width": 1.5}));
    // Sparse series (an evaluation every few hundred steps) also get a dot per point.
    if (s.dots) s.points.forEach((p) => svg.append(svgNode("circle", {cx: sx(p[0]).toFixed(1),
      cy: sy(p[1]).toFixed(1), r: 3, fill: s.color})));
    const legend = {x: W - R - 4, y: T + 10 + 14 * i, "text-anchor": "end", style: `fill:${s.color}`};
    svg.append(svgNode("text", legend, s.label));
  });
  if (y.log) svg.append(svgNode("text", {x: W - R - 4, y: T + 10 + 14 * series.length, "text-anchor": "end"}, "log scale"));
}
function pointsOf(pick) {
  return logs.filter((r) => pick(r) != null).map((r) => [r.step, pick(r)]);
}
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    const empty = finished ? "no data" : "no data yet";
    chart($("loss-chart"), [
      {label: "loss", color: "#3b82f6", points: pointsOf((r) => r.loss)},
      {label: "eval loss", color: "#f59e0b", dots: true, points: pointsOf((r) => r.eval_loss)},
    ], "log", empty);
    const known = METHOD_FIGURES[method];
    if (known) {
      // Lengths are in tokens, on another scale: the chart holds the method's first three figures,
      // on a linear axis (margins and rewards go below zero).
      chart($("method-chart"), known.names.slice(0, 3).map((name, i) => (
        {label: name, color: COLORS[i], points: pointsOf((r) => (r.method_metrics || {})[name])}
      )), "data", empty);
    }
    // Step logs without memory figures come from a run on the CPU: say so, not "yet".
    chart($("vram-chart"), [
      {label: "device used (NVML)", color: "#dc2626", points: pointsOf((r) => r.vram.device_used_gib)},
      {label: "allocated (torch)", color: "#16a34a", points: pointsOf((r) => r.vram.allocated_gib)},
    ], "zero", logs.length ? "no GPU memory figures: this job trains on the CPU" : empty);
  });
}

function addEvent(ev) {
  const li = node("li", {}, `${new Date(ev.created_at).toLocaleString()}  ${ev.kind}: ${ev.message}`);
  $("events").prepend(li);
}
async function loadCheckpoints() {
  const r = await fetch("checkpoints");
  if (!r.ok) return;
  const items = (await r.json()).items.map((cp) => {
    const li = node("li", {}, `${cp.name} (step ${cp.step}, ${bytes(cp.size)}, ${cp.status}) `);
    li.append(node("a", {href: cp.archive_url}, "download .tar"));
    const files = node("details");
    files.append(node("summary", {}, `files (${cp.files.length})`));
    for (const f of cp.files) {
      const row = node("div");
      row.append(node("a", {href: f.url}, f.path), ` ${bytes(f.size)}`);
      files.append(row);
    }
    li.append(files);
    return li;
  });
  $("checkpoints").replaceChildren(...(items.length ? items : [node("li", {class: "muted"}, "none yet")]));
}

// Reconnects itself with after_step / after_event_id, so nothing is shown twice.
function connect() {
  const q = new URLSearchParams();
  if (lastStep != null) q.set("after_step", lastStep);
  if (lastEventId != null) q.set("after_event_id", lastEventId);
  const source = new EventSource("stream" + (q.toString() ? "?" + q : ""));
  source.addEventListener("job", (e) => showJob(JSON.parse(e.data)));
  source.addEventListener("log", (e) => {
    const row = JSON.parse(e.data);
    lastStep = row.step;
    logs.push(row);
    scheduleDraw();
  });
  source.addEventListener("event", (e) => {
    const ev = JSON.parse(e.data);
    lastEventId = ev.id;
    addEvent(ev);
    if (ev.kind.startsWith("checkpoint")) loadCheckpoints();
  });
  source.onerror = () => {
    source.close();  // the browser would otherwise reconnect by itself and replay everything
    if (!finished) setTimeout(connect, 3000);
  };
}
scheduleDraw();
loadCheckpoints();
connect();
