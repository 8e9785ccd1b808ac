// spineguide console page: renders the state the console server pushes over /ws.
// Lengths mm, angles deg, times: *_unix_s seconds since the epoch (same clock as the service host).
"use strict";

const $ = (id) => document.getElementById(id);
const HEARTBEAT_STALE_S = 0.25;   // > 2 heartbeat periods of 50 ms without one: unhealthy
const sg = window.sgStats = { domLatencyMs: [], frames: {}, states: 0 };
let config = {};
let state = null;
let timeline = [];          // [t_unix_s, deviation_mm|null, beam, reason]
let session = null;         // login session token (kept in memory only, never in storage)
let lastGatingSeq = null;

function fmt(v, digits = 2, sign = true) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const s = Number(v).toFixed(digits);
  return sign && v >= 0 ? "+" + s : s;
}

function nowUnix() { return Date.now() / 1000; }

async function loadConfig() {
  config = await (await fetch("/api/config")).json();
  $("limit-mm").textContent = config.correction_limit_mm ? `|t| ≤ ${config.correction_limit_mm} mm` : "unknown";
  $("limit-deg").textContent = config.correction_limit_deg ? `each ≤ ${config.correction_limit_deg}°` : "unknown";
  if (config.approval === "automatic") $("automatic-banner").hidden = false;
  if (!config.commands_enabled) {
    $("login-status").textContent = "read-only console (no login token configured)";
    $("login-form").hidden = true;
  }
  loadSessions();
}

async function loadSessions() {
  const ul = $("sessions");
  if (!config.reviews) { ul.innerHTML = "<li>no records folder configured</li>"; return; }
  const body = await (await fetch("/api/sessions")).json();
  ul.innerHTML = "";
  for (const s of body.sessions) {
    const li = document.createElement("li");
    const when = s.started_unix_s ? new Date(s.started_unix_s * 1000).toISOString().replace("T", " ").slice(0, 19) : "?";
    const a = document.createElement("a");
    a.href = "/review/" + encodeURIComponent(s.name);
    a.textContent = `${s.name} (${when} UTC, ${(s.size_bytes / 1024).toFixed(0)} KiB)`;
    a.className = "session-link";
    li.appendChild(a);
    li.appendChild(document.createTextNode(" · "));
    const d = document.createElement("a");
    d.href = a.href + "?download=1";
    d.textContent = "save report";
    li.appendChild(d);
    ul.appendChild(li);
  }
  if (!body.sessions.length) ul.innerHTML = "<li>no recorded sessions</li>";
}

function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "state") applyState(msg);
    else if (msg.type === "frame") applyFrame(msg);
  };
  ws.onclose = () => {
    $("heartbeat-health").textContent = "console disconnected";
    $("heartbeat-health").className = "pill bad";
    setTimeout(connect, 500);
  };
}

function applyFrame(msg) {
  $("frame-" + msg.imager) && ($("frame-" + msg.imager).src = `data:${msg.mime};base64,${msg.data}`);
  const cap = $(`frame-${msg.imager}-caption`);
  if (cap) cap.textContent = `imager ${msg.imager}: pair ${msg.pair_id}`;
  sg.frames[msg.imager] = msg.pair_id;
}

function applyState(s) {
  state = s;
  sg.states += 1;
  if (s.timeline_reset) timeline = [];
  timeline.push(...s.timeline);
  const span = s.timeline_span_s || 300;
  const cut = nowUnix() - span;
  while (timeline.length && timeline[0][0] < cut) timeline.shift();
  const hb = s.heartbeat;
  $("service-state").textContent = hb ? hb.state : "?";
  $("service-state").className = "pill" + (hb && hb.state === "MONITORING" ? " ok" : "");
  $("service-phase").textContent = hb && hb.phase ? hb.phase : "-";
  $("heartbeat-rate").textContent = `${s.heartbeat_rate_hz.toFixed(1)} Hz`;
  const age = s.message_age_ms;
  $("message-age").textContent = age ? `last ${age.last.toFixed(0)} ms, p95 ${age.p95.toFixed(0)} ms` : "-";
  $("lost").textContent = s.lost_messages ? `${s.lost_messages} message(s) lost` : "";
  const tol = s.tolerance_3d_mm;
  $("tolerance").textContent = tol ? `${tol} mm 3D` + (s.tolerance_rotation_deg ? `, ${s.tolerance_rotation_deg}°` : "") : "unknown";
  if (s.approval_seen === "automatic" || config.approval === "automatic") $("automatic-banner").hidden = false;
  renderCorrection(s.correction);
  renderProposal(s.proposal, hb);
  renderHolds(s.holds);
  renderBeam();
  drawTimeline();
  renderActions(hb);
  const g = s.gating;
  if (g && g.seq !== lastGatingSeq) {
    lastGatingSeq = g.seq;
    // Time from the service's decision to this DOM update being painted (benchmark; same host clock).
    requestAnimationFrame(() => sg.domLatencyMs.push(Date.now() - g.t_unix_s * 1000));
  }
}

function renderBeam() {
  const g = state && state.gating;
  const el = $("beam");
  if (!g) { el.textContent = "NO DATA"; el.className = "beam unknown"; return; }
  let beam = g.beam, reason = g.reason;
  // ENABLE is a permission that expires (CONVENTIONS): without an unexpired ENABLE the beam is held.
  if (beam === "ENABLE" && nowUnix() > g.valid_until_unix_s) { beam = "HOLD"; reason = "enable expired"; }
  el.textContent = beam;
  el.className = "beam " + beam;
  el.dataset.reason = reason;
  $("beam-reason").textContent = reason;
  $("deviation").textContent = g.deviation_mm === null ? "-" : `${g.deviation_mm.toFixed(2)} mm`;
  $("deviation").className = state.tolerance_3d_mm && g.deviation_mm > state.tolerance_3d_mm ? "over" : "";
}

function renderHealth() {
  const hb = state && state.heartbeat;
  const el = $("heartbeat-health");
  if (!hb) return;
  const ageS = nowUnix() - hb.t_unix_s;
  const ok = ageS < HEARTBEAT_STALE_S;
  el.textContent = ok ? "ok" : `silent ${ageS.toFixed(1)} s`;
  el.className = "pill " + (ok ? "ok" : "bad");
}

function renderCorrection(c) {
  const ids = ["c-x", "c-y", "c-z", "c-pitch", "c-roll", "c-yaw"];
  if (!c) { ids.forEach((id) => $(id).textContent = "-"); return; }
  const v = [...c.translation_mm, ...c.rotation_deg];
  ids.forEach((id, i) => $(id).textContent = fmt(v[i]));
  const norm = Math.hypot(...c.translation_mm);
  $("c-x").parentElement.className = config.correction_limit_mm && norm > config.correction_limit_mm ? "over" : "";
  $("method").textContent = c.method;
  $("correction-pair").textContent = c.pair_id;
  $("correction-purpose").textContent = c.purpose ? `(${c.purpose})` : "";
  const q = c.quality || {};
  const parts = [q.ok ? "OK" : "NOT OK"];
  for (const [k, val] of Object.entries(q)) {
    if (k === "ok") continue;
    if (typeof val === "number") parts.push(`${k} ${val.toFixed(3)}`);
    else if (Array.isArray(val) && val.length && typeof val[0] !== "object") parts.push(`${k} ${val.join(", ")}`);
  }
  $("quality").textContent = parts.join(" · ");
}

function renderProposal(p, hb) {
  const box = $("proposal");
  const awaiting = hb && hb.phase === "awaiting_approval";
  box.hidden = !p && !awaiting;
  const pending = p || (state.status && state.status.pending_correction);
  if (pending) {
    $("proposal-pair").textContent = pending.pair_id;
    $("proposal-values").textContent =
      `X ${fmt(pending.translation_mm[0])}, Y ${fmt(pending.translation_mm[1])}, Z ${fmt(pending.translation_mm[2])} mm; ` +
      `pitch ${fmt(pending.rotation_deg[0])}, roll ${fmt(pending.rotation_deg[1])}, yaw ${fmt(pending.rotation_deg[2])} deg`;
    $("approve-button").dataset.pairId = pending.pair_id;
  }
  $("approve-button").disabled = !(session && awaiting && pending);
}

function renderActions(hb) {
  const st = hb ? hb.state : null;
  const valid = {
    start_monitoring: st === "SETUP" && hb.phase === "verified",
    start_setup: ["PLAN_LOADED", "MONITORING", "PAUSED"].includes(st),
    pause: st === "MONITORING", resume: st === "PAUSED",
  };
  for (const b of document.querySelectorAll("#actions button")) b.disabled = !(session && valid[b.dataset.command]);
}

function renderHolds(holds) {
  const ol = $("holds");
  ol.innerHTML = "";
  for (const h of [...holds].reverse()) {
    const li = document.createElement("li");
    const t = new Date(h.first_unix_s * 1000).toISOString().slice(11, 22);
    li.textContent = `${t} ${h.reason}` + (h.count > 1 ? ` ×${h.count}` : "") +
      (h.deviation_mm !== null ? ` (${h.deviation_mm.toFixed(2)} mm)` : "");
    li.className = "hold-entry";
    ol.appendChild(li);
  }
}

function drawTimeline() {
  const cv = $("timeline"), ctx = cv.getContext("2d");
  const w = cv.width, h = cv.height, span = Math.min(state.timeline_span_s || 300, 120);
  const t1 = nowUnix(), t0 = t1 - span;
  const tol = state.tolerance_3d_mm || 1;
  const ymax = Math.max(2 * tol, ...timeline.filter((p) => p[0] >= t0 && p[1] !== null).map((p) => p[1] * 1.1));
  const x = (t) => (t - t0) / span * w, y = (d) => h - 12 - d / ymax * (h - 16);
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(40,160,70,0.18)";        // tolerance band
  ctx.fillRect(0, y(tol), w, y(0) - y(tol));
  for (const p of timeline) {                    // beam strip at the bottom
    if (p[0] < t0) continue;
    ctx.fillStyle = p[2] === "ENABLE" ? "#1f7a33" : "#a32020";
    ctx.fillRect(x(p[0]), h - 8, 3, 8);
  }
  ctx.strokeStyle = "#7cb7ff"; ctx.beginPath();
  let pen = false;
  for (const p of timeline) {
    if (p[0] < t0 || p[1] === null) { pen = false; continue; }
    if (pen) ctx.lineTo(x(p[0]), y(p[1])); else ctx.moveTo(x(p[0]), y(p[1]));
    pen = true;
  }
  ctx.stroke();
  ctx.fillStyle = "#aaa"; ctx.font = "10px sans-serif";
  ctx.fillText(`${ymax.toFixed(1)} mm`, 2, 10); ctx.fillText(`tolerance ${tol} mm, last ${span} s`, w - 150, 10);
}

async function sendCommand(command, params) {
  const r = await fetch("/api/command", {
    method: "POST", headers: { "Content-Type": "application/json", "Authorization": "Bearer " + session },
    body: JSON.stringify({ command, params }),
  });
  const body = await r.json();
  $("command-result").textContent = r.ok
    ? `${command}: ${body.ok ? "accepted" : "refused: " + body.reason} (state ${body.state}, phase ${body.phase})`
    : `${command}: ${body.error}`;
  $("command-result").className = r.ok && body.ok ? "" : "error";
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/api/login", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ operator: $("login-operator").value, token: $("login-token").value }),
  });
  const body = await r.json();
  $("login-token").value = "";
  if (r.ok) { session = body.session; $("login-status").textContent = `logged in: ${body.operator}`; }
  else { session = null; $("login-status").textContent = `login failed: ${body.error}`; }
  if (state) applyState({ ...state, timeline: [], timeline_reset: false });
});

$("approve-button").addEventListener("click", () =>
  sendCommand("approve_correction", { pair_id: Number($("approve-button").dataset.pairId) }));
for (const b of document.querySelectorAll("#actions button")) b.addEventListener("click", () => sendCommand(b.dataset.command, {}));

setInterval(() => { if (state) { renderBeam(); renderHealth(); } }, 50);
loadConfig().then(connect);
