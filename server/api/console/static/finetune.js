// Fine-tuning: check a dataset before any job exists, start a job (SFT, DPO, GRPO) with `auto` defaults and the
// planned number of steps, follow it live (loss, reward / accuracy, events, ETA), cancel / pause / resume it, and
// send a share of traffic to the version it produced. Jobs are created exactly as an API client creates them:
// `POST /v1/files` (JSONL) and `POST /v1/fine_tuning/jobs` with OpenAI's `method` object; the planned steps are the
// server's own count for that same `method` (`POST /v1/console/plan`, the trainer's resolver).

import { $, fill, $$, Poller, api, fmt, h, say, when } from "./api.js";
import { TimeChart } from "./charts.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
// what preference (DPO, reward) and RL (GRPO, PPO) jobs report besides their loss
const REWARD_KEYS = ["rewards_accuracy", "rewards_margin", "val_accuracy", "val_margin", "reward_mean", "kl"];
const poll = new Poller();
const jobPoll = new Poller();
let ctx = null;
let file = null;
let preview = null;
let selected = null;
let events = new Map(); // job's events by id
let charts = null;
let planSeq = 0; // answers to plan requests older than the latest are dropped
let planTimer = null;

// --- the dataset --------------------------------------------------------------------------------------------------
async function runPreview(method) {
  const box = $("#ft-preview");
  preview = null;
  updateStart();
  if (!file) return box.replaceChildren();
  box.replaceChildren(h("p", { class: "muted" }, `Checking ${file.name}…`));
  const form = new FormData();
  form.append("file", file);
  if (method) form.append("method", method);
  if ($("#ft-seq").value.trim()) form.append("sequence_len", $("#ft-seq").value.trim());
  try {
    preview = await api("/v1/console/datasets/preview", { method: "POST", form });
  } catch (e) {
    box.replaceChildren(h("p", { class: "error", id: "ft-preview-error" }, e.message));
    return;
  }
  if (!method && preview.method_type) $("#ft-method").value = preview.method_type;
  showMethodFields();
  renderPreview();
  updateStart();
}

function renderPreview() {
  const p = preview;
  const summary = h("p", { id: "ft-preview-summary" },
    h("b", {}, p.filename), ` · ${p.file_type} · format `, h("b", { id: "ft-format" }, p.format || "unknown"),
    ` · ${p.records} records, `, h("span", { class: p.errors_total ? "error" : "ok" },
      p.errors_total ? `${p.errors_total} invalid` : "all valid"), ` for ${p.method.toUpperCase()}`,
    p.jsonl ? h("span", { class: "muted" }, " (uploaded as JSONL)") : "");
  const errs = p.errors.length ? h("ul", { class: "errors", id: "ft-errors" },
    p.errors.map((e) => h("li", {}, e.message)),
    p.errors_total > p.errors.length ? h("li", {}, `… and ${p.errors_total - p.errors.length} more`) : null) : null;
  const sample = h("details", { open: true }, h("summary", {}, `first ${p.sample.length} records`),
    h("table", { class: "tbl", id: "ft-sample" }, p.sample.map((s) => {
      const at = s.line ?? s.row;
      return h("tr", {}, h("td", { class: "muted" }, at), h("td", {}, h("pre", { class: "record" }, JSON.stringify(s.record))));
    })));
  $("#ft-preview").replaceChildren(summary, errs || "", sample);
  updatePlan();
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" || v === "auto" ? "auto" : Number(v);
}

function hyperparameters() {
  const hp = {};
  for (const [k, id] of [["n_epochs", "#ft-epochs"], ["batch_size", "#ft-batch"], ["learning_rate_multiplier", "#ft-lr"]]) {
    hp[k] = num(id);
  }
  if ($("#ft-method").value === "dpo") hp.beta = num("#ft-beta");
  return hp;
}

// The grader of a reinforcement job, in OpenAI's shape: a string check of the sampled answer against a reference
// (a `{{item.<field>}}` template or a literal), or any grader written out as JSON.
function grader() {
  const kind = $("#ft-grader-kind").value;
  const value = $("#ft-grader-value").value;
  if (kind === "json") {
    try {
      return JSON.parse(value);
    } catch (e) {
      throw new Error(`the grader is not valid JSON (${e.message})`);
    }
  }
  return { type: "string_check", name: "answer", input: "{{sample.output_text}}", reference: value, operation: kind };
}

// The job body's `method`, as OpenAI's fine-tuning API defines it; `withGrader` false for the plan, which reads only
// the type and the hyperparameters.
function methodObject(withGrader = true) {
  const type = $("#ft-method").value;
  const block = { hyperparameters: hyperparameters() };
  if (type === "reinforcement" && withGrader) block.grader = grader();
  return { type, [type]: block };
}

// Planned optimizer steps: the server resolves "auto" and counts the steps with the trainer's own code, for the
// records the preview found valid (what the uploaded file will hold).
function updatePlan() {
  clearTimeout(planTimer);
  planTimer = setTimeout(askPlan, 150);
}

async function askPlan() {
  const el = $("#ft-plan");
  const seq = ++planSeq;
  if (!preview || !preview.valid_records) return (el.textContent = "");
  let plan;
  try {
    plan = await api("/v1/console/plan", { method: "POST",
      body: { method: methodObject(false), examples: preview.valid_records } });
  } catch (e) {
    if (seq === planSeq) el.replaceChildren(h("span", { class: "error", id: "ft-plan-error" }, e.message));
    return;
  }
  if (seq !== planSeq) return;
  const asked = hyperparameters();
  const shown = Object.keys(asked).map((k) => `${k}=${asked[k] === "auto" ? `auto (${plan.hyperparameters[k]})` : asked[k]}`);
  el.replaceChildren("Planned: ", h("b", { id: "ft-steps" }, `${plan.training_plan.optimizer_steps} optimizer steps`),
    ` (${plan.text}; ${shown.join(", ")})`);
}

function showMethodFields() {
  const m = $("#ft-method").value;
  for (const el of $$("#ft-form [data-method]")) el.hidden = el.dataset.method !== m;
}

function updateStart() {
  const ok = !!preview && preview.errors_total === 0 && preview.valid_records > 0;
  $("#ft-start").disabled = !ok;
}

function jobBody(fileId) {
  const method = methodObject();
  const ext = {};
  if ($("#ft-seq").value.trim()) ext.sequence_len = Number($("#ft-seq").value);
  if (method.type === "reinforcement" && $("#ft-gens").value.trim()) ext.num_generations = Number($("#ft-gens").value);
  // "default" names this server's base model; keys without the inference scope cannot list models to learn its id
  const body = { model: ctx.baseModel || "default", training_file: fileId, method };
  if (Object.keys(ext).length) body.loraplex = ext;
  if ($("#ft-suffix").value.trim()) body.suffix = $("#ft-suffix").value.trim();
  return body;
}

async function start(ev) {
  ev.preventDefault();
  const msg = $("#ft-msg");
  $("#ft-start").disabled = true;
  try {
    const body = jobBody("");
    say(msg, "Uploading…");
    const form = new FormData();
    // the fine-tuning API takes JSONL: a CSV, JSON or Parquet file goes up as the records the preview read from it
    if (preview.jsonl) form.append("file", new Blob([preview.jsonl]), file.name.replace(/\.[^.]*$/, "") + ".jsonl");
    else form.append("file", file);
    form.append("purpose", "fine-tune");
    const f = await api("/v1/files", { method: "POST", form });
    say(msg, "Creating the job…");
    const job = await api("/v1/fine_tuning/jobs", { method: "POST", body: { ...body, training_file: f.id } });
    say(msg, `Job ${job.id} created.`, "ok");
    selectJob(job.id);
    refreshJobs();
  } catch (e) {
    say(msg, e.message, "error");
  } finally {
    updateStart();
  }
}

// --- jobs ---------------------------------------------------------------------------------------------------------
async function refreshJobs() {
  const r = await api("/v1/fine_tuning/jobs?limit=20");
  fill($("#ft-jobs"), 
    h("tr", {}, ["job", "status", "method", "model", "created"].map((t) => h("th", {}, t))),
    r.data.map((j) => h("tr", { class: `click${j.id === selected ? " sel" : ""}`, dataset: { job: j.id },
      onclick: () => selectJob(j.id) },
    h("td", { class: "mono" }, j.id.slice(0, 14)), h("td", {}, h("span", { class: `badge ${j.status}` }, j.status)),
    h("td", {}, j.method && j.method.type), h("td", {}, j.fine_tuned_model || ""), h("td", {}, when(j.created_at)))));
  if (!selected && r.data.length) selectJob(r.data[0].id);
}

function selectJob(id, keepMsg = false) {
  if (selected === id) return;
  selected = id;
  events = new Map();
  jobPoll.stop();
  $("#ft-job").hidden = false;
  $("#ft-canary").hidden = true;
  say($("#ft-canary-msg"), "");
  if (!keepMsg) say($("#ft-job-msg"), "");
  $$("#ft-jobs tr[data-job]").forEach((tr) => tr.classList.toggle("sel", tr.dataset.job === id));
  jobPoll.every(1500, () => refreshJob(id));
}

async function loadEvents(id) {
  // newest first; on the first load page back through everything, later only the newest page
  let after = null;
  for (let page = 0; page < (events.size ? 1 : 20); page++) {
    const r = await api(`/v1/fine_tuning/jobs/${id}/events?limit=100${after ? `&after=${after}` : ""}`);
    let fresh = 0;
    for (const e of r.data) if (!events.has(e.id)) events.set(e.id, e), fresh++;
    if (!r.has_more || !fresh || !r.data.length) break;
    after = r.data[r.data.length - 1].id;
  }
}

function duration(s) {
  if (s <= 0) return "any moment";
  const m = Math.floor(s / 60);
  return m ? `${m} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`;
}

async function refreshJob(id) {
  const job = await api(`/v1/fine_tuning/jobs/${id}`);
  await loadEvents(id);
  if (id !== selected) return;
  const evs = [...events.values()].sort((a, b) => Number(a.id.split("-")[1]) - Number(b.id.split("-")[1]));
  const metrics = evs.filter((e) => e.type === "metrics" && e.data).map((e) => e.data);
  const last = metrics[metrics.length - 1];
  $("#ft-job-title").replaceChildren(`${job.id} `, h("span", { class: `badge ${job.status}`, id: "ft-status" }, job.status));
  const hp = Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  const facts = [
    ["method", job.method && job.method.type], ["base", job.model], ["adapter", job.fine_tuned_model],
    ["hyperparameters", hp],
    ["planned", job.training_plan ? `${job.training_plan.optimizer_steps} optimizer steps` : "–"],
    ["step", last ? `${last.step} / ${last.total_steps}` : "–"],
    ["ETA", job.status === "running" && job.estimated_finish ? duration(job.estimated_finish - Date.now() / 1000) : "–"],
    ["trained tokens", job.trained_tokens ?? "–"], ["finished", job.finished_at ? when(job.finished_at) : "–"],
  ];
  $("#ft-job-facts").replaceChildren(...facts.map(([k, v]) => h("div", {}, h("span", {}, k), v ?? "–")),
    job.error ? h("div", { class: "error" }, job.error.message) : "");
  const live = !TERMINAL.includes(job.status);
  $("#ft-cancel").hidden = !live;
  $("#ft-pause").hidden = !["queued", "running"].includes(job.status);
  $("#ft-resume").hidden = job.status !== "paused";
  $("#ft-canary").hidden = !(job.status === "succeeded" && job.fine_tuned_model && ctx.can("admin"));
  $("#ft-canary-name").placeholder = job.fine_tuned_model || "adapter name";

  const trained = metrics.filter((m) => m.loss !== null && m.loss !== undefined && !m.initial);
  const steps = trained.map((m) => m.step);
  const lossSeries = [["loss", trained.map((m) => m.loss)]];
  if (trained.some((m) => m.eval_loss !== undefined && m.eval_loss !== null)) {
    lossSeries.push(["eval loss", trained.map((m) => m.eval_loss ?? null)]);
  }
  charts.loss.set(lossSeries.map((s) => s[0]), steps, lossSeries.map((s) => s[1]));
  const rk = REWARD_KEYS.filter((k) => metrics.some((m) => typeof m[k] === "number"));
  $("#ft-chart-reward").hidden = !rk.length;
  if (rk.length) {
    const withR = metrics.filter((m) => rk.some((k) => typeof m[k] === "number"));
    charts.reward.set(rk, withR.map((m) => m.step), rk.map((k) => withR.map((m) => m[k] ?? null)));
  }
  $("#ft-events").replaceChildren(...evs.slice().reverse().map((e) =>
    h("li", { class: e.level }, h("span", { class: "muted" }, `${new Date(e.created_at * 1000).toLocaleTimeString()} `), e.message)));
  if (!live) jobPoll.stop(); // a finished job does not change; the jobs list still refreshes its row
}

async function jobAction(action, what) {
  const msg = $("#ft-job-msg");
  try {
    await api(`/v1/fine_tuning/jobs/${selected}/${action}`, { method: "POST" });
    say(msg, `${what} ${selected}.`, "ok");
  } catch (e) {
    say(msg, e.message, "error");
  }
  const id = selected;
  selected = null;
  selectJob(id, true); // restart the live view: a resumed job is running again
  refreshJobs();
}

async function canary() {
  const msg = $("#ft-canary-msg");
  try {
    const name = $("#ft-canary-name").value.trim();
    const r = await api(`/v1/console/jobs/${selected}/canary`, { method: "POST",
      body: name ? { percent: 10, name } : { percent: 10 } });
    say(msg, `${r.name}: ` + Object.entries(r.route.versions).map(([v, w]) => `@${v} ${w}%`).join(" · "), "ok");
  } catch (e) {
    say(msg, e.message, "error");
  }
}

$("#ft-file").addEventListener("change", (e) => {
  file = e.target.files[0] || null;
  runPreview(null);
});
$("#ft-method").addEventListener("change", () => { showMethodFields(); if (file) runPreview($("#ft-method").value); });
$("#ft-seq").addEventListener("change", () => file && runPreview($("#ft-method").value));
for (const id of ["#ft-epochs", "#ft-batch", "#ft-lr", "#ft-beta"]) $(id).addEventListener("input", updatePlan);
$("#ft-form").addEventListener("submit", start);
$("#ft-cancel").addEventListener("click", () => jobAction("cancel", "Cancelled"));
$("#ft-pause").addEventListener("click", () => jobAction("pause", "Paused"));
$("#ft-resume").addEventListener("click", () => jobAction("resume", "Resumed"));
$("#ft-canary-btn").addEventListener("click", canary);

export const finetuneView = {
  async show(c) {
    ctx = c;
    if (!charts) {
      charts = { loss: new TimeChart($("#ft-chart-loss"), "training loss", { time: false, xLabel: "step", height: 180 }),
        reward: new TimeChart($("#ft-chart-reward"), "rewards / accuracy", { time: false, xLabel: "step", height: 180 }) };
    }
    showMethodFields();
    poll.every(3000, refreshJobs);
    if (selected) {
      const id = selected;
      selected = null;
      selectJob(id);
    }
    if (ctx.can("inference")) {
      const models = await api("/v1/models");
      ctx.baseModel = models.data.find((m) => !m.parent).id;
      $("#ft-names").replaceChildren(...models.data.filter((m) => m.parent && !m.id.includes("@"))
        .map((m) => h("option", { value: m.id })));
    }
  },
  hide() { poll.stop(); jobPoll.stop(); },
};
