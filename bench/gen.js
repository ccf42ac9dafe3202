// The load generator: agents and one integrator in one Node.js process, speaking either deskpush's
// wire protocol ("raw": deskpush and the floor) or Socket.IO ("sio"), both on `ws`.
//
//   node bench/gen.js '{"proto":"raw","workload":"offer","url":"http://127.0.0.1:8000",...}'
//
// With "urls" (cluster mode, several nodes) agent i connects to urls[i % urls.length] and the
// integrator to the last one: with two nodes, half the agents get their offers from the other node.
//
// It prints JSON lines: {"mark":"start"} and {"mark":"end"} around the measured window (bench/run.py
// samples the server's and this process's CPU and memory when it reads them), then {"result":{...}}.
// Latencies are measured here, on one clock (performance.now()); lateness against a server's
// `expiresAt` uses the wall clock (performance.timeOrigin + performance.now()).
"use strict";
const crypto = require("node:crypto");
const { performance } = require("node:perf_hooks");
const WebSocket = require("ws");

const cfg = JSON.parse(process.argv[2]);
const TEMPLATE = "msdyn_chat_incoming_unauthenticated";
const PARAMS = { customerName: "Jane Doe", queueName: "Billing" };
const now = () => performance.now();
const wallMs = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const URLS = cfg.urls || [cfg.url];
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function b64(obj) {
  return Buffer.from(JSON.stringify(obj)).toString("base64url");
}
function token(agentId) {
  const t = Math.floor(Date.now() / 1000);
  const body = b64({ alg: "HS256", typ: "JWT" }) + "." + b64({ sub: agentId, iat: t, exp: t + 3600 });
  return body + "." + crypto.createHmac("sha256", cfg.secret).update(body).digest("base64url");
}

// ---------------------------------------------------------------------------------------------
// Clients. An agent calls h.notification(frame, answer) and h.resolved(frame), and h.closed() if
// it has one when its connection drops after the welcome; connect resolves when the agent is
// welcomed. An integrator has notify(req, cb) and cancel(token, cb).

function rawAgent(url, id, tok, h) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url.replace("http", "ws") + "/agent", { perMessageDeflate: false, handshakeTimeout: 60000 });
    let welcomed = false;
    ws.on("open", () => ws.send(JSON.stringify({ type: "hello", token: tok })));
    ws.on("message", (data) => {
      const m = JSON.parse(data);
      if (m.type === "notification") {
        h.notification(m, (action) => ws.send(JSON.stringify({ type: "respond", notificationId: m.notificationId, action })));
      } else if (m.type === "resolved") {
        h.resolved(m);
      } else if (m.type === "welcome") {
        welcomed = true;
        resolve(ws);
      }
    });
    ws.on("error", (e) => { if (!welcomed) reject(e); });
    ws.on("close", (code) => {
      if (!welcomed) reject(new Error(`closed ${code} before welcome`));
      else if (h.closed) h.closed(code);
    });
  });
}

// Socket.IO (protocol v5 over Engine.IO v4, WebSocket transport) spoken directly on `ws`: the
// client is not what is measured, and socket.io-client costs a core of its own at these rates.
// 0 = Engine.IO open, 2/3 = ping/pong; 40 = namespace connect (our auth), 44 = connect error;
// 42[id][...] = event (with an ack id when one is wanted), 43id[...] = ack.
function sioSocket(url, auth, onEvent) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket",
      { perMessageDeflate: false, handshakeTimeout: 60000 });
    const acks = new Map();
    let seq = 0, connected = false;
    const api = {
      emit(event, data, cb) {
        const id = seq++;
        acks.set(id, cb);
        ws.send(`42${id}` + JSON.stringify([event, data]));
      },
    };
    ws.on("message", (data) => {
      const s = data.toString();
      if (s[0] === "2") return ws.send("3");
      if (s[0] === "0") return ws.send("40" + JSON.stringify(auth));
      if (s[0] !== "4") return;
      const type = s[1];
      let i = 2;
      while (i < s.length && s.charCodeAt(i) >= 48 && s.charCodeAt(i) <= 57) i++;
      const id = i > 2 ? Number(s.slice(2, i)) : null;
      if (type === "2") {
        const [event, arg] = JSON.parse(s.slice(i));
        onEvent(event, arg, id === null ? null : (reply) => ws.send(`43${id}` + JSON.stringify([reply])));
      } else if (type === "3") {
        const cb = acks.get(id);
        acks.delete(id);
        if (cb) cb(JSON.parse(s.slice(i))[0]);
      } else if (type === "0") {
        connected = true;
        resolve(api);
      } else if (type === "4") {
        ws.terminate();
        reject(new Error(`connect error ${s.slice(2)}`));
      }
    });
    ws.on("error", (e) => { if (!connected) reject(e); });
    ws.on("close", (code) => { if (!connected) reject(new Error(`closed ${code} before connect`)); });
  });
}

function sioAgent(url, id, tok, h) {
  return sioSocket(url, { token: tok }, (event, m, ack) => {
    if (event === "notification") h.notification(m, (action) => ack({ action }));
    else if (event === "resolved") h.resolved(m);
  });
}

function rawIntegrator(onStatus, url = URLS[URLS.length - 1]) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url.replace("http", "ws") + "/integrator", {
      perMessageDeflate: false,
      headers: { Authorization: `Bearer ${cfg.apiKey}` },
    });
    const pending = new Map();
    let seq = 0;
    ws.on("message", (data) => {
      const m = JSON.parse(data);
      if (m.type === "status") return onStatus(m);
      const cb = pending.get(m.requestId);
      if (cb === undefined) return;
      pending.delete(m.requestId);
      cb(m.type === "result" ? m.value : { error: m.error });
    });
    ws.on("error", reject);
    ws.on("open", () => resolve({
      notify(req, cb) {
        const requestId = req.correlationId;
        pending.set(requestId, cb);
        ws.send(JSON.stringify({ type: "notifyEvent", requestId, ...req }));
      },
      cancel(cancellationToken, cb) {
        const requestId = `c${++seq}`;
        pending.set(requestId, cb);
        ws.send(JSON.stringify({ type: "cancelEvent", requestId, cancellationToken }));
      },
    }));
  });
}

async function sioIntegrator(onStatus, url = URLS[URLS.length - 1]) {
  const s = await sioSocket(url, { apiKey: cfg.apiKey }, () => {});
  return {
    notify(req, cb) { s.emit("notify", req, cb); },
    cancel(cancellationToken, cb) { s.emit("cancel", { cancellationToken }, cb); },
  };
}

const connectAgent = cfg.proto === "sio" ? sioAgent : rawAgent;
const connectIntegrator = cfg.proto === "sio" ? sioIntegrator : rawIntegrator;

// Agents connect at most cfg.burst at a time: each one welcomed lets the next start. A failed
// connection is retried after a pause, as a reconnecting client does. h is the agents' handler,
// or a function of the agent's index that returns its own.
async function connectAll(n, h) {
  const ids = Array.from({ length: n }, (_, i) => `agent-${i}`);
  const tokens = ids.map(token);
  const conns = new Array(n);
  let retries = 0, next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      for (let attempt = 0; ; attempt++) {
        try {
          conns[i] = await connectAgent(URLS[i % URLS.length], ids[i], tokens[i], typeof h === "function" ? h(i) : h);
          break;
        } catch (e) {
          if (attempt >= 5) throw new Error(`agent ${ids[i]}: ${e.message}`);
          retries++;
          await sleep(100 * (attempt + 1));
        }
      }
    }
  };
  const start = now();
  await Promise.all(Array.from({ length: Math.min(n, cfg.burst) }, worker));
  return { ids, conns, seconds: (now() - start) / 1000, retries };
}

function pct(samples, p) {
  if (samples.length === 0) return null;
  const a = Float64Array.from(samples).sort();
  return a[Math.min(a.length - 1, Math.floor((p / 100) * a.length))];
}
function summary(samples) {
  return { min: pct(samples, 0), p50: pct(samples, 50), p99: pct(samples, 99), max: pct(samples, 100), n: samples.length };
}

function offerRequest(agentId, seq, extra = {}) {
  const req = { agentId, input: { templateName: TEMPLATE, templateParameters: PARAMS }, correlationId: `r${seq}`, ...extra };
  if (cfg.proto === "raw" && !cfg.progress) req.progress = false;
  return req;
}

// A closed loop: cfg.inflight slots, each sending its next offer when the last one's result is in,
// to agents chosen so that no agent has two offers at once. Counts only inside the window.
function loopState() {
  return { counting: false, running: true, active: cfg.inflight };
}
async function window(fire, state) {
  for (let slot = 0; slot < cfg.inflight; slot++) fire(slot, 0, state);
  await sleep(cfg.warmup * 1000);
  say({ mark: "start" });
  state.counting = true;
  const t0 = now();
  await sleep(cfg.seconds * 1000);
  state.counting = false;
  const seconds = (now() - t0) / 1000;
  say({ mark: "end" });
  state.running = false;
  const deadline = now() + 10000;
  while (state.active > 0 && now() < deadline) await sleep(20);
  return { seconds, stuck: state.active };
}

async function offer() {
  const h = { notification: (m, answer) => answer("Accept"), resolved: () => {} };
  const agents = await connectAll(cfg.agents, h);
  const integ = await connectIntegrator(() => {});
  const lat = [];
  let outcomes = 0, errors = 0, seq = 0;
  const fire = (slot, k, st) => {
    const agentId = agents.ids[(slot + k * cfg.inflight) % cfg.agents];
    const t = now();
    integ.notify(offerRequest(agentId, ++seq), (value) => {
      if (st.counting) {
        if (value.actionName === "Accept") { outcomes++; lat.push(now() - t); } else errors++;
      }
      if (st.running) fire(slot, k + 1, st); else st.active--;
    });
  };
  const w = await window(fire, loopState());
  return { outcomes, outcomesPerSec: outcomes / w.seconds, latencyMs: summary(lat), errors, ...w };
}

async function storm() {
  const h = { notification: () => {}, resolved: () => {} };
  say({ mark: "start" });
  const agents = await connectAll(cfg.agents, h);
  say({ mark: "end" });
  return { welcomed: agents.conns.length, seconds: agents.seconds, retries: agents.retries };
}

async function timeouts() {
  const expires = new Map(); // requestId (sent as correlationId) -> expiresAt
  const h = { notification: (m) => expires.set(m.correlationId, m.expiresAt), resolved: () => {} };
  const agents = await connectAll(cfg.agents, h);
  const integ = await connectIntegrator(() => {});
  const total = cfg.agents * cfg.perAgent;
  const late = [];
  const outcomes = {};
  let done = 0, unmatched = 0, finished;
  const allDone = new Promise((r) => (finished = r));
  say({ mark: "start" });
  const t0 = now();
  for (let i = 0; i < total; i++) {
    const rid = `r${i}`;
    integ.notify(offerRequest(agents.ids[i % cfg.agents], i, { input: { templateName: "bench_timeout", templateParameters: PARAMS } }), (value) => {
      const at = wallMs();
      const key = value.actionName ? `${value.actionName}/${value.responseReason}` : `error:${value.error && value.error.message}`;
      outcomes[key] = (outcomes[key] || 0) + 1;
      const exp = expires.get(rid);
      if (exp === undefined) unmatched++; else late.push(at - exp);
      if (++done === total) finished();
    });
    if (i % 500 === 499) await new Promise((r) => setImmediate(r));
  }
  const sendSeconds = (now() - t0) / 1000;
  await Promise.race([allDone, sleep((cfg.timeout + 60) * 1000)]);
  say({ mark: "end" });
  return { sent: total, results: done, sendSeconds, latenessMs: summary(late), outcomes, unmatched };
}

async function cancels() {
  const started = new Map(); // notificationId -> when cancelEvent was sent
  const lat = [];
  const st = loopState();
  let integ;
  const cancel = (notificationId, tok) => {
    started.set(notificationId, now());
    integ.cancel(tok, () => {});
  };
  const h = {
    // Peers without progress frames: cancel as soon as the agent has the offer.
    notification: (m) => { if (cfg.cancelOn === "notification") cancel(m.notificationId, `t-${m.correlationId}`); },
    resolved: (m) => {
      const t = started.get(m.notificationId);
      if (t === undefined) return;
      started.delete(m.notificationId);
      if (st.counting) lat.push(now() - t);
    },
  };
  const agents = await connectAll(cfg.agents, h);
  integ = await connectIntegrator((s) => { if (s.state === "displayed") cancel(s.notificationId, s.cancellationToken); });
  let seq = 0, cancelled = 0, other = 0;
  const fire = (slot, k, st) => {
    const n = ++seq;
    const agentId = agents.ids[(slot + k * cfg.inflight) % cfg.agents];
    integ.notify(offerRequest(agentId, n, { cancellationToken: `t-r${n}` }), (value) => {
      if (st.counting) { if (value.actionName === "Cancel") cancelled++; else other++; }
      if (st.running) fire(slot, k + 1, st); else st.active--;
    });
  };
  const w = await window(fire, st);
  return { cancelled, cancelsPerSec: cancelled / w.seconds, latencyMs: summary(lat), other, ...w };
}

// Failover (cluster mode, three nodes or more): agent i on node i % n, connected to it directly so
// that which agents the kill hits is known; the integrator, on node 0, sends offers to the agents of
// the nodes that stay up (a closed loop, as in offer). Then this process kills the last node (kill -9
// of cfg.killPid, the clock starts). Each of that node's agents, when its connection drops, connects
// again as a desktop does: through the load balancer (cfg.balancer, HAProxy), or without one to a
// surviving node directly (agent i to survivor i % (n - 1)); at most cfg.burst at a time, retrying as
// in connectAll. Once it is welcomed, the integrator sends it a new offer. Seconds from the kill until
// the last of them has that offer on its desktop.
async function failover() {
  const n = URLS.length, victim = n - 1, survivors = URLS.slice(0, victim);
  const ids = Array.from({ length: cfg.agents }, (_, i) => `agent-${i}`);
  const victims = ids.map((_, i) => i).filter((i) => i % n === victim);
  const others = ids.filter((_, i) => i % n !== victim);
  const closedAt = new Map(), welcomedAt = new Map(), offeredAt = new Map(), outcomes = {};
  let tKill = null, retries = 0, failed = 0, probes = 0, results = 0, finished;
  const allBack = new Promise((r) => (finished = r));
  const settle = () => { if (offeredAt.size + failed === victims.length) finished(); };
  const queue = [];
  let active = 0;
  const pump = () => {
    while (active < cfg.burst && queue.length) {
      active++;
      reconnect(queue.shift()).finally(() => { active--; pump(); });
    }
  };
  const handler = (i) => ({
    notification: (m, answer) => {
      if (m.correlationId === `p${i}` && !offeredAt.has(i)) { offeredAt.set(i, now()); settle(); }
      answer("Accept");
    },
    resolved: () => {},
    closed: () => {
      if (tKill === null || i % n !== victim || welcomedAt.has(i) || closedAt.has(i)) return;
      closedAt.set(i, now());
      queue.push(i);
      pump();
    },
  });
  const record = (value) => {
    const key = value.actionName ? `${value.actionName}/${value.responseReason}` : `error:${value.error && value.error.message}`;
    outcomes[key] = (outcomes[key] || 0) + 1;
    results++;
  };
  let integ;
  const startedAt = new Map();
  const reconnect = async (i) => {
    startedAt.set(i, now());
    for (let attempt = 0; ; attempt++) {
      try {
        await connectAgent(cfg.balancer || survivors[i % survivors.length], ids[i], token(ids[i]), handler(i));
        break;
      } catch (e) {
        if (attempt >= 20) { failed++; settle(); return; }
        retries++;
        await sleep(100 * Math.min(attempt + 1, 10));
      }
    }
    welcomedAt.set(i, now());
    probes++;
    integ.notify(offerRequest(ids[i], 0, { correlationId: `p${i}` }), record);
  };
  await connectAll(cfg.agents, handler);
  integ = await connectIntegrator(() => {}, URLS[0]);
  const st = loopState();
  let seq = 0, background = 0;
  const fire = (slot, k, st) => {
    integ.notify(offerRequest(others[(slot + k * cfg.inflight) % others.length], ++seq), (value) => {
      record(value);
      if (tKill !== null) background++;
      if (st.running) fire(slot, k + 1, st); else st.active--;
    });
  };
  for (let slot = 0; slot < cfg.inflight; slot++) fire(slot, 0, st);
  await sleep(cfg.warmup * 1000);
  say({ mark: "start" });
  tKill = now();
  process.kill(cfg.killPid, "SIGKILL");
  await Promise.race([allBack, sleep(60000)]);
  const tEnd = now();
  say({ mark: "end" });
  st.running = false;
  const deadline = now() + 10000;
  while ((st.active > 0 || results < seq + probes) && now() < deadline) await sleep(20);
  const since = (m) => Array.from(m.values(), (t) => (t - tKill) / 1000);
  const last = (m) => (m.size ? Math.max(...since(m)) : null);
  return {
    victims: victims.length, recovered: offeredAt.size, failed, seconds: last(offeredAt), welcomedSeconds: last(welcomedAt),
    perAgent: summary(since(offeredAt)), closed: summary(since(closedAt)), welcomed: summary(since(welcomedAt)),
    // Per agent, seconds: waiting for a free connection slot, connecting until welcomed, welcomed until offered.
    queued: summary(Array.from(startedAt, ([i, t]) => (t - closedAt.get(i)) / 1000)),
    connecting: summary(Array.from(welcomedAt, ([i, t]) => (t - startedAt.get(i)) / 1000)),
    offering: summary(Array.from(offeredAt, ([i, t]) => (t - welcomedAt.get(i)) / 1000)),
    retries, windowSeconds: (tEnd - tKill) / 1000,
    backgroundOutcomes: background, outcomes, unanswered: seq + probes - results,
  };
}

const WORKLOADS = { offer, storm, timeout: timeouts, cancel: cancels, failover };
WORKLOADS[cfg.workload]()
  .then((result) => { say({ result }); process.exit(0); })
  .catch((e) => { process.stderr.write(`gen: ${e.stack || e}\n`); process.exit(1); });
