// medrl rating workbench: the rating page's only script (no build step, no dependencies).
"use strict";

const H = { "Content-Type": "application/json", "X-Medrl": "1" };
let state = null;   // protocol, rubric, totals (GET /api/state)
let item = null;    // the item on screen (GET /api/item/POS)
let chosen = null;  // the 1-3 rating chosen on screen
let busy = false;

const $ = (id) => document.getElementById(id);

async function api(method, url, body) {
  const res = await fetch(url, {
    method, headers: H, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    let detail = data && data.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    const err = new Error(detail || `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function show(id) {
  for (const s of ["app", "done", "login"]) { const el = $(s); if (el) el.hidden = s !== id; }
}

function say(text, bad) {
  const el = $("status");
  el.textContent = text || "";
  el.className = bad ? "bad" : "";
}

function progress(answered, total) {
  $("progress").textContent = `${answered} of ${total} rated`;
}

async function login() {
  const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (!m) return;
  history.replaceState(null, "", location.pathname);  // the token leaves the address bar
  await api("POST", "/api/login", { token: m[1] });
  if (location.pathname === "/admin") location.reload();
}

function buildControls() {
  const box = $("ratings");
  box.textContent = "";
  for (const [value, text] of Object.entries(state.rubric)) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "rating";
    b.id = `rating-${value}`;
    b.setAttribute("role", "radio");
    b.setAttribute("aria-checked", "false");
    b.innerHTML = `<kbd></kbd> <span></span>`;
    b.querySelector("kbd").textContent = value;
    b.querySelector("span").textContent = text;
    b.addEventListener("click", () => choose(Number(value)));
    box.appendChild(b);
  }
  const asp = $("aspects");
  asp.textContent = "";
  for (const [name, help] of Object.entries(state.aspects)) {
    const row = document.createElement("label");
    row.className = "aspect";
    row.innerHTML = `<span class="name"></span><input type="number" min="0" step="0.5" required><small></small>`;
    row.querySelector(".name").textContent = name.replaceAll("_", " ");
    const input = row.querySelector("input");
    input.id = `aspect-${name}`;
    input.max = String(state.aspect_max);
    row.querySelector("small").textContent = help;
    asp.appendChild(row);
  }
  $("protocol").textContent = state.protocol_text;
}

function choose(value) {
  chosen = value;
  for (const b of document.querySelectorAll("#ratings .rating")) {
    b.setAttribute("aria-checked", b.id === `rating-${value}` ? "true" : "false");
  }
}

async function load(pos) {
  if (pos === null || pos === undefined) {
    show("done");
    return;
  }
  item = await api("GET", `/api/item/${pos}`);
  show("app");
  $("image").src = item.image;
  $("image").classList.remove("zoom");
  $("prompt").textContent = item.prompt;
  const a = item.answer;
  chosen = null;
  choose(a ? a.rating : null);
  $("comment").value = a ? a.comment : "";
  for (const name of Object.keys(state.aspects)) {
    const v = a && a.aspects[name];
    $(`aspect-${name}`).value = v === undefined || v === null ? "" : String(v);
  }
  progress(item.answered, item.total);
  say(a ? "you rated this one already: a new answer replaces it (both are kept)" : "");
  document.title = `${item.pos + 1}/${item.total}: medrl rating`;
}

async function submit() {
  if (busy || !item) return;
  if (chosen === null) { say("choose a rating first (1, 2 or 3)", true); return; }
  const aspects = {};
  for (const name of Object.keys(state.aspects)) {
    const raw = $(`aspect-${name}`).value.trim();
    const v = Number(raw);
    if (raw === "" || !Number.isFinite(v) || v < 0 || v > state.aspect_max) {
      say(`${name.replaceAll("_", " ")}: a number from 0 to ${state.aspect_max}`, true);
      $(`aspect-${name}`).focus();
      return;
    }
    aspects[name] = v;
  }
  busy = true;
  try {
    const r = await api("POST", "/api/answer", {
      item_id: item.item_id, nonce: item.nonce, rating: chosen, aspects,
      comment: $("comment").value,
    });
    progress(r.answered, r.total);
    const next = await api("GET", `/api/next?after=${item.pos}`);
    await load(next.pos);
  } catch (e) {
    say(e.message, true);
  } finally {
    busy = false;
  }
}

async function skip() {
  if (busy || !item) return;
  const next = await api("GET", `/api/next?after=${item.pos}`);
  // nothing left unanswered (a rater reviewing): S moves on to the next position
  const moveOn = next.pos === null || next.pos === item.pos;
  await load(moveOn ? (item.pos + 1) % item.total : next.pos);
}

async function previous() {
  if (busy || !state) return;
  const total = state.total;
  const at = item && !$("app").hidden ? item.pos : total;
  await load((at - 1 + total) % total);
}

function onKey(e) {
  const typing = e.target && (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT");
  if (typing) {
    if (e.key === "Escape") e.target.blur();
    else if (e.key === "Enter" && e.target.tagName === "INPUT") { e.preventDefault(); submit(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const key = e.key.toLowerCase();
  if (state && state.rubric[key] !== undefined && !$("app").hidden) { choose(Number(key)); }
  else if (key === "enter") { e.preventDefault(); submit(); }
  else if (key === "s" || key === "arrowright") skip();
  else if (key === "p" || key === "arrowleft") previous();
  else if (key === "z") $("image").classList.toggle("zoom");
  else if (key === "c") { e.preventDefault(); $("comment").focus(); }
  else return;
  e.preventDefault();
}

async function main() {
  try {
    await login();
  } catch (e) {
    show("login");
    $("login-message").textContent = e.message;
    return;
  }
  if (!$("app")) return;  // the admin's login page
  try {
    state = await api("GET", "/api/state");
  } catch (e) {
    show("login");
    $("login-message").textContent = e.message;
    return;
  }
  $("who").textContent = `rater: ${state.rater}`;
  buildControls();
  progress(state.answered, state.total);
  $("image").addEventListener("click", () => $("image").classList.toggle("zoom"));
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("prev").addEventListener("click", previous);
  document.addEventListener("keydown", onKey);
  await load(state.resume);
}

document.addEventListener("DOMContentLoaded", main);
