// Embeddings page: the 2-D PCA map of every token (lmlab.demo_model) and neighbours on click.
"use strict";
let map = null, plot = null, chosen = null, near = [];

function draw() {
  if (!map) return;
  const xs = map.tokens.map(t => t.x), ys = map.tokens.map(t => t.y);
  const [x0, x1] = extent(xs), [y0, y1] = extent(ys);
  plot = makePlot($("map"), [x0, x1, y0, y1], {xLabel: "direction 1", yLabel: "direction 2"});
  const nearIds = new Set(near.map(n => n.id));
  const many = map.tokens.length > 300;
  for (const t of map.tokens) {
    const colour = t.id === chosen ? "#d9482b" : nearIds.has(t.id) ? "#2f6fdf" : "#9aa3b5";
    plot.dot(t.x, t.y, colour, t.id === chosen ? 6 : 3);
    if (!many || t.id === chosen || nearIds.has(t.id)) plot.text(t.x, t.y, tokenLabel(t.text), colour === "#9aa3b5" ? "#687083" : colour);
  }
  $("variance").textContent = `${map.tokens.length} tokens, ${map.dims} numbers each; the two directions hold ` +
    `${(100 * (map.explained[0] + (map.explained[1] || 0))).toFixed(1)}% of the variance`;
}

async function neighbours(query) {
  try {
    const data = await api("/api/embeddings/neighbours?" + new URLSearchParams({run: $("run").value, ...query, k: 10}));
    chosen = data.id; near = data.neighbours;
    $("query").textContent = `nearest to ${JSON.stringify(data.text)}`;
    $("neighbours").tBodies[0].innerHTML = near.map(n =>
      `<tr><td class="mono">${escapeHtml(tokenLabel(n.token))}</td><td>${n.cosine.toFixed(3)}</td></tr>`).join("");
    showError($("error"));
    draw();
  } catch (e) { showError($("error"), e); }
}

async function load() {
  try {
    map = await api("/api/embeddings?run=" + encodeURIComponent($("run").value));
    chosen = null; near = [];
    showError($("error"));
    draw();
  } catch (e) { showError($("error"), e); }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("run").addEventListener("change", load);
  $("find").onclick = () => neighbours({token: $("token").value});
  $("map").addEventListener("click", ev => {
    if (!map || !plot) return;
    let best = null, bestD = Infinity;
    for (const t of map.tokens) {
      const d = Math.hypot(plot.X(t.x) - ev.offsetX, plot.Y(t.y) - ev.offsetY);
      if (d < bestD) { bestD = d; best = t; }
    }
    if (best && bestD < 30) neighbours({id: best.id});
  });
  try { await fillRuns($("run")); load(); } catch (e) { showError($("error"), e); }
});
