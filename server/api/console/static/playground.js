// Playground: one conversation sent to two models side by side, streamed, with the version that served each answer
// (header X-Loraplex-Adapter) and its token counts.

import { $, $$, api, h, streamHeaders } from "./api.js";

let turns = []; // [{user, answers: {a: {text, served, usage, error}, b: {...}}}]
let busy = false;

function panes() { return $$("#view-playground .pane"); }

async function loadModels() {
  const r = await api("/v1/models");
  const ids = r.data.map((m) => m.id);
  const base = r.data.filter((m) => !m.parent).map((m) => m.id);
  const names = ids.filter((i) => !base.includes(i) && !i.includes("@")).sort();
  const pinned = ids.filter((i) => i.includes("@")).sort((x, y) => x.localeCompare(y, undefined, { numeric: true }));
  const options = [...base, ...names, ...pinned];
  panes().forEach((p, i) => {
    const sel = $(".pg-model", p);
    const keep = sel.value;
    sel.replaceChildren(...options.map((o) => h("option", { value: o }, o)));
    sel.value = options.includes(keep) ? keep : (i === 0 ? base[0] : names[0] || pinned[0] || base[0]);
  });
}

function messagesFor(pane) {
  const msgs = [];
  const sys = $("#pg-system").value.trim();
  if (sys) msgs.push({ role: "system", content: sys });
  for (const t of turns) {
    msgs.push({ role: "user", content: t.user });
    const a = t.answers[pane];
    if (a && a.text && !a.error) msgs.push({ role: "assistant", content: a.text });
  }
  return msgs;
}

function render() {
  for (const p of panes()) {
    const key = p.dataset.pane;
    $(".chat", p).replaceChildren(...turns.flatMap((t) => {
      const a = t.answers[key] || {};
      return [h("div", { class: "msg-user" }, t.user),
        h("div", { class: `msg-assistant${a.error ? " error" : ""}`, dataset: { served: a.served || "" } },
          a.error || a.text || "…")];
    }));
    const last = turns.length ? turns[turns.length - 1].answers[key] : null;
    $(".served", p).textContent = last && last.served ? `served by ${last.served}` : "";
    $(".usage", p).textContent = last && last.usage
      ? `${last.usage.prompt_tokens} prompt + ${last.usage.completion_tokens} completion tokens` : "";
  }
}

async function stream(pane, model, answer) {
  const body = {
    model, messages: messagesFor(pane), stream: true, stream_options: { include_usage: true },
    temperature: Number($("#pg-temp").value), top_p: Number($("#pg-top-p").value), max_tokens: Number($("#pg-max").value),
  };
  if ($("#pg-seed").value !== "") body.seed = Number($("#pg-seed").value);
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: streamHeaders(), body: JSON.stringify(body) });
  answer.served = r.headers.get("X-Loraplex-Adapter") || "";
  if (!r.ok) {
    let m = `${r.status} ${r.statusText}`;
    try { m = (await r.json()).error.message; } catch { /* not JSON */ }
    answer.error = m;
    return render();
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of ev.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) answer.error = chunk.error.message;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) answer.text = (answer.text || "") + delta.content;
        if (chunk.usage) answer.usage = chunk.usage;
      }
    }
    render();
  }
  if (!answer.text && !answer.error) answer.text = "(empty answer)";
  render();
}

$("#pg-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("#pg-input").value.trim();
  if (!text || busy) return;
  busy = true;
  $("#pg-send").disabled = true;
  const turn = { user: text, answers: { a: {}, b: {} } };
  turns.push(turn);
  $("#pg-input").value = "";
  render();
  try {
    await Promise.all(panes().map((p) => stream(p.dataset.pane, $(".pg-model", p).value, turn.answers[p.dataset.pane])
      .catch((e) => { turn.answers[p.dataset.pane].error = e.message; render(); })));
  } finally {
    busy = false;
    $("#pg-send").disabled = false;
  }
});
$("#pg-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("#pg-form").requestSubmit();
  }
});
$("#pg-clear").addEventListener("click", () => { turns = []; render(); });

export const playgroundView = {
  show() { loadModels().catch((e) => console.warn(e.message)); },
  hide() {},
};
