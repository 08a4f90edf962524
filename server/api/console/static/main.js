// The console's shell: sign-in against GET /v1/me, navigation limited to what the key's scopes allow, one view at a time.

import { $, $$, ApiError, api, auth } from "./api.js";
import { adaptersView } from "./adapters.js";
import { finetuneView } from "./finetune.js";
import { playgroundView } from "./playground.js";
import { routesView } from "./routes.js";

const VIEWS = { adapters: adaptersView, routes: routesView, finetune: finetuneView, playground: playgroundView };
const ctx = { me: null, can: (scope) => !!ctx.me && ctx.me.scopes.includes(scope) };
let current = null;

async function signIn(key) {
  auth.key = key;
  let me;
  try {
    me = await api("/v1/me");
  } catch (e) {
    auth.key = "";
    throw e;
  }
  ctx.me = me;
  $("#signin").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  $("#who-tenant").textContent = me.auth ? `tenant ${me.tenant}` : "open mode (no API keys configured)";
  $("#who-scopes").textContent = me.scopes.join(" · ");
  $("#sign-out").hidden = !me.auth;
  // what the scopes do not allow is removed, not greyed out: a key without admin sees no route controls at all
  for (const el of $$("[data-scope]")) el.hidden = !ctx.can(el.dataset.scope);
  route();
}

function showSignIn(message = "") {
  ctx.me = null;
  if (current) current.hide();
  current = null;
  $$(".view").forEach((v) => (v.hidden = true));
  $("#nav").hidden = true;
  $("#who").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#signin-key").focus();
}

function route() {
  if (!ctx.me) return;
  const allowed = Object.keys(VIEWS).filter((v) => !$(`nav a[data-view=${v}]`).hidden);
  let name = location.hash.slice(1);
  if (!allowed.includes(name)) name = allowed[0];
  if (!name) {
    showSignIn("This key has no scope the console can use.");
    return;
  }
  if (current) current.hide();
  $$(".view").forEach((v) => (v.hidden = v.id !== `view-${name}`));
  $$("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  current = VIEWS[name];
  current.show(ctx);
}

window.addEventListener("hashchange", route);
$("#signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await signIn($("#signin-key").value.trim());
  } catch (e) {
    $("#signin-error").textContent = e.status === 401 ? "This key is not valid." : e.message;
  }
});
$("#sign-out").addEventListener("click", () => {
  auth.key = "";
  showSignIn();
});

// Start: a stored key, else no key (open mode answers without one); a 401 asks for a key.
signIn(auth.key).catch((e) => showSignIn(e instanceof ApiError && e.status === 401 ? "" : e.message));
