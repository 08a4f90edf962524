// Routes: a name's traffic split as sliders summing to 100, sticky mode, guard, promote / rollback, history,
// and the live compare view (error rate and latency per version) from GET /v1/routes/{name}/compare.

import { $, fill, Poller, api, colorOf, fmt, h, pct, say, secs, when } from "./api.js";
import { TimeChart } from "./charts.js";

const poll = new Poller();
const KEEP = 150; // compare points kept per chart
let name = null;
let versions = []; // version numbers of the selected name
let weights = {}; // version -> percent shown on the sliders
let dirty = false; // the sliders hold an edit not applied yet: refreshes must not overwrite it
let compare = { versions: [], times: [], err: {}, lat: {} };
let charts = null;

// Move one slider and rescale the others so the total stays 100 (largest remainder keeps them integers).
export function rebalance(ws, moved, value) {
  const others = Object.keys(ws).filter((v) => v !== moved);
  const out = { [moved]: value };
  const rest = 100 - value;
  const sum = others.reduce((s, v) => s + ws[v], 0);
  if (!others.length) return { [moved]: 100 };
  const raw = others.map((v) => [v, sum > 0 ? (rest * ws[v]) / sum : v === others[others.length - 1] ? rest : 0]);
  const floors = raw.map(([v, x]) => [v, Math.floor(x), x - Math.floor(x)]);
  let left = rest - floors.reduce((s, [, f]) => s + f, 0);
  floors.sort((a, b) => b[2] - a[2]);
  for (const f of floors) {
    if (left <= 0) break;
    f[1] += 1;
    left -= 1;
  }
  for (const [v, f] of floors) out[v] = f;
  return out;
}

function renderSliders() {
  const box = $("#rt-sliders");
  box.replaceChildren(...versions.map((v, i) => {
    const range = h("input", { type: "range", min: 0, max: 100, step: 1, value: weights[v] ?? 0, dataset: { version: v } });
    const num = h("input", { type: "number", min: 0, max: 100, value: weights[v] ?? 0, dataset: { version: v } });
    const set = (x) => {
      weights = rebalance(weights, String(v), Math.max(0, Math.min(100, Math.round(Number(x) || 0))));
      dirty = true;
      syncSliders();
    };
    range.addEventListener("input", () => set(range.value));
    num.addEventListener("change", () => set(num.value));
    return h("div", { class: "slider" },
      h("span", {}, h("span", { class: "swatch", style: `background:${colorOf(i)}` }), `${name}@${v}`), range, num);
  }));
  syncSliders();
  $("#rt-promote-version").replaceChildren(...versions.map((v) => h("option", { value: v }, `@${v}`)));
  if (versions.length) $("#rt-promote-version").value = versions[versions.length - 1];
}

function syncSliders() {
  for (const el of document.querySelectorAll("#rt-sliders input")) el.value = weights[el.dataset.version] ?? 0;
  const total = Object.values(weights).reduce((s, x) => s + x, 0);
  $("#rt-total").textContent = total;
  $("#rt-apply").textContent = dirty ? "Apply split (not applied yet)" : "Apply split";
}

async function loadNames() {
  const a = await api("/v1/adapters");
  const names = [...new Set(a.data.map((v) => v.name))].sort();
  const sel = $("#rt-name");
  const keep = sel.value || name;
  sel.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  if (!names.length) {
    say($("#rt-msg"), "No adapters registered yet.");
    return;
  }
  sel.value = names.includes(keep) ? keep : names[0];
  if (sel.value !== name) select(sel.value);
}

function select(n) {
  name = n;
  dirty = false;
  compare = { versions: [], times: [], err: {}, lat: {} };
  say($("#rt-msg"), "");
  refreshRoute();
}

async function refreshRoute() {
  if (!name) return;
  const n = name;
  const [detail, hist] = await Promise.all([api(`/v1/adapters/${encodeURIComponent(n)}`),
    api(`/v1/routes/${encodeURIComponent(n)}/history`)]);
  if (n !== name) return;
  const vs = detail.versions.map((v) => v.version);
  const route = detail.route;
  const changed = JSON.stringify(vs) !== JSON.stringify(versions);
  versions = vs;
  if (!dirty || changed) {
    weights = {};
    for (const v of vs) weights[v] = route ? route.versions[String(v)] || 0 : v === detail.latest ? 100 : 0;
    dirty = false;
    if (route) $("#rt-sticky").value = route.sticky || "";
  }
  if (changed) renderSliders(); else syncSliders();
  if (!dirty) {
    const full = await api(`/v1/routes`).then((r) => r.data.find((x) => x.name === n));
    const g = full && full.guard;
    $("#rt-guard").checked = !!g;
    if (g) {
      $("#rt-guard-rate").value = +(100 * g.max_error_rate).toFixed(2);
      $("#rt-guard-min").value = g.min_requests;
    }
  }
  renderHistory(hist.data);
}

function split(r) {
  return r ? Object.entries(r.versions).map(([v, w]) => `@${v} ${w}%`).join(" · ") : "–";
}

function renderHistory(rows) {
  fill($("#rt-history"), 
    h("tr", {}, ["when", "action", "by", "before", "after", "reason"].map((t) => h("th", {}, t))),
    rows.slice().reverse().map((c) => h("tr", { dataset: { action: c.action } }, h("td", {}, when(c.at)), h("td", {}, c.action),
      h("td", {}, c.caller), h("td", {}, split(c.old)), h("td", {}, split(c.new)), h("td", {}, c.reason || ""))));
}

async function refreshCompare() {
  if (!name) return;
  const n = name;
  const w = $("#rt-window").value;
  const c = await api(`/v1/routes/${encodeURIComponent(n)}/compare?window=${w}`);
  if (n !== name) return;
  const vs = c.versions.map((x) => String(x.version));
  for (const v of vs) {
    if (!(v in compare.err)) {
      compare.err[v] = compare.times.map(() => null);
      compare.lat[v] = compare.times.map(() => null);
    }
  }
  compare.versions = vs;
  compare.times.push(Date.now() / 1000);
  for (const x of c.versions) {
    compare.err[String(x.version)].push(x.error_rate);
    compare.lat[String(x.version)].push(x.p50_latency_s);
  }
  for (const v of Object.keys(compare.err)) {
    if (!vs.includes(v)) compare.err[v].push(null), compare.lat[v].push(null);
  }
  if (compare.times.length > KEEP) {
    compare.times.shift();
    for (const v of Object.keys(compare.err)) compare.err[v].shift(), compare.lat[v].shift();
  }
  const labels = vs.map((v) => `@${v}`);
  const colors = vs.map((v) => colorOf(versions.indexOf(Number(v))));
  charts.err.set(labels, compare.times, vs.map((v) => compare.err[v]), colors);
  charts.lat.set(labels, compare.times, vs.map((v) => compare.lat[v]), colors);
  fill($("#rt-compare"), 
    h("tr", {}, ["version", "weight", "requests", "errors", "error rate", "p50 latency", "p95 latency", "p50 TTFT"]
      .map((t) => h("th", {}, t))),
    c.versions.map((x) => h("tr", { dataset: { version: x.version } }, h("td", {}, `@${x.version}`),
      h("td", {}, x.weight === null ? "–" : `${x.weight}%`), h("td", {}, x.requests), h("td", {}, x.errors),
      h("td", {}, pct(x.error_rate)), h("td", {}, secs(x.p50_latency_s)), h("td", {}, secs(x.p95_latency_s)),
      h("td", {}, secs(x.p50_ttft_s)))));
}

async function act(fn, okText) {
  const msg = $("#rt-msg");
  try {
    const r = await fn();
    dirty = false;
    say(msg, `${okText}: ${split(r)}`, "ok");
    await refreshRoute();
  } catch (e) {
    say(msg, e.message, "error");
  }
}

const path = (suffix = "") => `/v1/routes/${encodeURIComponent(name)}${suffix}`;

$("#rt-name").addEventListener("change", (e) => select(e.target.value));
$("#rt-window").addEventListener("change", () => { compare = { versions: [], times: [], err: {}, lat: {} }; });
$("#rt-sticky").addEventListener("change", () => { dirty = true; syncSliders(); });
$("#rt-apply").addEventListener("click", () => {
  const body = { versions: Object.fromEntries(Object.entries(weights).filter(([, w]) => w > 0)),
    sticky: $("#rt-sticky").value || null };
  if ($("#rt-guard").checked) {
    body.guard = { max_error_rate: Number($("#rt-guard-rate").value) / 100, min_requests: Number($("#rt-guard-min").value) };
  }
  act(() => api(path(), { method: "PUT", body }), "route set");
});
$("#rt-promote").addEventListener("click", () => {
  const version = Number($("#rt-promote-version").value);
  act(() => api(path("/promote"), { method: "POST", body: { version } }), `promoted @${version}`);
});
$("#rt-rollback").addEventListener("click", () => {
  const reason = $("#rt-reason").value.trim();
  act(() => api(path("/rollback"), { method: "POST", body: reason ? { reason } : {} }), "rolled back");
});

export const routesView = {
  show() {
    if (!charts) {
      charts = { err: new TimeChart($("#rt-chart-err"), "error rate", { yFormat: pct }),
        lat: new TimeChart($("#rt-chart-lat"), "p50 latency", { yFormat: secs }) };
    }
    poll.every(5000, loadNames);
    poll.every(2000, refreshRoute);
    poll.every(2000, refreshCompare);
  },
  hide() { poll.stop(); },
};
