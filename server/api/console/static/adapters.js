// Adapters: every name with its versions, lineage, residency, and per-version traffic charts from the server's metrics.

import { $, fill, Poller, api, colorOf, fmt, h, pct, secs, when } from "./api.js";
import { TimeChart } from "./charts.js";

const METRICS = [
  ["requests_per_s", "requests / s", fmt],
  ["error_rate", "error rate", pct],
  ["p50_latency_s", "p50 latency", secs],
  ["p50_ttft_s", "p50 time to first token", secs],
];

const poll = new Poller();
let cards = new Map(); // name -> {el, charts}
let adapters = new Map(); // name -> [version json]
let routes = new Map();

function short(s, n = 12) { return s ? String(s).slice(0, n) : "–"; }

// who registered a version: the key the server authenticated ({tenant, key_id, key_name, address}), or a plain string
function who(r) {
  if (!r || typeof r !== "object") return r;
  return `${r.tenant}/${r.key_id}${r.key_name ? ` (${r.key_name})` : ""}${r.address ? `@${r.address}` : ""}`;
}

function lineage(v) {
  const L = v.lineage || {};
  const rows = [];
  const add = (k, val) => val !== undefined && val !== null && val !== "" && rows.push(h("tr", {}, h("td", {}, k), h("td", {}, val)));
  add("base fingerprint", h("code", { title: v.base_fingerprint || L.base_fingerprint }, short(v.base_fingerprint || L.base_fingerprint, 16)));
  add("method", L.method);
  const parent = (L.config && L.config.adapter && L.config.adapter.init_from) || L.parent || L.init_from;
  add("parent adapter", parent);
  add("copied from", L.copied_from);
  add("source", L.source);
  const ds = L.dataset_sha256 || {};
  add("datasets", Object.keys(ds).length ? h("div", {}, Object.entries(ds).map(([p, sha]) =>
    h("div", { class: "mono" }, `${p.split("/").pop()} `, h("span", { class: "muted", title: sha }, short(sha, 12))))) : null);
  const m = L.metrics || {};
  const shown = Object.entries(m).filter(([, x]) => typeof x === "number").slice(0, 8);
  add("metrics", shown.length ? shown.map(([k, x]) => `${k}=${fmt(x)}`).join("  ") : null);
  add("seed", L.seed);
  add("registered by", who(L.registered_by));
  add("sha256", h("code", { title: v.sha256 }, short(v.sha256, 16)));
  return h("details", {}, h("summary", {}, "lineage"), h("table", { class: "tbl lineage" }, rows));
}

function card(name) {
  let c = cards.get(name);
  if (c) return c;
  const el = h("div", { class: "card adapter", dataset: { name } });
  const head = h("div", { class: "view-head" });
  const chartsEl = h("div", { class: "charts" });
  const table = h("table", { class: "tbl versions" });
  el.append(head, chartsEl, table);
  const charts = METRICS.map(([key, title, f]) => {
    const box = h("div", { class: "chart", dataset: { metric: key } });
    chartsEl.append(box);
    return [key, new TimeChart(box, title, { height: 90, yFormat: f })];
  });
  c = { el, head, table, charts };
  cards.set(name, c);
  $("#ad-list").append(el);
  return c;
}

function renderMetrics(m) {
  const byName = new Map();
  for (const v of m.versions) {
    if (!byName.has(v.name)) byName.set(v.name, []);
    byName.get(v.name).push(v);
  }
  for (const [name, rows] of byName) {
    const c = card(name);
    const isBase = rows[0].version === null;
    const route = routes.get(name);
    const split = route ? Object.entries(route.versions).map(([v, w]) => `@${v} ${w}%`).join(" · ") : "latest version";
    c.head.replaceChildren(h("h3", {}, name, " ", h("span", { class: "muted small" }, isBase ? "base model" : `route: ${split}`)));
    const labels = rows.map((r) => (isBase ? name : `@${r.version}`));
    for (const [key, chart] of c.charts) chart.set(labels, m.times, rows.map((r) => r.series[key]));
    const meta = new Map((adapters.get(name) || []).map((v) => [v.version, v]));
    fill(c.table, 
      h("tr", {}, ["version", "created", "kind", "rank", "targets", "resident", "in flight", "requests", "errors",
        "p50 latency", "p50 TTFT", ""].map((t) => h("th", {}, t))),
      rows.map((r, i) => {
        const v = meta.get(r.version) || {};
        return h("tr", { dataset: { version: r.version ?? "base" } },
          h("td", {}, h("span", { class: "swatch", style: `background:${colorOf(i)}` }), isBase ? "base" : `@${r.version}`),
          h("td", {}, when(v.created_at)), h("td", {}, v.kind || (isBase ? "base" : "")),
          h("td", {}, v.r ? `r=${v.r} α=${v.lora_alpha}${v.use_rslora ? " rs" : ""}` : ""),
          h("td", { class: "small" }, (v.target_modules || []).join(" ")),
          h("td", {}, h("span", { class: `badge ${r.residency.split(" ")[0]}` }, r.residency)),
          h("td", {}, r.in_flight ?? ""), h("td", {}, r.requests), h("td", {}, pct(r.error_rate)),
          h("td", {}, secs(r.p50_latency_s)), h("td", {}, secs(r.p50_ttft_s)),
          h("td", {}, isBase ? "" : lineage(v)));
      }));
  }
  for (const [name, c] of cards) {
    if (!byName.has(name)) {
      c.charts.forEach(([, ch]) => ch.destroy());
      c.el.remove();
      cards.delete(name);
    }
  }
  // for the browser's performance panel (and the test that holds the page to a second): first data on screen
  if (!performance.getEntriesByName("loraplex:first-data").length) performance.mark("loraplex:first-data");
  const e = m.engine;
  $("#ad-engine").textContent = `engine: ${e.running} running, ${e.waiting} waiting · slots ${e.slots_used}/${e.slots_total} · ` +
    `${e.cpu_resident} versions loaded in memory · KV ${e.kv_used_tokens}/${e.kv_budget_tokens} tokens`;
}

async function refreshAdapters() {
  const [a, r] = await Promise.all([api("/v1/adapters"), api("/v1/routes")]);
  adapters = new Map();
  for (const v of a.data) {
    if (!adapters.has(v.name)) adapters.set(v.name, []);
    adapters.get(v.name).push(v);
  }
  routes = new Map(r.data.map((x) => [x.name, x]));
}

async function refreshMetrics() {
  const w = Number($("#ad-window").value);
  renderMetrics(await api(`/v1/console/metrics?window=${w}&step=${Math.max(1, Math.round(w / 60))}`));
}

export const adaptersView = {
  show() {
    poll.every(5000, refreshAdapters);
    poll.every(2000, refreshMetrics);
  },
  hide() { poll.stop(); },
};

$("#ad-window").addEventListener("change", () => refreshMetrics());
