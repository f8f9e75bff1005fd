// Rank page: a round (prompt + K answers, kept by the server) and this person's places for them.
"use strict";
let round = null;

// The mark after an answer cut at the token limit, worded as `lmlab rank` words it (lmlab.rank.cut_mark).
// A round from a server that does not send `ended` marks no answer.
function cutMark(round, i) {
  if (!Array.isArray(round.ended) || round.ended[i] !== false) return "";
  const limit = round.max_new_tokens ? `${round.max_new_tokens} tokens` : "the token limit";
  return `<span class="cut" title="the model did not end this answer: it was stopped at the token limit">` +
    `\u2026 (cut at ${limit})</span>`;
}

async function newRound() {
  try {
    round = await api("/api/rank/round", {run: $("run").value, prompt: $("prompt").value,
                                          k: +$("k").value, seed: +$("seed").value});
    showError($("error"));
    const k = round.completions.length;
    const options = i => Array.from({length: k}, (_, p) =>
      `<option value="${p + 1}" ${p === i ? "selected" : ""}>${p + 1}</option>`).join("");
    $("answers").innerHTML = round.completions.map((c, i) =>
      `<li><label>place <select class="place" data-i="${i}">${options(i)}</select></label>` +
      `<span class="mono">${escapeHtml(round.prompt)}<b>${escapeHtml(c)}</b>${cutMark(round, i)}</span></li>`).join("");
    $("submit").disabled = false;
    $("status").textContent = `${round.submitted} ranking(s) of these answers so far`;
  } catch (e) { showError($("error"), e); }
}

async function submit() {
  const places = [...document.querySelectorAll("select.place")].map(s => +s.value);
  $("submit").disabled = true;
  try {
    const data = await api("/api/rank/submit", {round: round.id, name: $("name").value, places});
    showError($("error"));
    $("status").className = "ok";
    $("status").textContent = `saved: ${data.judge} ranked ${JSON.stringify(data.ranking.map(g =>
      Array.isArray(g) ? g.map(i => i + 1).join("=") : g + 1).join(" > "))}`;
  } catch (e) { showError($("error"), e); $("status").textContent = ""; }
  $("submit").disabled = false;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("round").onclick = newRound;
  $("submit").onclick = submit;
  try {
    await fillRuns($("run"));
    const {prompts} = await api("/api/rank/prompts");
    $("prompts").innerHTML = prompts.map(p => `<option value="${escapeHtml(p)}">`).join("");
    if (prompts.length) $("prompt").value = prompts[0];
  } catch (e) { showError($("error"), e); }
});
