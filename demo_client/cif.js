// cif.js: Dynamics 365 Channel Integration Framework 2.0 notifyEvent / cancelEvent
// for deskpush, in the browser. An ES module; no build step.
//
//   <script type="module" src="/cif.js"></script>
//   Microsoft.CIFramework.configure({ apiKey: "...", agentId: "agent-1" });
//   Microsoft.CIFramework.notifyEvent(input).then(success, failure);   // CIF's own example, unchanged
//
// notifyEvent(input, correlationId, cancellationToken) resolves with
// {value: {actionName, responseReason}} and cancelEvent(cancellationToken,
// correlationId) with {value: {cancellationToken, actionName, responseReason}};
// both reject with CIF's error object {message, msdyn_name} (plus `details`
// when the server gives them).
//
// Transport: one WebSocket to the server's /integrator endpoint, opened on the
// first call and authenticated by its first frame {"type":"hello","apiKey":...}
// (browsers cannot set an Authorization header on a WebSocket). Every request
// carries a requestId; the server answers each with exactly one `result` or
// `error` frame, and sends `status` frames (queued, displayed) in between.
//
// Error messages, msdyn names and close codes come from ./vocabulary.js
// (generated from the server's protocol/vocabulary.py), which the server
// serves beside this file: a page that loads /cif.js loads /vocabulary.js too.

import { CLOSE_CODE, ERROR_MESSAGE, MSDYN_NAME } from "./vocabulary.js";

let settings = null; // {url, apiKey, agentId}
let conn = null; // {ws, outbox: string[], open: boolean}
const pending = new Map(); // requestId -> {resolve, reject, msdynName, conn, correlationId}
const handlers = new Map(); // event name -> Set<function>
let counter = 0;

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/integrator`;
}

function normalizeUrl(url) {
  if (!url) return defaultUrl();
  const u = new URL(String(url), location.href);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/integrator";
  return u.toString();
}

function newRequestId() {
  counter += 1;
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return `r${counter}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function clientError(msdynName, details) {
  return { message: ERROR_MESSAGE.REJECT_AFTER_CLIENT, msdyn_name: msdynName, details };
}

function emit(name, detail) {
  const set = handlers.get(name);
  if (!set) return;
  for (const fn of [...set]) {
    try {
      fn(detail);
    } catch (err) {
      console.error(`cif.js: ${name} handler failed`, err);
    }
  }
}

function closeReason(code) {
  if (code === CLOSE_CODE.UNAUTHORIZED) {
    return { message: ERROR_MESSAGE.UNAUTHORIZED, details: "the server rejected the API key" };
  }
  if (code === CLOSE_CODE.MESSAGE_TOO_BIG) return { message: ERROR_MESSAGE.REJECT_AFTER_CLIENT, details: "request too large" };
  return { message: ERROR_MESSAGE.REJECT_AFTER_CLIENT, details: "connection lost" };
}

function dropConnection(c, code) {
  if (conn === c) conn = null;
  // The server keeps running the notifications of a connection that went
  // away: they still reach the agent and still end with one outcome, but that
  // outcome cannot be delivered on a new connection. The promises can only
  // be rejected here. The next call opens a new connection.
  const reason = closeReason(code);
  for (const [requestId, p] of pending) {
    if (p.conn !== c) continue;
    pending.delete(requestId);
    p.reject({ message: reason.message, msdyn_name: p.msdynName, details: reason.details });
  }
}

function onMessage(c, data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    console.warn("cif.js: ignoring a frame that is not JSON");
    return;
  }
  if (!frame || typeof frame !== "object") return;
  const p = typeof frame.requestId === "string" ? pending.get(frame.requestId) : undefined;
  switch (frame.type) {
    case "result":
      if (!p) return;
      pending.delete(frame.requestId);
      p.resolve({ value: frame.value });
      break;
    case "error":
      if (!p) {
        // Not tied to a call of ours (e.g. the server could not parse a frame).
        console.warn("cif.js: server error", frame.error);
        return;
      }
      pending.delete(frame.requestId);
      p.reject({ ...frame.error });
      break;
    case "status":
      emit("onNotifyEventStatus", {
        requestId: frame.requestId,
        notificationId: frame.notificationId,
        cancellationToken: frame.cancellationToken,
        state: frame.state,
        correlationId: p ? p.correlationId : undefined,
      });
      break;
    default:
      break;
  }
}

function connection() {
  if (conn) return conn;
  const ws = new WebSocket(settings.url);
  const c = { ws, outbox: [], open: false };
  ws.addEventListener("open", () => {
    ws.send(JSON.stringify({ type: "hello", apiKey: settings.apiKey }));
    c.open = true;
    for (const data of c.outbox) ws.send(data);
    c.outbox = [];
  });
  ws.addEventListener("message", (ev) => onMessage(c, ev.data));
  ws.addEventListener("close", (ev) => dropConnection(c, ev.code));
  conn = c;
  return c;
}

function request(msdynName, frame, correlationId) {
  return new Promise((resolve, reject) => {
    if (!settings) {
      reject(clientError(msdynName, "call Microsoft.CIFramework.configure({apiKey, agentId}) first: configure() is needed"));
      return;
    }
    if (!settings.apiKey) {
      reject(clientError(msdynName, "configure() needs an apiKey"));
      return;
    }
    let c;
    try {
      c = connection();
    } catch (err) {
      reject(clientError(msdynName, `cannot connect to ${settings.url}: ${err && err.message}`));
      return;
    }
    const requestId = newRequestId();
    const data = JSON.stringify({ ...frame, requestId });
    pending.set(requestId, { resolve, reject, msdynName, conn: c, correlationId });
    if (c.open && c.ws.readyState === WebSocket.OPEN) c.ws.send(data);
    else c.outbox.push(data);
  });
}

function optionalString(value) {
  return value === undefined || value === null || value === "" ? undefined : String(value);
}

/**
 * Set the server, the integrator API key and the default target agent.
 * `url` defaults to this page's host (ws(s)://host/integrator); an http(s)
 * URL or a bare origin is accepted too. Calling it again with another url or
 * key closes the current connection.
 */
function configure(options = {}) {
  const next = {
    url: normalizeUrl(options.url),
    apiKey: options.apiKey === undefined ? settings?.apiKey : options.apiKey,
    agentId: options.agentId === undefined ? settings?.agentId : options.agentId,
  };
  if (conn && settings && (next.url !== settings.url || next.apiKey !== settings.apiKey)) {
    const old = conn;
    conn = null;
    old.ws.close(CLOSE_CODE.NORMAL_CLOSURE, "reconfigured");
    dropConnection(old, CLOSE_CODE.NORMAL_CLOSURE);
  }
  settings = next;
}

/**
 * CIF 2.0 notifyEvent. `input`: {templateName, templateParameters,
 * cancellationToken?, agentId?}; `agentId` in input overrides the configured one.
 */
function notifyEvent(input, correlationId, cancellationToken) {
  const name = MSDYN_NAME.NOTIFY_EVENT;
  if (!input || typeof input !== "object" || Array.isArray(input)) {
    return Promise.reject(clientError(name, "input must be an object with templateName"));
  }
  const agentId = optionalString(input.agentId) ?? optionalString(settings?.agentId);
  if (settings && !agentId) {
    return Promise.reject(clientError(name, "no agentId: give it to configure() or in input"));
  }
  const frame = {
    type: "notifyEvent",
    agentId,
    input,
    cancellationToken: optionalString(cancellationToken),
    correlationId: optionalString(correlationId),
  };
  return request(name, frame, frame.correlationId);
}

/** CIF 2.0 cancelEvent: withdraw the notification with this cancellation token. */
function cancelEvent(cancellationToken, correlationId) {
  const name = MSDYN_NAME.CANCEL_EVENT;
  const token = optionalString(cancellationToken);
  if (!token) return Promise.reject(clientError(name, "cancellationToken is required"));
  const frame = { type: "cancelEvent", cancellationToken: token, correlationId: optionalString(correlationId) };
  return request(name, frame, frame.correlationId);
}

/**
 * Listen to deskpush events. "onNotifyEventStatus" gets
 * {requestId, notificationId, cancellationToken, state: "queued"|"displayed", correlationId}.
 * Resolves with true, like CIF's addHandler.
 */
function addHandler(eventName, handler) {
  if (typeof handler !== "function") return Promise.resolve(false);
  if (!handlers.has(eventName)) handlers.set(eventName, new Set());
  handlers.get(eventName).add(handler);
  return Promise.resolve(true);
}

function removeHandler(eventName, handler) {
  const removed = handlers.get(eventName)?.delete(handler) ?? false;
  return Promise.resolve(removed);
}

/** Close the connection (pending calls reject with "connection lost"). */
function disconnect() {
  if (!conn) return;
  const old = conn;
  conn = null;
  old.ws.close(CLOSE_CODE.NORMAL_CLOSURE, "disconnect");
  dropConnection(old, CLOSE_CODE.NORMAL_CLOSURE);
}

export const CIFramework = Object.freeze({
  configure,
  notifyEvent,
  cancelEvent,
  addHandler,
  removeHandler,
  disconnect,
});

window.Microsoft = window.Microsoft || {};
window.Microsoft.CIFramework = CIFramework;

export default CIFramework;
