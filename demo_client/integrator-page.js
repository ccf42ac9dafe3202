// The integrator console: sends offers through cif.js exactly as a CIF 2.0
// integration would (Microsoft.CIFramework.notifyEvent / cancelEvent).

import { CIFramework } from "./cif.js";
import { OUTCOME } from "./vocabulary.js";

const KEY_STORAGE = "deskpush.apiKey";
const $ = (id) => document.getElementById(id);

// The built-in templates of protocol/templates.py and the parameters they use.
const TEMPLATES = {
  msdyn_chat_incoming_unauthenticated: { customerName: "Jane Doe", queueName: "Support", comment: "Order #4417 arrived damaged" },
  msdyn_chat_incoming_authenticated: { customerName: "Jane Doe", accountName: "Contoso Ltd", queueName: "Premium support", comment: "" },
  msdyn_chat_transfer: { customerName: "Jane Doe", fromAgent: "Sam (Tier 1)", comment: "Needs a refund approval" },
  msdyn_voicecall_incoming_unauthenticated: { callerId: "+44 20 7946 0321", queueName: "Billing" },
  msdyn_voicecall_incoming_authenticated: { callerId: "+44 20 7946 0321", customerName: "Jane Doe", queueName: "Billing" },
  msdyn_chat_incoming_autoaccept: { customerName: "Jane Doe", queueName: "Support" },
};
const CUSTOM = "__custom__";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function newToken() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return `ct-${crypto.randomUUID()}`;
  return `ct-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

// ---------------------------------------------------------------------------
// Fragment: #apiKey=...&agentId=... (the key is then scrubbed from the address bar)

function readFragment() {
  const hash = location.hash.replace(/^#/, "");
  const params = new URLSearchParams(hash);
  const apiKey = params.get("apiKey");
  const agentId = params.get("agentId");
  if (apiKey) {
    try {
      sessionStorage.setItem(KEY_STORAGE, apiKey);
    } catch {
      /* storage disabled */
    }
    params.delete("apiKey");
    const rest = params.toString();
    history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  let stored = null;
  try {
    stored = sessionStorage.getItem(KEY_STORAGE);
  } catch {
    /* storage disabled */
  }
  const key = apiKey || stored;
  if (key) $("api-key").value = key;
  if (agentId) $("agent-id").value = agentId;
}

// ---------------------------------------------------------------------------
// Template picker and parameter rows

function fillTemplates() {
  const select = $("template");
  for (const name of Object.keys(TEMPLATES)) {
    const opt = el("option", "", name);
    opt.value = name;
    select.appendChild(opt);
  }
  const custom = el("option", "", "Other (configured template)…");
  custom.value = CUSTOM;
  select.appendChild(custom);
  select.addEventListener("change", onTemplateChange);
  onTemplateChange();
}

function onTemplateChange() {
  const name = $("template").value;
  $("custom-template-row").hidden = name !== CUSTOM;
  const params = $("params");
  params.replaceChildren();
  const defaults = TEMPLATES[name] || {};
  const entries = Object.entries(defaults);
  if (!entries.length) entries.push(["", ""]);
  for (const [k, v] of entries) addParamRow(k, v);
}

let paramSeq = 0;

function addParamRow(key = "", value = "") {
  paramSeq += 1;
  const row = el("div", "param-row");
  const k = el("input");
  k.type = "text";
  k.className = "param-key";
  k.placeholder = "key";
  k.value = key;
  k.spellcheck = false;
  k.setAttribute("aria-label", `Parameter ${paramSeq} name`);
  const v = el("input");
  v.type = "text";
  v.className = "param-value";
  v.placeholder = "value";
  v.value = value;
  v.setAttribute("aria-label", `Parameter ${paramSeq} value`);
  const remove = el("button", "btn btn-secondary btn-small param-remove", "×");
  remove.type = "button";
  remove.setAttribute("aria-label", `Remove parameter ${paramSeq}`);
  remove.addEventListener("click", () => row.remove());
  row.append(k, v, remove);
  $("params").appendChild(row);
  return row;
}

function readParams() {
  const out = {};
  for (const row of $("params").querySelectorAll(".param-row")) {
    const key = row.querySelector(".param-key").value.trim();
    if (key) out[key] = row.querySelector(".param-value").value;
  }
  return out;
}

// ---------------------------------------------------------------------------
// The log of offers

// Keyed by the vocabulary's "actionName/responseReason" strings; other outcomes are "bad".
const OUTCOME_TONE = {
  [OUTCOME.ACCEPTED]: "good",
  [OUTCOME.AUTO_ACCEPTED]: "good",
  [OUTCOME.DECLINED]: "neutral",
  [OUTCOME.DISPLAY_TIMEOUT]: "warn",
  [OUTCOME.CANCELLED]: "neutral",
};

const rows = new Map(); // cancellationToken -> row refs

function addLogRow(templateName, agentId, token, correlationId) {
  const item = el("li", "log-item");
  item.dataset.cancellationToken = token;
  item.appendChild(el("span", "log-title", `${templateName} → ${agentId}`));
  const meta = el("span", "log-meta", `token ${token}${correlationId ? ` · correlation ${correlationId}` : ""}`);
  item.appendChild(meta);
  const side = el("div", "log-side");
  const chip = el("span", "state-chip tone-live", "sending");
  const cancel = el("button", "btn btn-secondary btn-small log-cancel", "Cancel");
  cancel.type = "button";
  cancel.setAttribute("aria-label", `Cancel offer ${templateName} to ${agentId}`);
  side.append(chip, cancel);
  item.appendChild(side);
  $("log").prepend(item);
  $("log-empty").hidden = true;
  const row = { item, chip, cancel, meta, done: false };
  rows.set(token, row);
  cancel.addEventListener("click", () => cancelOffer(token, correlationId));
  return row;
}

function setChip(row, text, tone) {
  row.chip.textContent = text;
  row.chip.className = `state-chip tone-${tone}`;
}

function finish(row, text, tone) {
  row.done = true;
  setChip(row, text, tone);
  row.cancel.hidden = true;
  row.item.dataset.result = text;
}

async function cancelOffer(token, correlationId) {
  const row = rows.get(token);
  if (!row || row.done) return;
  row.cancel.disabled = true;
  try {
    const { value } = await CIFramework.cancelEvent(token, correlationId || undefined);
    // The outcome that stands: CancelledByIntegrator, or what happened first.
    row.item.dataset.cancelResult = `${value.actionName}/${value.responseReason}`;
  } catch (err) {
    row.cancel.disabled = false;
    row.item.dataset.cancelResult = err.message;
    setMessage(`cancelEvent failed: ${err.message}${err.details ? ` (${err.details})` : ""}`);
  }
}

function setMessage(text) {
  $("form-message").textContent = text;
}

// ---------------------------------------------------------------------------
// Send

async function send(ev) {
  ev.preventDefault();
  const apiKey = $("api-key").value.trim();
  const agentId = $("agent-id").value.trim();
  const templateName = $("template").value === CUSTOM ? $("custom-template").value.trim() : $("template").value;
  if (!apiKey || !agentId || !templateName) {
    setMessage("Agent id, API key and template are required.");
    return;
  }
  setMessage("");
  try {
    sessionStorage.setItem(KEY_STORAGE, apiKey);
  } catch {
    /* storage disabled */
  }
  CIFramework.configure({ apiKey, agentId });
  const token = newToken();
  const correlationId = $("correlation-id").value.trim() || undefined;
  const input = { templateName, templateParameters: readParams() };
  const row = addLogRow(templateName, agentId, token, correlationId);
  try {
    const result = await CIFramework.notifyEvent(input, correlationId, token);
    const { actionName, responseReason } = result.value;
    finish(row, `${actionName} / ${responseReason}`, OUTCOME_TONE[`${actionName}/${responseReason}`] || "bad");
  } catch (err) {
    finish(row, err.message || "error", "bad");
    if (err.details) row.meta.textContent += ` · ${err.details}`;
  }
}

// cif.js's connection, as the pill in the top bar shows it. Offers still
// pending stay pending across a drop; cif.js reconnects by itself.
function showConnection(change) {
  const pill = $("connection");
  let text;
  let state = change.state;
  if (state === "connected") {
    text = "Connected";
    if (change.complete === false) setMessage(`Reconnected, but earlier outcomes could not be recovered: ${change.details}`);
  } else if (state === "connecting") {
    text = "Connecting…";
  } else if (state === "reconnecting") {
    const secs = Math.ceil(change.delayMs / 1000);
    text = `Reconnecting (${change.pending} pending)${secs > 1 ? ` in ${secs} s` : "…"}`;
  } else if (change.unauthorized) {
    state = "rejected";
    text = "API key rejected";
  } else {
    state = "idle";
    text = "Not connected";
  }
  pill.dataset.state = state;
  $("connection-text").textContent = text;
}

CIFramework.addHandler("onConnectionStateChange", showConnection);

CIFramework.addHandler("onNotifyEventStatus", (status) => {
  const row = rows.get(status.cancellationToken);
  if (row && !row.done) setChip(row, status.state, "live");
});

readFragment();
fillTemplates();
$("add-param").addEventListener("click", () => addParamRow().querySelector("input").focus());
$("offer-form").addEventListener("submit", send);
