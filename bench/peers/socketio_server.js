// Socket.IO on Node.js: the usual choice, doing what deskpush does for the bench's workloads.
//
// Agents authenticate with an HS256 JWT in the handshake's `auth.token` (verified, `exp` checked);
// integrators with `auth.apiKey` (constant-time compare). An offer is
// `agent.timeout(ms).emitWithAck("notification", ...)`: the agent's ack is its answer, a timeout
// is Timeout/DisplayTimeout. The integrator's `notify` is acked with the outcome; `cancel` ends a
// pending offer and tells the agent with a `resolved` event (as timeouts do). WebSocket transport
// only, no compression, no logging.
//
//   BENCH_SECRET=... BENCH_API_KEY=... node bench/peers/socketio_server.js PORT
"use strict";
const crypto = require("node:crypto");
const { Server } = require("socket.io");

const port = Number(process.argv[2]);
const secret = process.env.BENCH_SECRET;
const apiKey = Buffer.from(process.env.BENCH_API_KEY);
// Display timeout by template name (bench/run.py sets BENCH_TIMEOUT, as deskpush's bench_timeout); others 120 s.
const TIMEOUTS = { bench_timeout: Number(process.env.BENCH_TIMEOUT || 2) };
const TITLE = "New chat request";
const HEADERS = { customerName: "Customer", queueName: "Queue", comment: "Comment" };

function verify(token) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) return null;
  const mac = crypto.createHmac("sha256", secret).update(parts[0] + "." + parts[1]).digest();
  const sig = Buffer.from(parts[2], "base64url");
  if (sig.length !== mac.length || !crypto.timingSafeEqual(sig, mac)) return null;
  const claims = JSON.parse(Buffer.from(parts[1], "base64url").toString());
  if (typeof claims.sub !== "string" || !(claims.exp * 1000 > Date.now())) return null;
  return claims.sub;
}

const io = new Server(port, {
  transports: ["websocket"],
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
});
const agents = new Map(); // agentId -> socket
const offers = new Map(); // cancellationToken -> offer

io.use((socket, next) => {
  const auth = socket.handshake.auth || {};
  if (typeof auth.apiKey === "string") {
    const given = Buffer.from(auth.apiKey);
    if (given.length === apiKey.length && crypto.timingSafeEqual(given, apiKey)) {
      socket.data.integrator = true;
      return next();
    }
  } else {
    const agentId = verify(auth.token);
    if (agentId !== null) {
      socket.data.agentId = agentId;
      return next();
    }
  }
  next(new Error("unauthorized"));
});

function finish(offer, actionName, responseReason, tellAgent) {
  if (offer.done) return;
  offer.done = true;
  offers.delete(offer.token);
  offer.ack({ actionName, responseReason });
  if (tellAgent) offer.agent.emit("resolved", { notificationId: offer.id, actionName, responseReason });
}

io.on("connection", (socket) => {
  if (!socket.data.integrator) {
    const agentId = socket.data.agentId;
    agents.set(agentId, socket);
    socket.on("disconnect", () => {
      if (agents.get(agentId) === socket) agents.delete(agentId);
    });
    return;
  }
  socket.on("notify", (req, ack) => {
    const agent = agents.get(req.agentId);
    if (agent === undefined) return ack({ error: { message: "AgentNotConnectedError", msdyn_name: "NotifyEvent" } });
    const id = crypto.randomUUID().replaceAll("-", "");
    const token = req.cancellationToken || id;
    const input = req.input;
    const timeout = TIMEOUTS[input.templateName] || 120;
    const params = input.templateParameters || {};
    const offer = { id, token, agent, ack, done: false };
    offers.set(token, offer);
    agent
      .timeout(timeout * 1000)
      .emitWithAck("notification", {
        notificationId: id, templateName: input.templateName, title: TITLE, icon: "chat",
        fields: Object.entries(params).map(([k, v]) => ({ header: HEADERS[k] || k, value: v })),
        acceptText: "Accept", rejectText: "Reject", showTimeout: true, autoAccept: false,
        timeoutSeconds: timeout, expiresAt: Date.now() + timeout * 1000, correlationId: req.correlationId,
      })
      .then(
        (answer) => answer.action === "Accept"
          ? finish(offer, "Accept", "Accept", false)
          : finish(offer, "Reject", "DeclinedByAgent", false),
        () => finish(offer, "Timeout", "DisplayTimeout", true),
      );
  });
  socket.on("cancel", (req, ack) => {
    const offer = offers.get(req.cancellationToken);
    if (offer !== undefined) finish(offer, "Cancel", "CancelledByIntegrator", true);
    ack({ cancellationToken: req.cancellationToken, actionName: "Cancel", responseReason: "CancelledByIntegrator" });
  });
});
