// Training page: each panel follows one run over server-sent events (rows of metrics.jsonl as they
// are appended, and its checkpoint name when a new one is saved). Runs named with --train-into can
// be trained from the page: the form offers only the server's own choices (/api/training/options).
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
    const losses = train.map(r => r.loss).concat(val.map(r => r.val_loss));
    const [y0, y1] = extent(losses);
    // the axis starts at 0 unless a loss is below it (rlhf logs minus its reward: mostly < 0)
    const bottom = Math.min(...losses) < 0 ? y0 : Math.max(0, y0);
    const p = makePlot(this.q("curve"), [0, Math.max(1, ...steps), bottom, y1],
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

function options(select, values, labels) {
  select.innerHTML = values.map((v, i) => `<option value="${escapeHtml(v)}">${escapeHtml(labels ? labels[i] : v)}</option>`).join("");
}

class TrainForm {
  constructor(panel) { this.panel = panel; this.timer = null; }
  async load() {
    const o = await api("/api/training/options");
    this.o = o;
    const slots = o.runs.filter(r => r.trainable);
    if (!slots.length) return;
    $("train").hidden = false;
    options($("train-run"), slots.map(r => String(r.index)), slots.map(r => r.name + (r.exists ? " (holds a run)" : " (new)")));
    options($("train-stage"), o.stages);
    const parents = o.runs.filter(r => r.exists);
    options($("train-parent"), parents.map(r => String(r.index)), parents.map(r => r.name + (r.stage ? ` (${r.stage})` : "")));
    options($("train-preset"), Object.keys(o.presets), Object.entries(o.presets).map(([k, p]) =>
      `${k}: ${p.n_layer} layer${p.n_layer > 1 ? "s" : ""}, ${p.n_embd} wide, context ${p.block_size}`));
    $("train-steps").max = o.max_steps;
    $("train-stage").onchange = () => this.stageChanged();
    $("train-run").onchange = () => this.poll();
    $("train-start").onclick = () => this.start();
    $("train-stop").onclick = () => this.stop();
    this.stageChanged();
    this.poll();
  }
  stageChanged() {
    const stage = $("train-stage").value, pre = stage === "pretrain";
    $("train-parent-label").hidden = pre;
    $("train-preset-label").hidden = !pre;
    $("train-corpus-name").textContent = stage === "instruct" ? "data" : "corpus";
    const list = stage === "instruct" ? this.o.instruct_data : this.o.corpora;
    options($("train-corpus"), list);
    if (list.includes("shakespeare")) $("train-corpus").value = "shakespeare";
  }
  async start() {
    const body = {run: $("train-run").value, stage: $("train-stage").value, corpus: $("train-corpus").value,
                  steps: Number($("train-steps").value), resume: $("train-resume").checked};
    if (body.stage === "pretrain") body.preset = $("train-preset").value; else body.parent = $("train-parent").value;
    try {
      this.show(await api("/api/training/start", body));
      const follow = this.panel.q("run");
      follow.value = body.run;  // the left panel follows the run being trained
      this.panel.follow();
      this.poll();
    } catch (e) { showError($("train-error"), e); }
  }
  async stop() {
    try { this.show(await api("/api/training/stop", {run: $("train-run").value})); }
    catch (e) { showError($("train-error"), e); }
  }
  async poll() {
    clearTimeout(this.timer);
    try {
      const job = await api(`/api/training/job?run=${encodeURIComponent($("train-run").value)}`);
      this.show(job);
      if (job.state === "running" || job.state === "stopping") this.timer = setTimeout(() => this.poll(), 1000);
    } catch (e) { showError($("train-error"), e); }
  }
  show(job) {
    const busy = job.state === "running" || job.state === "stopping";
    $("train-state").textContent = job.state + (job.returncode !== null && job.returncode !== undefined ? ` (exit ${job.returncode})` : "");
    $("train-command").textContent = job.command || "";
    $("train-log").textContent = (job.log || []).join("\n");
    $("train-start").disabled = busy;
    $("train-stop").disabled = job.state !== "running";
    showError($("train-error"));
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  const panels = [new RunPanel($("panel-a")), new RunPanel($("panel-b"))];
  try {
    await fillRuns(panels[0].q("run"), null, 0);
    await fillRuns(panels[1].q("run"), null, 1);
    panels.forEach(p => p.follow());
    await new TrainForm(panels[0]).load();
  } catch (e) { showError(panels[0].q("error"), e); }
});
