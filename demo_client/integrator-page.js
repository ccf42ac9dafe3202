// The integrator console: sends offers through cif.js exactly as a CIF 2.0
// integration would (Microsoft.CIFramework.notifyEvent / cancelEvent).

import { CIFramework } from "./cif.js";
import { ERROR_MESSAGE, OUTCOME } from "./vocabulary.js";

const KEY_STORAGE = "deskpush.apiKey";
const $ = (id) => document.getElementById(id);

// Sample values for the parameters of the built-in templates, so an offer
// can be sent at once; any other parameter starts empty.
const SAMPLES = {
  customerName: "Jane Doe",
  accountName: "Contoso Ltd",
  queueName: "Support",
  comment: "Order #4417 arrived damaged",
  fromAgent: "Sam (Tier 1)",
  callerId: "+44 20 7946 0321",
};

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
// Template picker and parameters: the server's templates (templates frame)

let templates = new Map(); // name -> {name, title, icon, timeout, autoAccept, parameters}
let loadedFor = null; // the API key the list was loaded with

function pickerMessage(text) {
  const select = $("template");
  const opt = el("option", "", text);
  opt.value = "";
  select.replaceChildren(opt);
  select.disabled = true;
  templates = new Map();
  onTemplateChange();
}

async function loadTemplates() {
  const apiKey = $("api-key").value.trim();
  if (!apiKey) {
    loadedFor = null;
    pickerMessage("Enter the API key to load the server's templates");
    return;
  }
  if (apiKey === loadedFor) return;
  loadedFor = apiKey;
  CIFramework.configure({ apiKey, agentId: $("agent-id").value.trim() || undefined });
  pickerMessage("Loading templates…");
  let list;
  try {
    list = await CIFramework.deskpush.listTemplates();
  } catch (err) {
    if (loadedFor !== apiKey) return; // another key meanwhile
    loadedFor = null;
    pickerMessage(err.message === ERROR_MESSAGE.UNAUTHORIZED ? "API key rejected: no templates" : "Templates unavailable");
    setMessage(`Could not load the templates: ${err.message}${err.details ? ` (${err.details})` : ""}`);
    return;
  }
  if (loadedFor !== apiKey) return;
  const select = $("template");
  const previous = select.value;
  templates = new Map(list.map((t) => [t.name, t]));
  select.replaceChildren(...list.map((t) => {
    const opt = el("option", "", t.name);
    opt.value = t.name;
    return opt;
  }));
  select.disabled = list.length === 0;
  if (templates.has(previous)) select.value = previous;
  setMessage("");
  onTemplateChange();
}

function onTemplateChange() {
  const t = templates.get($("template").value);
  const params = $("params");
  params.replaceChildren();
  $("params-set").hidden = !t || t.parameters.length === 0;
  if (!t) {
    $("template-hint").textContent = "";
    return;
  }
  const how = t.autoAccept ? "accepted automatically" : `${t.timeout} s to answer`;
  $("template-hint").textContent = `“${t.title}” · ${t.icon} · ${how}${t.parameters.length ? "" : " · no parameters"}`;
  for (const name of t.parameters) addParamRow(name, SAMPLES[name] ?? "");
}

function addParamRow(name, value) {
  const row = el("div", "param-row");
  const input = el("input");
  input.id = `param-${name}`;
  input.type = "text";
  input.className = "param-value";
  input.dataset.param = name;
  input.value = value;
  const label = el("label", "param-key", name);
  label.htmlFor = input.id;
  row.append(label, input);
  $("params").appendChild(row);
  return row;
}

function readParams() {
  const out = {};
  for (const input of $("params").querySelectorAll(".param-value")) {
    if (input.value !== "") out[input.dataset.param] = input.value;
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
  const templateName = $("template").value;
  if (!apiKey || !agentId) {
    setMessage("Agent id and API key are required.");
    return;
  }
  if (apiKey !== loadedFor || !templates.has(templateName)) {
    loadTemplates();
    setMessage("Choose a template of the server first.");
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
$("template").addEventListener("change", onTemplateChange);
$("api-key").addEventListener("change", loadTemplates);
$("offer-form").addEventListener("submit", send);
loadTemplates();
