// lmlab studio: what every page shares (navigation, calls to the server, run menus, plots).
"use strict";

const PAGES = [["descent", "Descent"], ["next", "Next token"], ["loss", "Loss"],
               ["training", "Training"], ["rank", "Rank"], ["chat", "Chat"], ["embeddings", "Embeddings"]];

function $(id) { return document.getElementById(id); }

function drawNav() {
  const nav = document.createElement("nav");
  const here = location.pathname.replace(/^\//, "");
  nav.innerHTML = '<a class="brand" href="/">lmlab studio</a>' + PAGES.map(([p, t]) =>
    `<a href="/${p}" class="${p === here ? "here" : ""}">${t}</a>`).join("");
  document.body.prepend(nav);
}

// GET when body is undefined, else POST the body as JSON; the server's {"error"} becomes an Error.
async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const res = await fetch(path, init);
  let data;
  try { data = await res.json(); } catch (e) { data = {error: `the server answered ${res.status}`}; }
  if (!res.ok) throw new Error(data.error || `the server answered ${res.status}`);
  return data;
}

function showError(el, err) { el.textContent = err ? String(err.message || err) : ""; }

// Fill a <select> with the studio's runs (keep(run) filters); resolves to the runs listed.
async function fillRuns(select, keep, preferred) {
  const {runs} = await api("/api/runs");
  const shown = runs.filter(keep || (() => true));
  select.innerHTML = shown.map(r => `<option value="${r.index}">${escapeHtml(r.name)}` +
                               `${r.stage ? " (" + r.stage + ")" : ""}</option>`).join("");
  if (preferred !== undefined && shown.length > preferred) select.selectedIndex = preferred;
  return shown;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

// A visible form of a token: spaces and newlines shown as marks.
function tokenLabel(s) { return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

function fmt(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "\u2013";
  const a = Math.abs(v);
  return (a !== 0 && (a < 1e-3 || a >= 1e5)) ? v.toExponential(2) : v.toFixed(digits === undefined ? 4 : digits);
}

// A canvas with axes for x/y data. plot.map(x, y) -> pixels; plot.line(xs, ys, colour); plot.dot(...).
function makePlot(canvas, box, opts) {
  opts = opts || {};
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 360;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const m = {l: 74, r: 26, t: 14, b: 40};
  const logY = !!opts.logY;
  const ty = v => logY ? Math.log10(Math.max(v, 1e-300)) : v;
  let [x0, x1, y0, y1] = box;
  if (logY) { y0 = ty(y0); y1 = ty(y1); }
  if (x1 === x0) { x1 = x0 + 1; } if (y1 === y0) { y1 = y0 + 1; }
  const X = x => m.l + (x - x0) / (x1 - x0) * (w - m.l - m.r);
  const Y = y => h - m.b - (ty(y) - y0) / (y1 - y0) * (h - m.t - m.b);
  ctx.strokeStyle = "#b7bfcc"; ctx.fillStyle = "#687083"; ctx.lineWidth = 1;
  ctx.font = "12px system-ui, sans-serif";
  ctx.strokeRect(m.l, m.t, w - m.l - m.r, h - m.t - m.b);
  const digits = span => span >= 50 ? 0 : span >= 5 ? 1 : 2;  // ticks as precise as the range needs
  for (let i = 0; i <= 5; i++) {
    const xv = x0 + (x1 - x0) * i / 5, yv = y0 + (y1 - y0) * i / 5;
    ctx.textAlign = "center"; ctx.fillText(fmt(xv, digits(x1 - x0)), X(xv), h - m.b + 16);
    ctx.textAlign = "right";
    const py = h - m.b - i / 5 * (h - m.t - m.b);
    ctx.fillText(logY ? Math.pow(10, yv).toPrecision(2) : fmt(yv, digits(y1 - y0)), m.l - 6, py + 4);
    ctx.beginPath(); ctx.strokeStyle = "#eef1f6"; ctx.moveTo(m.l + 1, py); ctx.lineTo(w - m.r - 1, py); ctx.stroke();
  }
  ctx.textAlign = "center"; ctx.fillStyle = "#1d2330";
  if (opts.xLabel) ctx.fillText(opts.xLabel, (m.l + w - m.r) / 2, h - 6);
  if (opts.yLabel) { ctx.save(); ctx.translate(12, (m.t + h - m.b) / 2); ctx.rotate(-Math.PI / 2);
                     ctx.fillText(opts.yLabel, 0, 0); ctx.restore(); }
  const inside = (x, y) => isFinite(x) && isFinite(y) && x >= x0 - 1e-9 && x <= x1 + 1e-9;
  return {
    ctx, X, Y, w, h, m,
    unX: px => x0 + (px - m.l) / (w - m.l - m.r) * (x1 - x0),
    line(xs, ys, colour, width, dots) {
      ctx.save(); ctx.beginPath(); ctx.rect(m.l, m.t, w - m.l - m.r, h - m.t - m.b); ctx.clip();
      ctx.strokeStyle = colour; ctx.fillStyle = colour; ctx.lineWidth = width || 2; ctx.beginPath();
      let started = false;
      xs.forEach((x, i) => { if (!inside(x, ys[i])) return;
        if (started) ctx.lineTo(X(x), Y(ys[i])); else { ctx.moveTo(X(x), Y(ys[i])); started = true; } });
      ctx.stroke();
      if (dots) xs.forEach((x, i) => { if (inside(x, ys[i])) { ctx.beginPath(); ctx.arc(X(x), Y(ys[i]), dots, 0, 7); ctx.fill(); } });
      ctx.restore();
    },
    dot(x, y, colour, r) {
      if (!inside(x, y)) return;
      ctx.fillStyle = colour; ctx.beginPath(); ctx.arc(X(x), Y(y), r || 6, 0, 7); ctx.fill();
    },
    text(x, y, s, colour) { ctx.fillStyle = colour || "#1d2330"; ctx.textAlign = "left"; ctx.fillText(s, X(x) + 5, Y(y) - 5); },
  };
}

function extent(values, pad) {
  const v = values.filter(isFinite);
  if (!v.length) return [0, 1];
  let lo = Math.min(...v), hi = Math.max(...v);
  const p = (hi - lo) * (pad === undefined ? 0.05 : pad) || Math.abs(hi) * 0.1 || 1;
  return [lo - p, hi + p];
}

document.addEventListener("DOMContentLoaded", drawNav);
