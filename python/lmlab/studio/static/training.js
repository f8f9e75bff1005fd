// Training page: each panel follows one run over server-sent events (rows of metrics.jsonl as they
// are appended, and its checkpoint name when a new one is saved).
"use strict";

class RunPanel {
  constructor(root) {
    this.root = root; this.rows = []; this.source = null; this.seed = 0;
    this.q = cls => root.querySelector("." + cls);
    this.q("run").addEventListener("change", () => this.follow());
    this.q("resample").onclick = () => { this.seed++; this.sample(); };
  }
  follow() {
    if (this.source) this.source.close();
    this.rows = []; this.draw();
    this.source = new EventSource("/api/training/stream?run=" + encodeURIComponent(this.q("run").value));
    this.source.addEventListener("rows", ev => { this.rows.push(...JSON.parse(ev.data).rows); this.draw(); });
    this.source.addEventListener("reset", () => { this.rows = []; });
    this.source.addEventListener("checkpoint", ev => {
      const cp = JSON.parse(ev.data).checkpoint;
      this.q("checkpoint").textContent = cp || "(no checkpoint yet)";
      if (cp) this.sample();
    });
  }
  async sample() {
    try {
      const data = await api(`/api/training/sample?run=${encodeURIComponent(this.q("run").value)}&seed=${this.seed}`);
      this.q("sample").textContent = data.text;
      this.q("checkpoint").textContent = data.checkpoint;
      showError(this.q("error"));
    } catch (e) { showError(this.q("error"), e); }
  }
  draw() {
    const train = this.rows.filter(r => isFinite(r.loss)), val = this.rows.filter(r => isFinite(r.val_loss));
    const steps = this.rows.map(r => r.step).filter(isFinite);
    const [y0, y1] = extent(train.map(r => r.loss).concat(val.map(r => r.val_loss)));
    const p = makePlot(this.q("curve"), [0, Math.max(1, ...steps), Math.max(0, y0), y1],
                       {xLabel: "step", yLabel: "loss"});
    p.line(train.map(r => r.step), train.map(r => r.loss), "#2f6fdf", 1.5);
    p.line(val.map(r => r.step), val.map(r => r.val_loss), "#e08a1e", 2, 3);
    p.text(0, y1, "train (blue), validation (orange)", "#687083");
    const last = this.rows[this.rows.length - 1] || {};
    const lastVal = val[val.length - 1] || {};
    this.q("step").textContent = last.step === undefined ? "\u2013" : last.step;
    this.q("loss").textContent = fmt(last.loss, 3);
    this.q("val").textContent = fmt(lastVal.val_loss, 3);
    this.q("tps").textContent = isFinite(last.tokens_per_s) ? Math.round(last.tokens_per_s).toLocaleString() : "\u2013";
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  const panels = [new RunPanel($("panel-a")), new RunPanel($("panel-b"))];
  try {
    await fillRuns(panels[0].q("run"), null, 0);
    await fillRuns(panels[1].q("run"), null, 1);
    panels.forEach(p => p.follow());
  } catch (e) { showError(panels[0].q("error"), e); }
});
