// Loss page: each token coloured by the model's probability of it (colours from lmlab.demo_common).
"use strict";

function describe(t) {
  return t.p === null ? "the first token: nothing before it to predict it from" :
    `p(right token) = ${(100 * t.p).toFixed(2)}%   -log p = ${t.ce.toFixed(3)}   ` +
    `model's top guess ${JSON.stringify(t.guess)} (${(100 * t.guess_p).toFixed(1)}%)`;
}

async function score() {
  try {
    const data = await api("/api/loss", {run: $("run").value, text: $("text").value});
    showError($("error"));
    $("summary").innerHTML = `mean &minus;log p (the loss) <b>${data.mean_ce.toFixed(3)}</b> over ` +
      `${data.tokens.length - 1} predictions; guessing uniformly would score ${data.uniform_ce.toFixed(3)}`;
    $("scored").innerHTML = data.tokens.map((t, i) => {
      const bg = t.rgb ? `background: rgb(${t.rgb.join(",")})` : "background: #eef1f6";
      return `<span data-i="${i}" style="${bg}" title="${escapeHtml(describe(t))}">${escapeHtml(t.text)}</span>`;
    }).join("");
    $("scored").querySelectorAll("span").forEach(el => el.addEventListener("mouseenter", () => {
      const t = data.tokens[+el.dataset.i];
      $("hover").textContent = `${JSON.stringify(t.text)}: ${describe(t)}`;
    }));
  } catch (e) { showError($("error"), e); }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("score").onclick = score;
  try { await fillRuns($("run")); score(); } catch (e) { showError($("error"), e); }
});
