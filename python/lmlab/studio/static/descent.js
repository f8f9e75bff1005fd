// Descent page: the server computes the path (lmlab.demo_descent); this page reveals it step by step.
"use strict";
let path = null, k = 0, timer = null, request = 0;

async function load() {
  $("start-out").textContent = (+$("start").value).toFixed(2);
  $("lr-out").textContent = (+$("lr").value).toFixed(3);
  const q = new URLSearchParams({function: $("function").value, method: $("method").value,
                                 start: $("start").value, lr: $("lr").value, steps: 100});
  const mine = ++request;
  $("k").textContent = "…";  // the step count of a path still on its way
  try {
    const data = await api("/api/descent?" + q);
    if (mine !== request) return;  // a newer setting is on its way
    path = data; k = 0; showError($("error"));
    draw();
  } catch (e) {
    if (mine !== request) return;
    showError($("error"), e);
    draw();  // the last path stays, with its step count
  }
}

function draw() {
  if (!path) return;
  const xs = path.xs.slice(0, k + 1), ls = path.losses.slice(0, k + 1);
  const cy = path.curve.y;
  const [y0, y1] = extent(cy.concat(ls.filter(v => Math.abs(v) < 1e6)));
  const p = makePlot($("curve"), [path.curve.x[0], path.curve.x[path.curve.x.length - 1], y0, y1],
                     {xLabel: "x (the parameter)", yLabel: path.label});
  p.line(path.curve.x, cy, "#9aa3b5", 2);
  p.line(xs, ls, "#d9482b", 1.5, 3.5);
  p.dot(path.xs[0], path.losses[0], "#1d2330", 5);
  p.dot(xs[k], ls[k], "#2f6fdf", 8);
  const all = path.losses.filter(v => isFinite(v) && Math.abs(v) < 1e12);
  const positive = all.every(v => v > 0);
  // a log axis spans at most 8 decades below the largest loss, so the first steps stay readable
  const [l0, l1] = positive ? [Math.max(Math.min(...all) * 0.8, Math.max(...all) * 1e-8), Math.max(...all) * 1.5]
                            : extent(all);
  const q = makePlot($("loss"), [0, Math.max(1, path.xs.length - 1), l0, l1],
                     {xLabel: "step", yLabel: "loss f(x)" + (positive ? " (log scale)" : ""), logY: positive});
  q.line(ls.map((_, i) => i), ls, "#2f6fdf", 2, 3);
  $("k").textContent = k;
  $("x").textContent = fmt(path.xs[k]);
  $("slope").textContent = fmt(path.slopes[k]);
  $("fx").textContent = fmt(path.losses[k]);
  $("regime").textContent = k === path.xs.length - 1 ? (path.regime || "") +
    (path.diverged ? " (left every chart: stopped)" : "") : "";
  const rows = [];
  for (let i = Math.max(0, k - 7); i <= k; i++) {
    // the step taken from x_i (on its row, beside the slope there: −lr × slope for plain descent);
    // none yet from the current point
    const taken = i < k ? path.xs[i + 1] - path.xs[i] : null;
    rows.push(`<tr><td>${i}</td><td>${fmt(path.xs[i])}</td><td>${fmt(path.slopes[i])}</td>` +
              `<td>${taken === null ? "" : fmt(taken)}</td><td>${fmt(path.losses[i])}</td></tr>`);
  }
  $("table").tBodies[0].innerHTML = rows.join("");
}

function step() {
  if (path && k < path.xs.length - 1) { k++; draw(); return true; }
  return false;
}

function play() {
  if (timer) { clearInterval(timer); timer = null; $("play").textContent = "Play"; return; }
  $("play").textContent = "Pause";
  timer = setInterval(() => { if (!step()) play(); }, 250);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const id of ["start", "lr"]) $(id).addEventListener("input", load);
  for (const id of ["function", "method"]) $(id).addEventListener("change", load);
  $("step").onclick = step;
  $("play").onclick = play;
  $("reset").onclick = () => { k = 0; draw(); };
  $("curve").addEventListener("click", ev => {
    if (!path) return;
    const p = makePlot($("curve"), [path.curve.x[0], path.curve.x[path.curve.x.length - 1], 0, 1]);
    const x = Math.max(-5, Math.min(5, p.unX(ev.offsetX)));
    $("start").value = x.toFixed(2);
    load();
  });
  load();
});
