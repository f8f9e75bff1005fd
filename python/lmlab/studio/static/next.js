// Next token page: the distribution after the prompt; the sliders reshape it on the server
// (lmlab.sample.filter_logits, what generation draws from), which caches the logits per prompt.
// The tokens picked since the prompt was typed are kept as ids and sent as ids: a byte-level BPE
// token holding part of a character goes back to the model exactly (its text is only for show).
"use strict";
let request = 0, typed = "", ids = [], added = "";  // the typed prompt; the picks since, and their text

function settings() {
  return {run: $("run").value, prompt: typed, ids, temperature: +$("temperature").value,
          top_k: +$("top_k").value, top_p: +$("top_p").value};
}

function retyped() { typed = $("prompt").value; ids = []; added = ""; refresh(); }

function showText() {
  $("text").innerHTML = escapeHtml(typed) + `<span class="added">${escapeHtml(added)}</span>`;
}

async function refresh() {
  for (const id of ["temperature", "top_k", "top_p"]) $(id + "-out").textContent = $(id).value;
  showText();
  const mine = ++request;
  try {
    const data = await api("/api/next", {...settings(), show: 20});
    if (mine !== request) return;
    showError($("error"));
    $("kept").textContent = `keeps ${data.kept} of ${data.vocab_size} tokens`;
    $("bars").innerHTML = data.tokens.map(t =>
      `<div class="tok" title="id ${t.id}">${escapeHtml(tokenLabel(t.text))}</div>` +
      `<div class="track"><div class="raw" style="width:${100 * t.p}%"></div>` +
      `<div class="shaped" style="width:${100 * t.shaped}%"></div></div>` +
      `<div class="num" data-p="${t.p}">${(100 * t.p).toFixed(1)}%</div>` +
      `<div class="num shaped-p" data-p="${t.shaped}">${(100 * t.shaped).toFixed(1)}%</div>`).join("");
  } catch (e) { if (mine === request) showError($("error"), e); }
}

async function pick(mode) {
  try {
    const data = await api("/api/next/pick", {...settings(), mode, seed: +$("seed").value});
    $("picked").textContent = data.ended ? "the model chose <|endoftext|>: its text ends here" :
      `picked ${JSON.stringify(data.text)} (p = ${(100 * data.p).toFixed(1)}%)` +
      (mode === "sample" ? ` with seed ${$("seed").value}` : "");
    if (mode === "sample") $("seed").value = +$("seed").value + 1;  // the next draw, a new number
    ids = data.ids; added = data.added;
    $("prompt").value = data.prompt;
    await refresh();
  } catch (e) { showError($("error"), e); }
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const id of ["temperature", "top_k", "top_p"]) $(id).addEventListener("input", refresh);
  $("prompt").addEventListener("input", retyped);
  $("run").addEventListener("change", retyped);
  $("greedy").onclick = () => pick("greedy");
  $("sample").onclick = () => pick("sample");
  try { await fillRuns($("run")); retyped(); } catch (e) { showError($("error"), e); }
});
