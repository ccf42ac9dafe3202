// deskpush agent desktop: plain ES module, no build step.
//
// Talks wire protocol v1 on /agent (see docs/protocol.md):
//   -> {"type":"hello","token":...}   first frame
//   <- welcome, then one notification per displayed offer (replay), maybe queue
//   <- notification / resolved / queue / pong / error
//   -> respond / ping
//
// The server owns time. A card's countdown is always computed as
// expiresAt - (Date.now() + clockOffset), never by counting down a timer the
// tab started, so it stays right in a throttled background tab and after a
// reconnect. The card is removed only on `resolved`.
//
// Everything that comes from a frame is untrusted text: it is rendered with
// textContent and createElement only.
//
// Outcomes, error codes and close codes come from ./vocabulary.js, generated
// from protocol/vocabulary.py: this file never spells them.

import { AGENT_ERROR, CLOSE_CODE, OUTCOME } from "./vocabulary.js";

const TOKEN_KEY = "deskpush.token";
const ALERT_CLAIM_PREFIX = "deskpush-alert:";
const PING_INTERVAL_MS = 15000;
const PONG_DEADLINE_MS = 2 * PING_INTERVAL_MS; // no pong this long: the socket is dead
const BACKOFF_FIRST_MS = 250;
const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 12000;
const STABLE_MS = 10000; // a session that lived this long resets the backoff
// After a close with 1012 (the server is draining for a restart) the desktop
// reconnects at once, at a random moment within this, so that the desktops
// of one batch do not all arrive in the same instant.
const RESTART_JITTER_MS = 1000;
const RESTARTING_TEXT = "Server restarting, reconnecting…";
const TOAST_MS = 3200;
const ACTIVITY_MAX = 12;
// The close code this tab sends when pongs stop: private use (RFC 6455
// section 7.4.2), not one of the server's codes.
const CLOSE_NO_PONG = 4000;

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------
// Small DOM helpers (text only, never HTML)

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(paths, className) {
  const root = document.createElementNS(SVG_NS, "svg");
  root.setAttribute("viewBox", "0 0 24 24");
  root.setAttribute("width", "24");
  root.setAttribute("height", "24");
  root.setAttribute("fill", "none");
  root.setAttribute("stroke", "currentColor");
  root.setAttribute("stroke-width", "1.8");
  root.setAttribute("stroke-linecap", "round");
  root.setAttribute("stroke-linejoin", "round");
  root.setAttribute("aria-hidden", "true");
  root.setAttribute("focusable", "false");
  if (className) root.setAttribute("class", className);
  for (const d of paths) {
    const p = document.createElementNS(SVG_NS, "path");
    p.setAttribute("d", d);
    root.appendChild(p);
  }
  return root;
}

// One inline icon per kind of work, drawn with paths (no external files).
const ICONS = {
  chat: ["M20 14.5a2 2 0 0 1-2 2H8.5L4 20V6a2 2 0 0 1 2-2h12a2 2 0 0 1 2 2z", "M8 9h8", "M8 12.5h5"],
  phone: ["M5 4h3.2l1.6 4.2-2.1 1.3a10.5 10.5 0 0 0 6.8 6.8l1.3-2.1L20 15.8V19a1.5 1.5 0 0 1-1.6 1.5A16.5 16.5 0 0 1 3.5 5.6 1.5 1.5 0 0 1 5 4z"],
  transfer: ["M4 8h14", "M14 4l4 4-4 4", "M20 16H6", "M10 12l-4 4 4 4"],
  email: ["M4 6h16v12H4z", "M4 7l8 6 8-6"],
  sms: ["M6 4h12a2 2 0 0 1 2 2v8a2 2 0 0 1-2 2h-5l-5 4v-4H6a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z", "M8.5 10h.01", "M12 10h.01", "M15.5 10h.01"],
  video: ["M3.5 7h11v10h-11z", "M14.5 10.5 20.5 7v10l-6-3.5"],
  case: ["M4 8h16v11H4z", "M9 8V5.5h6V8", "M4 13h16"],
  bell: ["M6 16V11a6 6 0 0 1 12 0v5l1.5 2h-15z", "M10 20.5a2 2 0 0 0 4 0"],
};
const ICON_ALIASES = { voice: "phone", call: "phone", voicecall: "phone", mail: "email", ticket: "case", task: "case" };

function iconKind(name) {
  const key = String(name || "").toLowerCase();
  if (ICONS[key]) return key;
  if (ICON_ALIASES[key]) return ICON_ALIASES[key];
  return "bell";
}

// ---------------------------------------------------------------------------
// Outcomes, as the agent should read them

// Keyed by the vocabulary's "actionName/responseReason" strings.
const OUTCOME_LABELS = {
  [OUTCOME.ACCEPTED]: { label: "Accepted", tone: "good" },
  [OUTCOME.AUTO_ACCEPTED]: { label: "Auto-accepted", tone: "good" },
  [OUTCOME.DECLINED]: { label: "Declined", tone: "neutral" },
  [OUTCOME.DISPLAY_TIMEOUT]: { label: "Timed out", tone: "warn" },
  [OUTCOME.CANCELLED]: { label: "Withdrawn", tone: "neutral" },
  [OUTCOME.AGENT_DISCONNECTED]: { label: "Agent disconnected", tone: "bad" },
  [OUTCOME.QUEUE_LIMIT]: { label: "Queue full", tone: "bad" },
  [OUTCOME.QUEUE_TIME_LIMIT]: { label: "Waited too long in queue", tone: "warn" },
};

function describeOutcome(actionName, responseReason) {
  const known = OUTCOME_LABELS[`${actionName}/${responseReason}`];
  if (known) return known;
  return { label: `${actionName} (${responseReason})`, tone: "neutral" };
}

// What the agent reads for an `error` frame's code; other codes show the
// server's message.
const ERROR_TEXT = {
  [AGENT_ERROR.NOTIFICATION_NOT_PENDING]: "That offer has already ended.",
  [AGENT_ERROR.UNKNOWN_NOTIFICATION]: "That offer is no longer available.",
};

// ---------------------------------------------------------------------------
// Server clock: offset = serverTime - local time at the moment the server
// stamped it (the midpoint of the ping's round trip). The sample with the
// lowest round trip wins; welcome.serverTime seeds it (round trip unknown).

const clock = {
  offset: 0,
  rtt: Infinity,
  seed(serverTime) {
    if (typeof serverTime !== "number") return;
    this.offset = serverTime - Date.now();
    this.rtt = Infinity;
  },
  sample(sentAt, serverTime, receivedAt) {
    if (typeof serverTime !== "number") return;
    const rtt = Math.max(0, receivedAt - sentAt);
    if (rtt <= this.rtt) {
      this.rtt = rtt;
      this.offset = serverTime - (sentAt + rtt / 2);
    }
  },
  now() {
    return Date.now() + this.offset;
  },
};

// ---------------------------------------------------------------------------
// State

const state = {
  token: null,
  agentId: null,
  ws: null,
  phase: "idle", // connecting | connected | reconnecting | rejected | replaced | signedout
  attempt: 0,
  retryAt: 0,
  restarting: false, // closed with 1012: until the next welcome, say why we reconnect
  retryTimer: null,
  pingTimer: null,
  pingsInFlight: [], // Date.now() of each unanswered ping, oldest first
  welcomedAt: 0,
  queued: 0,
};

/** notificationId -> card record */
const cards = new Map();

// ---------------------------------------------------------------------------
// Token: from the fragment (then scrubbed from the address bar), sessionStorage, or the form

function tokenFromFragment() {
  const hash = location.hash.startsWith("#") ? location.hash.slice(1) : location.hash;
  if (!hash) return null;
  const params = new URLSearchParams(hash);
  const token = params.get("token");
  if (!token) return null;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  return token.trim();
}

function storeToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage may be disabled; the token then lasts for this page only */
  }
}

function loadToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function showTokenForm(message, isError) {
  $("workspace").hidden = true;
  $("token-panel").hidden = false;
  $("agent").hidden = true;
  $("signout-btn").hidden = true;
  const msg = $("token-message");
  if (message) {
    msg.textContent = message;
  }
  msg.classList.toggle("is-error", Boolean(isError));
  const input = $("token-input");
  input.value = "";
  input.focus();
}

function showWorkspace() {
  $("token-panel").hidden = true;
  $("workspace").hidden = false;
  $("signout-btn").hidden = false;
}

// ---------------------------------------------------------------------------
// Connection

function agentUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/agent`;
}

function setPhase(phase, text) {
  state.phase = phase;
  const pill = $("status");
  pill.dataset.state = phase;
  $("status-text").textContent = text;
  pill.title = text;
  $("retry-btn").hidden = phase !== "reconnecting";
  document.body.dataset.connection = phase;
  for (const card of cards.values()) updateButtons(card);
  renderEmpty();
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (!state.token) {
    showTokenForm();
    return;
  }
  showWorkspace();
  $("replaced").hidden = true;
  setPhase("connecting", state.restarting ? RESTARTING_TEXT : state.attempt ? "Reconnecting…" : "Connecting…");
  let sock;
  try {
    sock = new WebSocket(agentUrl());
  } catch (err) {
    console.error("deskpush: cannot open WebSocket", err);
    scheduleReconnect();
    return;
  }
  state.ws = sock;
  sock.addEventListener("open", () => {
    if (state.ws !== sock) return;
    sock.send(JSON.stringify({ type: "hello", token: state.token }));
  });
  sock.addEventListener("message", (ev) => {
    if (state.ws !== sock) return;
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      console.warn("deskpush: ignoring a frame that is not JSON");
      return;
    }
    if (frame && typeof frame === "object") onFrame(frame);
  });
  sock.addEventListener("close", (ev) => {
    if (state.ws !== sock) return;
    onClosed(ev);
  });
}

function send(frame) {
  const sock = state.ws;
  if (!sock || sock.readyState !== WebSocket.OPEN || state.phase !== "connected") return false;
  sock.send(JSON.stringify(frame));
  return true;
}

function onClosed(ev) {
  state.ws = null;
  stopKeepalive();
  if (state.welcomedAt && Date.now() - state.welcomedAt >= STABLE_MS) state.attempt = 0;
  state.welcomedAt = 0;
  if (ev.code === CLOSE_CODE.UNAUTHORIZED) {
    // Bad or expired token: retrying cannot help.
    state.token = null;
    storeToken(null);
    setPhase("rejected", "Token rejected");
    showTokenForm("The server rejected this token (expired or invalid). Paste a new one to sign in.", true);
    return;
  }
  if (ev.code === CLOSE_CODE.SERVICE_RESTART) {
    // Planned, not a failure: reconnect now (with jitter), and start the
    // backoff afresh should the next attempt fail.
    state.restarting = true;
    state.attempt = 0;
    scheduleReconnect(Math.random() * RESTART_JITTER_MS);
    return;
  }
  if (ev.code === CLOSE_CODE.SESSION_REPLACED) {
    // The agent opened more sessions than the server allows and this one was
    // the oldest. Reconnecting on our own would close another of them, which
    // would reconnect in turn: this tab waits until the agent picks it again.
    for (const id of [...cards.keys()]) removeCard(id);
    setQueued(0);
    setPhase("replaced", "Replaced by a newer tab");
    $("replaced").hidden = false;
    renderEmpty();
    announce("This tab was disconnected: the desktop is open in too many other tabs or devices.");
    return;
  }
  scheduleReconnect();
}

function useThisTab() {
  // Connecting here closes the agent's oldest other session in turn.
  state.attempt = 0;
  connect();
}

function scheduleReconnect(delayMs) {
  // Exponential backoff with full jitter: a restarted server is not hit by
  // every desktop at the same instant. `delayMs`: this delay instead (1012).
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** state.attempt);
  const delay = delayMs ?? Math.max(BACKOFF_FIRST_MS, Math.random() * ceiling);
  if (delayMs === undefined) state.attempt += 1;
  state.retryAt = Date.now() + delay;
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay);
  renderReconnecting();
}

function renderReconnecting() {
  if (state.phase === "rejected" || state.retryTimer === null) return;
  const secs = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
  if (state.restarting) setPhase("reconnecting", RESTARTING_TEXT);
  else setPhase("reconnecting", secs > 0 ? `Reconnecting in ${secs} s` : "Reconnecting…");
}

function retryNow() {
  if (state.retryTimer === null) return;
  connect();
}

function useToken(token) {
  state.token = token;
  state.attempt = 0;
  state.restarting = false;
  storeToken(token);
  const sock = state.ws;
  state.ws = null;
  stopKeepalive();
  if (sock) sock.close(CLOSE_CODE.NORMAL_CLOSURE, "new token");
  connect();
}

function signOut() {
  state.token = null;
  storeToken(null);
  const sock = state.ws;
  state.ws = null;
  stopKeepalive();
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  if (sock) sock.close(CLOSE_CODE.NORMAL_CLOSURE, "signed out");
  $("replaced").hidden = true;
  for (const id of [...cards.keys()]) removeCard(id);
  setQueued(0);
  setPhase("signedout", "Signed out");
  showTokenForm("Signed out. Paste an agent token to sign in again.");
}

// ---------------------------------------------------------------------------
// Keepalive and clock probe

function startKeepalive() {
  stopKeepalive();
  state.pingTimer = setInterval(ping, PING_INTERVAL_MS);
  ping();
}

function stopKeepalive() {
  clearInterval(state.pingTimer);
  state.pingTimer = null;
  state.pingsInFlight = [];
}

function ping() {
  const oldest = state.pingsInFlight[0];
  if (oldest !== undefined && Date.now() - oldest > PONG_DEADLINE_MS) {
    // The socket looks open but nothing comes back (sleeping laptop, dead proxy).
    console.warn("deskpush: no pong, reconnecting");
    const sock = state.ws;
    if (sock) {
      state.ws = null;
      sock.close(CLOSE_NO_PONG, "keepalive timeout");
      onClosed({ code: CLOSE_NO_PONG });
    }
    return;
  }
  if (send({ type: "ping" })) state.pingsInFlight.push(Date.now());
}

// ---------------------------------------------------------------------------
// Frames

function onFrame(frame) {
  switch (frame.type) {
    case "welcome":
      onWelcome(frame);
      break;
    case "notification":
      onNotification(frame);
      break;
    case "resolved":
      onResolved(frame);
      break;
    case "queue":
      setQueued(frame.queued);
      break;
    case "pong": {
      const sentAt = state.pingsInFlight.shift();
      if (sentAt !== undefined) clock.sample(sentAt, frame.serverTime, Date.now());
      tick();
      break;
    }
    case "error":
      onError(frame);
      break;
    default:
      console.debug("deskpush: ignoring frame", frame.type);
  }
}

function onWelcome(frame) {
  state.agentId = String(frame.agentId ?? "");
  state.welcomedAt = Date.now();
  state.restarting = false;
  clock.seed(frame.serverTime);
  setPhase("connected", "Connected");
  $("status").title = `Connected as ${state.agentId}`;
  $("agent-id").textContent = state.agentId;
  $("agent-avatar").textContent = initials(state.agentId);
  $("agent-avatar").title = state.agentId;
  $("agent").hidden = false;
  // welcome.displayed lists the offers the replay brings right after it (the
  // server always sends it): a card not listed ended while we were away.
  const replayed = new Set(frame.displayed);
  for (const card of [...cards.values()]) {
    if (replayed.has(card.id)) continue;
    addActivity(card.frame, { label: "Ended while offline", tone: "neutral" });
    removeCard(card.id);
  }
  setQueued(0); // the replay says so if work is waiting
  startKeepalive(); // its first ping measures the clock at once
}

function onNotification(frame) {
  const id = frame.notificationId;
  if (typeof id !== "string" || !id) return;
  const existing = cards.get(id);
  if (existing) {
    // A replay after a reconnect: same card, nothing new to announce. If a
    // respond was sent and the connection dropped before `resolved`, the
    // server did not act on it, so the agent may answer again.
    existing.frame = frame;
    existing.responded = null;
    existing.statusEl.textContent = "";
    updateButtons(existing);
    tick();
    return;
  }
  const card = createCard(frame);
  cards.set(id, card);
  $("offers").appendChild(card.root);
  renderEmpty();
  tick();
  announce(`New offer: ${frame.title}.`);
  alerts.offer(frame);
}

function onResolved(frame) {
  const id = frame.notificationId;
  const card = cards.get(id);
  const outcome = describeOutcome(frame.actionName, frame.responseReason);
  alerts.resolved(id);
  if (!card) return;
  removeCard(id);
  addActivity(card.frame, outcome);
  toast(`${outcome.label}: ${card.frame.title}`, outcome.tone);
}

function onError(frame) {
  const text = ERROR_TEXT[frame.code] || frame.message || frame.code || "The server refused a request.";
  toast(text, "bad");
  console.warn("deskpush: server error", frame.code, frame.message);
}

function setQueued(n) {
  const queued = Number.isFinite(n) && n > 0 ? Math.floor(n) : 0;
  state.queued = queued;
  const chip = $("queue");
  chip.hidden = queued === 0;
  chip.textContent = queued === 1 ? "1 more waiting" : `${queued} more waiting`;
}

// ---------------------------------------------------------------------------
// Cards

let cardSeq = 0;

function createCard(frame) {
  cardSeq += 1;
  const kind = iconKind(frame.icon);
  const titleId = `offer-title-${cardSeq}`;
  const root = el("article", `card card-${kind}`);
  root.dataset.notificationId = frame.notificationId;
  root.setAttribute("aria-labelledby", titleId);

  const head = el("div", "card-head");
  const badge = el("div", "card-icon");
  badge.appendChild(svg(ICONS[kind]));
  head.appendChild(badge);

  const titles = el("div", "card-titles");
  const title = el("h3", "card-title", frame.title);
  title.id = titleId;
  titles.appendChild(title);
  titles.appendChild(el("p", "card-kind", kindLabel(kind, frame)));
  head.appendChild(titles);

  const timer = el("div", "card-timer");
  const countdown = el("span", "countdown");
  countdown.setAttribute("aria-label", "Time left to answer");
  timer.appendChild(countdown);
  timer.hidden = !frame.showTimeout;
  head.appendChild(timer);
  root.appendChild(head);

  const bar = el("div", "card-progress");
  const barFill = el("div", "card-progress-fill");
  bar.appendChild(barFill);
  bar.hidden = !frame.showTimeout;
  root.appendChild(bar);

  const fields = Array.isArray(frame.fields) ? frame.fields : [];
  if (fields.length) {
    const dl = el("dl", "card-fields");
    for (const f of fields) {
      if (!f || typeof f !== "object") continue;
      const row = el("div", "field");
      row.appendChild(el("dt", "field-header", f.header));
      row.appendChild(el("dd", "field-value", f.value));
      dl.appendChild(row);
    }
    root.appendChild(dl);
  }

  const foot = el("div", "card-foot");
  const status = el("p", "card-status");
  status.setAttribute("aria-live", "polite");
  foot.appendChild(status);
  const actions = el("div", "card-actions");
  const reject = el("button", "btn btn-secondary btn-reject", frame.rejectText || "Reject");
  reject.type = "button";
  reject.setAttribute("aria-label", `${frame.rejectText || "Reject"}: ${frame.title}`);
  const accept = el("button", "btn btn-primary btn-accept", frame.acceptText || "Accept");
  accept.type = "button";
  accept.setAttribute("aria-label", `${frame.acceptText || "Accept"}: ${frame.title}`);
  actions.appendChild(reject);
  actions.appendChild(accept);
  foot.appendChild(actions);
  root.appendChild(foot);

  const card = {
    id: frame.notificationId,
    frame,
    root,
    accept,
    reject,
    countdownEl: countdown,
    barFill,
    statusEl: status,
    responded: null, // "Accept" | "Reject" once sent
    expired: false,
    lastText: "",
  };
  accept.addEventListener("click", () => respond(card, "Accept"));
  reject.addEventListener("click", () => respond(card, "Reject"));
  if (frame.autoAccept) {
    actions.hidden = true;
    status.textContent = "Assigned to you automatically";
  }
  updateButtons(card);
  return card;
}

function kindLabel(kind, frame) {
  const base = {
    chat: "Chat",
    phone: "Voice call",
    transfer: "Transfer",
    email: "Email",
    sms: "SMS",
    video: "Video call",
    case: "Case",
    bell: "Notification",
  }[kind];
  return frame.correlationId ? `${base} · ${frame.correlationId}` : base;
}

function respond(card, action) {
  if (card.responded || card.expired || !cards.has(card.id)) return;
  if (!send({ type: "respond", notificationId: card.id, action })) {
    toast("Not connected: your answer was not sent.", "bad");
    return;
  }
  card.responded = action;
  card.statusEl.textContent = action === "Accept" ? "Accepting…" : "Declining…";
  updateButtons(card);
}

function updateButtons(card) {
  const disabled = Boolean(card.responded) || card.expired || state.phase !== "connected";
  card.accept.disabled = disabled;
  card.reject.disabled = disabled;
  card.root.classList.toggle("is-offline", state.phase !== "connected");
}

function removeCard(id) {
  const card = cards.get(id);
  if (!card) return;
  cards.delete(id);
  const hadFocus = card.root.contains(document.activeElement);
  card.root.remove();
  renderEmpty();
  if (hadFocus) {
    // Keep keyboard users in the list rather than at the top of the page.
    const next = cards.values().next().value;
    if (next && !next.accept.disabled) next.accept.focus();
    else $("offers").focus();
  }
}

// What the main area says with no card in it: "no offers" only when that is
// known, i.e. while connected. Offline, an empty list means nothing, and an
// agent waiting for work must not take it for a quiet queue.
const EMPTY_TEXT = {
  connected: ["No offers right now", "New chats and calls routed to you appear here."],
  connecting: ["Connecting…", "New chats and calls routed to you appear here once connected."],
  reconnecting: ["Connection lost", "Offers cannot reach you until the connection is back. Reconnecting…"],
};

function renderEmpty() {
  const empty = $("empty");
  empty.hidden = cards.size > 0 || state.phase === "replaced";
  const phase = state.phase === "connecting" && state.attempt ? "reconnecting" : state.phase;
  const [title, text] = EMPTY_TEXT[phase] || EMPTY_TEXT.connecting;
  empty.dataset.state = phase;
  if ($("empty-title").textContent !== title) $("empty-title").textContent = title;
  if ($("empty-text").textContent !== text) $("empty-text").textContent = text;
}

function formatRemaining(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  const m = Math.floor(total / 60);
  const s = total % 60;
  return `${m}:${String(s).padStart(2, "0")}`;
}

// Re-render every countdown from expiresAt and the server clock.
function tick() {
  const now = clock.now();
  for (const card of cards.values()) {
    const f = card.frame;
    const remaining = (Number(f.expiresAt) || 0) - now;
    const expired = remaining <= 0;
    if (f.showTimeout) {
      // expiresAt may be a few ms past display + timeoutSeconds (the server
      // rounds deadlines up to its timer resolution): show at most the timeout.
      const shown = Math.min(remaining, (Number(f.timeoutSeconds) || Infinity) * 1000);
      const text = expired ? "0:00" : formatRemaining(shown);
      if (text !== card.lastText) {
        card.countdownEl.textContent = text;
        card.lastText = text;
      }
      const total = Math.max(1, (Number(f.timeoutSeconds) || 1) * 1000);
      const fraction = Math.min(1, Math.max(0, remaining / total));
      // CSSOM writes are allowed by the page's style-src 'self' policy.
      card.barFill.style.transform = `scaleX(${fraction.toFixed(4)})`;
      card.root.classList.toggle("is-urgent", !expired && remaining <= 10000);
    }
    if (expired !== card.expired) {
      card.expired = expired;
      card.root.classList.toggle("is-expired", expired);
      if (expired) {
        card.statusEl.textContent = "Expired";
        card.countdownEl.setAttribute("aria-label", "Expired");
      }
      updateButtons(card);
    }
  }
  if (state.phase === "reconnecting") renderReconnecting();
}

// ---------------------------------------------------------------------------
// Activity, toasts and screen-reader announcements

function addActivity(frame, outcome) {
  const list = $("activity");
  const item = el("li", `activity-item tone-${outcome.tone}`);
  const dot = el("span", "activity-dot");
  dot.setAttribute("aria-hidden", "true");
  item.appendChild(dot);
  const body = el("div", "activity-body");
  body.appendChild(el("span", "activity-title", frame.title));
  const meta = el("span", "activity-meta");
  meta.appendChild(el("span", "activity-outcome", outcome.label));
  meta.appendChild(document.createTextNode(" · "));
  const first = Array.isArray(frame.fields) ? frame.fields.find((f) => f && f.value) : null;
  if (first && !String(frame.title).includes(first.value)) {
    meta.appendChild(el("span", "activity-context", first.value));
    meta.appendChild(document.createTextNode(" · "));
  }
  const time = el("time", "", new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" }));
  time.dateTime = new Date().toISOString();
  meta.appendChild(time);
  body.appendChild(meta);
  item.appendChild(body);
  list.prepend(item);
  while (list.children.length > ACTIVITY_MAX) list.lastElementChild.remove();
  $("activity-empty").hidden = true;
}

function toast(text, tone) {
  const box = el("div", `toast tone-${tone || "neutral"}`, text);
  $("toasts").appendChild(box);
  setTimeout(() => box.remove(), TOAST_MS);
}

function announce(text) {
  const region = $("announcer");
  region.textContent = "";
  // A fresh text node after clearing makes screen readers read it again.
  setTimeout(() => {
    region.textContent = text;
  }, 30);
}

function initials(agentId) {
  const parts = String(agentId).split(/[^A-Za-z0-9]+/).filter(Boolean);
  const letters = parts.length > 1 ? parts[0][0] + parts[1][0] : String(agentId).slice(0, 2);
  return letters.toUpperCase();
}

// ---------------------------------------------------------------------------
// Desktop alerts: only while this tab is hidden, and once per notification
// across every open tab of the agent. Tabs coordinate on a BroadcastChannel
// (a visible tab says "seen", so nobody alerts) and on a localStorage claim
// keyed by notificationId (the last writer wins; the others stand down).

const alerts = {
  channel: null,
  tabId: Math.random().toString(36).slice(2) + Date.now().toString(36),
  seen: new Set(),
  shown: new Map(),

  supported() {
    return "Notification" in window;
  },

  init() {
    if ("BroadcastChannel" in window) {
      this.channel = new BroadcastChannel("deskpush-alerts");
      this.channel.addEventListener("message", (ev) => {
        const msg = ev.data || {};
        if (typeof msg.id !== "string") return;
        if (msg.type === "seen" || msg.type === "shown") this.seen.add(msg.id);
        if (msg.type === "resolved") this.close(msg.id);
      });
    }
    this.cleanClaims();
    const btn = $("alerts-btn");
    btn.addEventListener("click", async () => {
      try {
        await Notification.requestPermission();
      } catch (err) {
        console.warn("deskpush: notification permission", err);
      }
      this.render();
    });
    this.render();
  },

  render() {
    const btn = $("alerts-btn");
    const note = $("alerts-state");
    if (!this.supported()) {
      btn.hidden = true;
      note.hidden = true;
      return;
    }
    const perm = Notification.permission;
    btn.hidden = perm !== "default";
    note.hidden = perm === "default";
    note.textContent = perm === "granted" ? "Desktop alerts on" : "Desktop alerts blocked";
  },

  post(msg) {
    try {
      this.channel?.postMessage(msg);
    } catch {
      /* channel closed */
    }
  },

  cleanClaims() {
    try {
      const cutoff = Date.now() - 24 * 3600 * 1000;
      for (let i = localStorage.length - 1; i >= 0; i -= 1) {
        const key = localStorage.key(i);
        if (!key || !key.startsWith(ALERT_CLAIM_PREFIX)) continue;
        const claim = JSON.parse(localStorage.getItem(key) || "{}");
        if (!(claim.at > cutoff)) localStorage.removeItem(key);
      }
    } catch {
      /* storage disabled or corrupt: nothing to clean */
    }
  },

  async offer(frame) {
    const id = frame.notificationId;
    if (document.visibilityState !== "hidden") {
      this.seen.add(id);
      this.post({ type: "seen", id });
      return;
    }
    if (!this.supported() || Notification.permission !== "granted") return;
    const key = ALERT_CLAIM_PREFIX + id;
    try {
      if (localStorage.getItem(key)) return; // another tab (or this one, before a reload) has it
      localStorage.setItem(key, JSON.stringify({ by: this.tabId, at: Date.now() }));
    } catch {
      /* no storage: fall back to the channel alone */
    }
    // Let other tabs' claims and "seen" messages arrive, then check who won.
    await new Promise((resolve) => setTimeout(resolve, 120 + Math.random() * 120));
    if (this.seen.has(id) || !cards.has(id) || document.visibilityState !== "hidden") return;
    try {
      const claim = JSON.parse(localStorage.getItem(key) || "null");
      if (claim && claim.by !== this.tabId) return;
    } catch {
      /* unreadable claim: show it */
    }
    this.seen.add(id);
    this.post({ type: "shown", id });
    const fields = (Array.isArray(frame.fields) ? frame.fields : [])
      .filter((f) => f && f.value)
      .map((f) => `${f.header}: ${f.value}`)
      .join("\n");
    try {
      const n = new Notification(String(frame.title || "New offer"), {
        body: fields,
        tag: `deskpush-${id}`,
        icon: "logo.svg",
        requireInteraction: true,
      });
      n.addEventListener("click", () => {
        window.focus();
        const card = cards.get(id);
        if (card && !card.accept.disabled) card.accept.focus();
        n.close();
      });
      this.shown.set(id, n);
    } catch (err) {
      console.warn("deskpush: cannot show a desktop notification", err);
    }
  },

  resolved(id) {
    this.close(id);
    this.post({ type: "resolved", id });
  },

  close(id) {
    const n = this.shown.get(id);
    if (n) {
      n.close();
      this.shown.delete(id);
    }
  },
};

// ---------------------------------------------------------------------------
// Start

function start() {
  alerts.init();
  $("retry-btn").addEventListener("click", retryNow);
  $("use-here-btn").addEventListener("click", useThisTab);
  $("signout-btn").addEventListener("click", signOut);
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token-input").value.trim();
    if (token) useToken(token);
  });
  window.addEventListener("online", retryNow);
  // A link with #token=... opened in a tab that already shows the desktop
  // only changes the fragment: sign in with the new token.
  window.addEventListener("hashchange", () => {
    const token = tokenFromFragment();
    if (token && token !== state.token) useToken(token);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      tick();
      for (const id of cards.keys()) alerts.post({ type: "seen", id });
    }
  });
  setInterval(tick, 250);
  renderEmpty();

  const fromFragment = tokenFromFragment();
  if (fromFragment) storeToken(fromFragment);
  state.token = fromFragment || loadToken();
  if (state.token) {
    connect();
  } else {
    setPhase("signedout", "Not signed in");
    showTokenForm();
  }
}

start();
