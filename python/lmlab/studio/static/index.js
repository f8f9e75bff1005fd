// Home page: the pages and the runs this studio was started with.
"use strict";
document.addEventListener("DOMContentLoaded", async () => {
  try {
    const {runs} = await api("/api/runs");
    $("runs").innerHTML = runs.length ? runs.map(r => `<li><b>${escapeHtml(r.name)}</b>` +
      `${r.stage ? " &ndash; " + r.stage : ""}${r.chat ? " (chat)" : ""}</li>`).join("") :
      "<li>none: start the studio with run directories (lmlab studio runs/...) for the model pages</li>";
  } catch (e) { showError($("error"), e); }
});
