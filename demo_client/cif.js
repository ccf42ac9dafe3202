// cif.js: Dynamics 365 Channel Integration Framework 2.0 notifyEvent / cancelEvent
// for deskpush, in the browser. An ES module; no build step.
//
//   <script type="module" src="https://deskpush.example/cif.js"></script>
//   Microsoft.CIFramework.configure({ url: "wss://deskpush.example", apiKey: "...", agentId: "agent-1" });
//   Microsoft.CIFramework.notifyEvent(input).then(success, failure);   // CIF's own example, unchanged
//
// A page on any origin may load it from deskpush (the server sends it, and the
// ./vocabulary.js it imports, with Access-Control-Allow-Origin: *), or serve
// a copy of both files itself; docs/integrating.md shows both. `url` defaults
// to the server this file was loaded from.
//
// notifyEvent(input, correlationId, cancellationToken) resolves with
// {value: {actionName, responseReason}} and cancelEvent(cancellationToken,
// correlationId) with {value: {cancellationToken, actionName, responseReason}};
// both reject with CIF's error object {message, msdyn_name} (plus `details`
// when there are any).
//
// Transport: wire protocol v1.1 on the server's /integrator endpoint. One
// WebSocket, opened on the first call and authenticated by its first frame
// {"type":"hello","apiKey":...,"resumeAfter":...} (browsers cannot set an
// Authorization header on a WebSocket). Every request carries a requestId (a
// UUID); the server answers each with exactly one `result` or `error` frame,
// and sends `status` frames (queued, displayed) in between.
//
// Outcomes survive a dropped connection and a server restart (v1.1):
//
// - resumeAfter is "$" on the page's first connection ("nothing to replay,
//   start me now"), then the newest outcomeId this page has been given: by
//   every notifyEvent `result` and by `resumed.lastOutcomeId`.
// - The server first replays the key's results after that point, then sends
//   {"type":"resumed","complete":...,"lastOutcomeId":...}. Only then does this
//   connection carry requests: calls made meanwhile wait, in order. No
//   `resumed` within 10 s of starting the connection counts as a drop.
// - A drop (any close but 4401, including 1001 going away and 1012 service
//   restart, or a connection that cannot be opened) does not settle anything:
//   pending calls stay pending. While at least one is pending, cif.js
//   reconnects by itself, with exponential backoff and equal jitter (250 ms
//   doubling up to 5 s, for as long as calls are pending; after a 1012 the
//   backoff starts again at its first step); with nothing pending it
//   reconnects on the next call. Calls made while reconnecting wait.
// - Replayed results settle the calls they answer; a requestId settles once.
//   Then, on `resumed`:
//   - complete: true: every call still unanswered is sent again with the same
//     requestId (the server deduplicates requestIds on v1.1 connections, so a
//     notifyEvent it already has is not offered twice);
//   - complete: false (the server's history does not reach back far enough,
//     e.g. it restarted without server.stateFile): a notifyEvent that had
//     been sent is rejected with {message: "OutcomeUnknownError",
//     msdyn_name: "NotifyEvent", details: <the server's details>}: its offer
//     may or may not exist, and its outcome will never be known here. Calls
//     never sent yet, and cancelEvents (always safe to repeat), are sent.
// - A close with 1009 (frame too large) rejects the request that caused it
//   (RejectAfterClientError) instead of sending it again.
// - A close with 4401 (bad API key) rejects every pending call with
//   UnauthorizedError and does not reconnect. disconnect(), and configure()
//   with another url or apiKey, reject every pending call with
//   RejectAfterClientError (details say the page disconnected).
// - cif.js never sends `ack`: a page stores no outcomes, and several pages
//   may share one API key. The server's retention limits bound the history.
//
// Beyond CIF: Microsoft.CIFramework.deskpush.listTemplates() resolves with
// the server's templates, [{name, title, icon, timeout, autoAccept,
// parameters}] (the `templates` frame of docs/protocol.md).
//
// Events for addHandler (handlers are called synchronously, errors logged):
//
// - "onNotifyEventStatus": {requestId, notificationId, cancellationToken,
//   state: "queued"|"displayed", correlationId}.
// - "onConnectionStateChange": {state, pending, ...} where state is
//   - "connecting": a connection is opening (the first, or a lazy one);
//   - "connected": `resumed` arrived, requests flow; also {complete, details,
//     replayed} (details only when complete is false);
//   - "reconnecting": it dropped with calls pending; a retry follows in
//     {delayMs}; also {attempt, code, reason} (the close code and reason);
//   - "disconnected": closed with nothing to wait for (nothing pending, or
//     disconnect(), or another configure()); also {code, reason}, and
//     {unauthorized: true} after a 4401.
//   `pending` is the number of calls not settled yet.
//
// Error messages, msdyn names and close codes come from ./vocabulary.js
// (generated from the server's protocol/vocabulary.py), which the server
// serves beside this file: a page that loads /cif.js loads /vocabulary.js too.

import { CLOSE_CODE, ERROR_MESSAGE, MSDYN_NAME } from "./vocabulary.js";

// resumeAfter of a client with no position yet: replay nothing, start now.
const RESUME_NOW = "$";
const BACKOFF_FIRST_MS = 250;
const BACKOFF_CAP_MS = 5000;
// A connection that had been resumed this long before it dropped restarts the
// backoff at its first step; a shorter one (a server that accepts, then
// fails) keeps doubling it.
const STABLE_MS = 5000;
// A connection without `resumed` this long after it was started (a connect
// that hangs, a server that never answers the hello) counts as dropped.
const RESUME_TIMEOUT_MS = 10000;

let settings = null; // {url, apiKey, agentId}
let conn = null; // {ws, ready, readyAt: ms, deadline: timer}: the one connection, opening, resuming or ready
// The newest outcomeId this page was given: resumeAfter of the next
// connection. null before the first `resumed` (then "$").
let position = null;
let attempt = 0; // reconnects since the last stable connection: the backoff step
let retryTimer = null;
let reconnecting = false; // dropped with calls pending, and not resumed since
// requestId -> {resolve, reject, msdynName, data, correlationId, sentOn, sent}.
// Map order is call order, which is the order calls are sent again.
const pending = new Map();
const handlers = new Map(); // event name -> Set<function>
let counter = 0;

function defaultUrl() {
  // The server this file came from: the page's own when deskpush serves the
  // page, deskpush's when a page elsewhere loads it from there. A copy served
  // by the page's own site (vendored) must be given the url.
  const here = new URL(import.meta.url);
  const scheme = here.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${here.host}/integrator`;
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
  // v1.1 servers remember requestIds per API key: they must be unique.
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

function emitState(state, detail = {}) {
  emit("onConnectionStateChange", { state, pending: pending.size, ...detail });
}

function settle(requestId, how, value) {
  const p = pending.get(requestId);
  if (!p) return; // not ours, or settled already: a requestId settles once
  pending.delete(requestId);
  p[how](value);
}

function rejectAll(message, details) {
  for (const [requestId, p] of [...pending]) {
    settle(requestId, "reject", { message, msdyn_name: p.msdynName, details });
  }
}

function remember(outcomeId) {
  // outcomeIds sort as strings in the order the outcomes happened. Keep the
  // newest: a notifyEvent sent again after it ended is answered with its old one.
  if (typeof outcomeId === "string" && outcomeId && (position === null || outcomeId > position)) position = outcomeId;
}

function send(c, requestId) {
  const p = pending.get(requestId);
  c.ws.send(p.data);
  p.sentOn = c;
  p.sent = true;
}

// ---------------------------------------------------------------------------
// Frames from the server

function onMessage(c, data) {
  if (conn !== c) return; // a connection this page has given up
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    console.warn("cif.js: ignoring a frame that is not JSON");
    return;
  }
  if (!frame || typeof frame !== "object") return;
  const requestId = typeof frame.requestId === "string" ? frame.requestId : undefined;
  switch (frame.type) {
    case "result":
      // Replayed or live; for a call of this page or, after its connection
      // dropped, of another page with the same key (then only the position moves).
      remember(frame.outcomeId);
      if (requestId !== undefined) settle(requestId, "resolve", { value: frame.value });
      break;
    case "error":
      if (requestId === undefined || !pending.has(requestId)) {
        // Not tied to a call of ours (e.g. the server could not parse a frame).
        console.warn("cif.js: server error", frame.error);
        return;
      }
      settle(requestId, "reject", { ...frame.error });
      break;
    case "status":
      emit("onNotifyEventStatus", {
        requestId,
        notificationId: frame.notificationId,
        cancellationToken: frame.cancellationToken,
        state: frame.state,
        correlationId: pending.get(requestId)?.correlationId,
      });
      break;
    case "templates":
      if (requestId !== undefined) settle(requestId, "resolve", Array.isArray(frame.templates) ? frame.templates : []);
      break;
    case "resumed":
      onResumed(c, frame);
      break;
    default:
      break;
  }
}

function onResumed(c, frame) {
  if (c.ready) {
    console.warn("cif.js: ignoring a second resumed frame");
    return;
  }
  c.ready = true;
  c.readyAt = Date.now();
  clearTimeout(c.deadline);
  reconnecting = false;
  // Where this page stands now, by the server's word (after a restart without
  // stateFile, a position of the old server means nothing to the new one).
  if (typeof frame.lastOutcomeId === "string" && frame.lastOutcomeId) position = frame.lastOutcomeId;
  const complete = frame.complete !== false;
  const details = typeof frame.details === "string" && frame.details ? frame.details
    : "the server's outcome history does not reach back to this page's last outcome";
  for (const [requestId, p] of [...pending]) {
    if (!pending.has(requestId)) continue;
    if (!complete && p.sent && p.msdynName === MSDYN_NAME.NOTIFY_EVENT) {
      // It may have reached the server, and its outcome may have been
      // forgotten: neither an offer nor its absence can be vouched for.
      settle(requestId, "reject", { message: ERROR_MESSAGE.OUTCOME_UNKNOWN, msdyn_name: p.msdynName, details });
      continue;
    }
    if (c.ws.readyState !== WebSocket.OPEN) break; // dropped meanwhile: the close event takes over
    send(c, requestId);
  }
  emitState("connected", complete ? { complete, replayed: frame.count } : { complete, details, replayed: frame.count });
}

function onClose(c, ev) {
  if (conn !== c) return; // closed by disconnect() or configure(), which settled everything
  conn = null;
  clearTimeout(c.deadline);
  const { code, reason } = ev;
  if (code === CLOSE_CODE.UNAUTHORIZED) {
    // Retrying cannot help: the key is wrong or was revoked.
    attempt = 0;
    reconnecting = false;
    rejectAll(ERROR_MESSAGE.UNAUTHORIZED, "the server rejected the API key");
    emitState("disconnected", { code, reason, unauthorized: true });
    return;
  }
  if (code === CLOSE_CODE.MESSAGE_TOO_BIG) rejectTooBig(c);
  if (c.readyAt && Date.now() - c.readyAt >= STABLE_MS) attempt = 0;
  // 1012: the server is draining for a restart, nothing failed: the first step again.
  if (code === CLOSE_CODE.SERVICE_RESTART) attempt = 0;
  if (pending.size === 0) {
    reconnecting = false;
    emitState("disconnected", { code, reason });
    return;
  }
  scheduleReconnect(code, reason);
}

function rejectTooBig(c) {
  // The server refused one frame of this connection for its size, without
  // handling it (so its outcome is known: there is none). The frames it did
  // handle were at most its limit; the largest frame not answered yet is over
  // it. Reject that one; another too large, if any, gets its own 1009 later.
  const size = (p) => new TextEncoder().encode(p.data).length;
  let largest = 0;
  for (const p of pending.values()) if (p.sentOn === c) largest = Math.max(largest, size(p));
  for (const [requestId, p] of [...pending]) {
    if (p.sentOn === c && size(p) === largest) {
      settle(requestId, "reject", clientError(p.msdynName, "request too large: the server closed the connection (1009)"));
    }
  }
}

// ---------------------------------------------------------------------------
// The connection

function connect() {
  clearTimeout(retryTimer);
  retryTimer = null;
  const { url, apiKey } = settings;
  let ws;
  try {
    ws = new WebSocket(url);
  } catch (err) {
    // A URL no WebSocket can open: retrying cannot help.
    reconnecting = false;
    rejectAll(ERROR_MESSAGE.REJECT_AFTER_CLIENT, `cannot connect to ${url}: ${err && err.message}`);
    emitState("disconnected", {});
    return;
  }
  const c = { ws, ready: false, readyAt: 0, deadline: null };
  conn = c;
  c.deadline = setTimeout(() => {
    if (conn !== c || c.ready) return;
    onClose(c, { code: CLOSE_CODE.ABNORMAL_CLOSURE, reason: `no resumed within ${RESUME_TIMEOUT_MS / 1000} s` });
    ws.close();
  }, RESUME_TIMEOUT_MS);
  ws.addEventListener("open", () => {
    if (conn !== c) return;
    ws.send(JSON.stringify({ type: "hello", apiKey, resumeAfter: position ?? RESUME_NOW }));
  });
  ws.addEventListener("message", (ev) => onMessage(c, ev.data));
  ws.addEventListener("close", (ev) => onClose(c, ev));
  if (!reconnecting) emitState("connecting", {});
}

function scheduleReconnect(code, reason) {
  // Equal jitter: at least half the step, so retries do not bunch up near
  // zero, and spread over the other half, so pages reconnecting to a
  // restarted server do not all arrive at once.
  const step = Math.min(BACKOFF_CAP_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 16));
  const delay = step / 2 + Math.random() * (step / 2);
  attempt += 1;
  reconnecting = true;
  clearTimeout(retryTimer);
  retryTimer = setTimeout(connect, delay);
  emitState("reconnecting", { attempt, delayMs: Math.round(delay), code, reason });
}

function retryNow() {
  // The browser is back online: no need to wait out the backoff.
  if (retryTimer !== null && settings) connect();
}

/** Give up the connection and every pending call (disconnect(), configure()). */
function stop(details, closeReason) {
  clearTimeout(retryTimer);
  const wasActive = conn !== null || retryTimer !== null || pending.size > 0;
  retryTimer = null;
  attempt = 0;
  reconnecting = false;
  const old = conn;
  conn = null;
  if (old) {
    clearTimeout(old.deadline);
    old.ws.close(CLOSE_CODE.NORMAL_CLOSURE, closeReason);
  }
  rejectAll(ERROR_MESSAGE.REJECT_AFTER_CLIENT, details);
  if (wasActive) emitState("disconnected", { code: CLOSE_CODE.NORMAL_CLOSURE, reason: closeReason });
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
    const requestId = newRequestId();
    const data = JSON.stringify({ ...frame, requestId });
    pending.set(requestId, { resolve, reject, msdynName, data, correlationId, sentOn: null, sent: false });
    if (conn && conn.ready && conn.ws.readyState === WebSocket.OPEN) send(conn, requestId);
    else if (!conn && retryTimer === null) connect();
    // Otherwise it waits: for `resumed` on the connection being opened, or for
    // the retry that is scheduled.
  });
}

function optionalString(value) {
  return value === undefined || value === null || value === "" ? undefined : String(value);
}

/**
 * Set the server, the integrator API key and the default target agent.
 * `url` defaults to the host this file was loaded from (ws(s)://host/integrator):
 * deskpush itself, unless the file was copied to another site; an http(s)
 * URL or a bare origin is accepted too. Calling it again with another url or
 * key closes the current connection and rejects the pending calls
 * (RejectAfterClientError); the next call starts afresh (resumeAfter "$").
 */
function configure(options = {}) {
  const next = {
    url: normalizeUrl(options.url),
    apiKey: options.apiKey === undefined ? settings?.apiKey : options.apiKey,
    agentId: options.agentId === undefined ? settings?.agentId : options.agentId,
  };
  if (settings && (next.url !== settings.url || next.apiKey !== settings.apiKey)) {
    stop("the page disconnected: configure() changed the url or apiKey before the outcome arrived", "reconfigured");
    // Another server or key: another history, in which this position means nothing.
    position = null;
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
 * deskpush's own call, not CIF's: the templates a notifyEvent may name on this
 * server. Resolves with [{name, title, icon, timeout, autoAccept, parameters}]
 * (parameters: the {slug}s its title and fields fill, i.e. the keys of
 * templateParameters it uses); rejects like the CIF calls, with msdyn_name
 * "ListTemplates". Needs configure({apiKey}) first, like them.
 */
function listTemplates() {
  return request(MSDYN_NAME.LIST_TEMPLATES, { type: "templates" });
}

/**
 * Listen to deskpush events: "onNotifyEventStatus" and
 * "onConnectionStateChange" (see the top of this file for what they carry).
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

/**
 * Close the connection and stop reconnecting. Pending calls reject with
 * RejectAfterClientError (details say the page disconnected); their offers
 * keep running on the server. The next call connects again.
 */
function disconnect() {
  stop("the page disconnected (Microsoft.CIFramework.disconnect()) before the outcome arrived", "disconnect");
}

export const CIFramework = Object.freeze({
  configure,
  notifyEvent,
  cancelEvent,
  addHandler,
  removeHandler,
  disconnect,
  // What CIF does not have, under one name of its own.
  deskpush: Object.freeze({ listTemplates }),
});

window.addEventListener("online", retryNow);
window.Microsoft = window.Microsoft || {};
window.Microsoft.CIFramework = CIFramework;

export default CIFramework;
