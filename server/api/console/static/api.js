// Calls to the server's public API with the signed-in key, and small DOM helpers shared by the views.

const KEY = "loraplex.key";

export const auth = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(v) { v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(extra = {}) {
  const h = { ...extra }; // who made a change is what the server verified (key, address), not a header we send
  if (auth.key) h.Authorization = `Bearer ${auth.key}`;
  return h;
}

// fetch + the OpenAI error shape: resolves to the parsed JSON body, rejects with ApiError naming the problem.
export async function api(path, { method = "GET", body, form, raw = false } = {}) {
  const opts = { method, headers: headers() };
  if (form) opts.body = form;
  else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  if (raw) return r;
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) {
    const msg = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    throw new ApiError(r.status, msg);
  }
  return data;
}

export function streamHeaders() { return headers({ "Content-Type": "application/json" }); }

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// replaceChildren for nested arrays of nodes (rows built with map), skipping null / false.
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

export function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(digits);
}
export const pct = (v) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`);
export const secs = (v) => (v === null || v === undefined ? "–" : v < 1 ? `${(1000 * v).toFixed(0)} ms` : `${v.toFixed(2)} s`);
export const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");

export function say(el, text, kind = "") {
  el.textContent = text;
  el.className = `msg ${kind}`;
}

// A view's timers: started when it is shown, all stopped when it is left, so hidden views cost nothing.
export class Poller {
  constructor() { this.timers = []; }
  every(ms, fn) {
    let busy = false;
    const tick = async () => {
      if (busy) return; // a slow answer never piles up requests
      busy = true;
      try { await fn(); } catch (e) { console.warn(e.message || e); } finally { busy = false; }
    };
    tick();
    this.timers.push(setInterval(tick, ms));
  }
  stop() { this.timers.forEach(clearInterval); this.timers = []; }
}

export const PALETTE = ["#3b6ef5", "#e0803a", "#1f9d61", "#b04fd0", "#d64545", "#1aa3b8", "#8a6d1f", "#5a6275"];
export const colorOf = (i) => PALETTE[i % PALETTE.length];
