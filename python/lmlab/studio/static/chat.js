// Chat page: the conversation lives here; each turn is answered by lmlab.instruct.respond.
"use strict";
let messages = [];

function show() {
  $("log").innerHTML = messages.map(m => `<div class="${m.role === "user" ? "you" : "model"}">` +
    `${m.role === "user" ? "you&gt; " : "model&gt; "}${escapeHtml(m.content)}${m.cut ? " [...]" : ""}</div>`).join("");
}

async function send() {
  const text = $("message").value.trim();
  if (!text) return;
  const turn = {role: "user", content: text};
  const sent = ($("history").checked ? messages.map(({role, content}) => ({role, content})) : []).concat([turn]);
  $("send").disabled = true;
  try {
    const data = await api("/api/chat", {run: $("run").value, messages: sent.slice(-19),
                                         temperature: +$("temperature").value});
    // Cut: the reply ran into the token limit (no stop token), not one that stopped at <|endoftext|>.
    messages.push(turn, {role: "assistant", content: data.reply, cut: !data.stop});
    $("message").value = "";
    showError($("error"));
    show();
  } catch (e) { showError($("error"), e); }
  $("send").disabled = false;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("temperature").addEventListener("input", () => { $("temperature-out").textContent = $("temperature").value; });
  $("send").onclick = send;
  $("message").addEventListener("keydown", ev => { if (ev.key === "Enter") send(); });
  $("clear").onclick = () => { messages = []; show(); };
  try {
    const runs = await fillRuns($("run"), r => r.chat);
    if (!runs.length) showError($("error"), "none of this studio's runs is instruct-tuned: start it with a run made by lmlab instruct");
  } catch (e) { showError($("error"), e); }
});
