// keygate console: lists, creates, revokes and rotates keys through the /keys API.
// Every value from the server is put on the page with textContent (never as HTML), so a key
// named "<img src=x onerror=...>" is shown as those characters. The admin token lives in
// sessionStorage (this tab only) and travels as a Bearer header; no cookie is ever set, so no
// other site can make this browser act with it.
"use strict";

const TOKEN = "keygate-admin-token";
const $ = (id) => document.getElementById(id);
let keys = [];

function token() {
  return sessionStorage.getItem(TOKEN);
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function message(text, ok) {
  const box = $("message");
  box.textContent = text || "";
  box.className = ok ? "ok" : "";
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, code, text) {
    super(text);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + token() };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const code = data && data.error ? data.error : "error";
    const text = data && data.message ? data.message : "the request failed (" + response.status + ")";
    if (response.status === 401) signOut("That admin token is not accepted: " + text);
    throw new ApiError(response.status, code, text);
  }
  return data;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text == null || text === "" ? "—" : String(text);
  row.appendChild(td);
  return td;
}

function day(timestamp) {
  return timestamp ? String(timestamp).slice(0, 10) : null;
}

function render() {
  const filter = $("filter").value.trim().toLowerCase();
  const rows = $("key-rows");
  rows.replaceChildren();
  const shown = keys.filter(
    (k) => !filter || (k.name || "").toLowerCase().includes(filter) || (k.tail || "").toLowerCase().includes(filter)
  );
  for (const key of shown) {
    const row = document.createElement("tr");
    row.dataset.id = key.id;
    cell(row, key.name, "name");
    cell(row, key.tail ? "…" + key.tail : null, "tail");
    cell(row, (key.scopes || []).join(", "), "scopes");
    const status = cell(row, null, "");
    const badge = document.createElement("span");
    badge.className = "status " + key.status;
    badge.textContent = key.status;
    status.replaceChildren(badge);
    cell(row, day(key.created_at), "created");
    cell(row, key.expires_at ? day(key.expires_at) : "never", "expires");
    cell(row, key.last_used_at ? key.last_used_at.replace("T", " ").replace("Z", " UTC") : "never", "last-used");
    const actions = cell(row, null, "actions");
    actions.replaceChildren();
    if (key.status !== "revoked") {
      actions.appendChild(button("Rotate", "rotate small quiet", () => rotate(key)));
      actions.appendChild(button("Revoke", "revoke small danger", () => revoke(key)));
    }
    rows.appendChild(row);
  }
  show("empty", shown.length === 0);
}

function button(text, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

async function load() {
  try {
    const data = await api("GET", "/keys");
    keys = data.keys || [];
    render();
    return true;
  } catch (e) {
    if (e.status !== 401) message(e.message);
    return false;
  }
}

function confirmAction(text) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
  });
}

function label(key) {
  return "“" + key.name + "” (" + key.id + (key.tail ? ", …" + key.tail : "") + ")";
}

async function revoke(key) {
  if (!(await confirmAction("Revoke " + label(key) + "? Requests with it are refused at once. This cannot be undone.")))
    return;
  try {
    await api("POST", "/keys/" + encodeURIComponent(key.id) + "/revoke");
    message("Revoked " + label(key) + ".", true);
  } catch (e) {
    message(e.message);
  }
  await load();
}

async function rotate(key) {
  if (!(await confirmAction("Rotate " + label(key) + "? A new key is made; the old one keeps working for 24 hours.")))
    return;
  try {
    const made = await api("POST", "/keys/" + encodeURIComponent(key.id) + "/rotate", { grace: "24h" });
    reveal(made, "Rotated " + label(key) + ": the old key stops working in 24 hours.");
  } catch (e) {
    message(e.message);
  }
  await load();
}

function reveal(made, about) {
  $("new-key-value").value = made.key;
  $("new-key-about").textContent = about;
  message("");
  show("new-key", true);
  $("new-key-value").focus();
  $("new-key-value").select();
}

async function create(event) {
  event.preventDefault();
  const body = { name: $("create-name").value.trim() };
  const scopes = $("create-scopes").value.split(/[\s,]+/).filter(Boolean);
  if (scopes.length) body.scopes = scopes;
  const expiry = $("create-expiry").value;
  if (expiry === "date") {
    if (!$("create-date").value) {
      message("Pick the date the key expires on.");
      return;
    }
    body.expires = $("create-date").value + "T00:00:00Z";
  } else {
    body.expires = expiry;
  }
  const rate = $("create-rate").value.trim();
  if (rate) body.rate_limit = rate;
  const quota = $("create-quota").value.trim();
  if (quota) body.quota = quota;
  try {
    const made = await api("POST", "/keys", body);
    reveal(made, "Key “" + made.name + "” (" + made.id + ") was created.");
    $("create-form").reset();
    show("create-date-label", false);
  } catch (e) {
    message(e.message);
  }
  await load();
}

async function copyKey() {
  const value = $("new-key-value").value;
  try {
    await navigator.clipboard.writeText(value);
    $("copy").textContent = "Copied";
  } catch (_) {
    // Without clipboard access (plain http on another host), selecting lets Ctrl+C do it.
    $("new-key-value").select();
    document.execCommand("copy");
    $("copy").textContent = "Selected — press Ctrl+C";
  }
}

function signOut(text) {
  sessionStorage.removeItem(TOKEN);
  keys = [];
  $("key-rows").replaceChildren();
  $("new-key-value").value = "";
  for (const id of ["keys", "create", "new-key", "sign-out"]) show(id, false);
  show("login", true);
  message(text || "");
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, $("token").value.trim());
  $("token").value = "";
  await open();
}

async function open() {
  if (!token()) {
    signOut("");
    return;
  }
  if (await load()) {
    show("login", false);
    for (const id of ["keys", "create", "sign-out"]) show(id, true);
    message("");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("create-form").addEventListener("submit", create);
  $("filter").addEventListener("input", render);
  $("refresh").addEventListener("click", load);
  $("copy").addEventListener("click", copyKey);
  $("sign-out").addEventListener("click", () => signOut("The token is forgotten in this tab."));
  $("new-key-done").addEventListener("click", () => {
    $("new-key-value").value = "";
    $("copy").textContent = "Copy";
    show("new-key", false);
  });
  $("create-expiry").addEventListener("change", () => show("create-date-label", $("create-expiry").value === "date"));
  open();
});
