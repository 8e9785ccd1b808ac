// spineguide console page: renders the state the console server pushes over /ws.
// Lengths mm, angles deg, times: *_unix_s seconds since the epoch (same clock as the service host);
// every time shown is UTC and says so.
"use strict";

const $ = (id) => document.getElementById(id);
const HEARTBEAT_STALE_S = 0.25;   // > 2 heartbeat periods of 50 ms without one: the service is lost
const FRAME_STALE_S = 1.0;        // a displayed frame older than this is marked stale (10 frame periods)
const sg = window.sgStats = { domLatencyMs: [], frames: {}, states: 0 };
let config = { reasons: {}, plans: [] };
let state = null;
let timeline = [];          // [t_unix_s, deviation_mm|null, beam, reason]
let me = null;              // {operator, role, csrf}: the login (session in an HttpOnly cookie)
let lastGatingSeq = null;
let wsOpen = false;
let lastBeamAnnounced = "";
const frameT = {};          // imager -> t_unix_s of the displayed pair's decision
const ROLE_COMMANDS = {
  therapist: ["load_plan", "start_setup", "approve_correction", "start_monitoring", "pause", "resume", "stop"],
  physicist: ["load_plan", "start_setup", "approve_correction", "start_monitoring", "pause", "resume", "stop",
              "second_signoff", "report_signoff"],
  admin: [],
};

function fmt(v, digits = 2, sign = true) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const s = Number(v).toFixed(digits);
  return sign && v >= 0 ? "+" + s : s;
}
// The console host's clock (= the service's host: it reads the service's record), carried forward with this
// page's monotonic clock from the last state received. Ages and expiries never depend on the browser's own
// wall clock, and when the pushes stop (console or feed dead) every age keeps growing: the page goes red.
let lastServerUnix = null, lastRecvPerf = 0;
function nowUnix() {
  return lastServerUnix === null ? Date.now() / 1000 : lastServerUnix + (performance.now() - lastRecvPerf) / 1000;
}
function utc(t, ms = false) {
  if (!t) return "?";
  return new Date(t * 1000).toISOString().slice(11, ms ? 22 : 19) + " UTC";
}
function may(action) { return !!(me && (ROLE_COMMANDS[me.role] || []).includes(action)); }
function reasonInfo(code) {
  return config.reasons[code] || { category: "safety", text: `Unknown hold reason '${code}'.`,
                                   action: "Check the service log; call the physicist." };
}

async function loadConfig() {
  config = await (await fetch("/api/config")).json();
  $("limit-mm").textContent = config.correction_limit_mm ? `|t| ≤ ${config.correction_limit_mm} mm` : "unknown";
  $("limit-deg").textContent = config.correction_limit_deg ? `each ≤ ${config.correction_limit_deg}°` : "unknown";
  if (config.approval === "automatic") $("automatic-banner").hidden = false;
  if (!config.commands_enabled) {
    $("login-status").textContent = "read-only console (no users or login token configured)";
    $("login-form").hidden = true;
  }
  $("login-secret-label").textContent = config.accounts === "token" ? "console token" : "password";
  setPlans(config.plans, []);
  const who = await (await fetch("/api/session")).json();
  setLogin(who.operator ? who : null);
  loadSessions();
}

function setPlans(plans, problems) {
  // The service's plan catalogue as this console checked it (pushed again when the service changes).
  const before = selectedPlan();
  config.plans = plans;
  const sel = $("plan-select");
  sel.innerHTML = "";
  if (!plans.length) {
    const o = document.createElement("option");
    o.textContent = "no plan offered (waiting for the service's plan list)"; o.value = "";
    sel.appendChild(o);
  }
  plans.forEach((p, i) => {
    const o = document.createElement("option");
    o.value = String(i);
    o.textContent = `${p.patient_id} · ${p.patient_name} · plan ${p.plan_id}`;
    if (before && before.plan_id === p.plan_id && before.patient_id === p.patient_id) o.selected = true;
    sel.appendChild(o);
  });
  $("plan-problems").textContent = problems.length ? "Not offered: " + problems.join("; ") : "";
  showPlanDetails();
}

function selectedPlan() { return config.plans[Number($("plan-select").value)] || null; }

function showPlanDetails() {
  const p = selectedPlan();
  $("plan-details").textContent = p
    ? `method ${p.method}; patient position ${p.patient_position || "unknown (room directions only)"}; from ${p.source}`
    : "";
}

function setLogin(who) {
  me = who;
  $("login-status").textContent = me ? `logged in: ${me.operator} (${me.role})` : "not logged in";
  $("logout-button").hidden = !me;
  $("login-form").hidden = !!me || !config.commands_enabled;
  if (state) render();
  loadSessions();
}

async function loadSessions() {
  const ul = $("sessions");
  if (!config.reviews) { ul.innerHTML = "<li>no records folder configured</li>"; return; }
  const body = await (await fetch("/api/sessions")).json();
  ul.innerHTML = "";
  for (const s of body.sessions) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = "/review/" + encodeURIComponent(s.name);
    a.textContent = `${s.name} (started ${s.started_unix_s ? new Date(s.started_unix_s * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "?"}, ${(s.size_bytes / 1024).toFixed(0)} KiB)`;
    a.className = "session-link";
    li.appendChild(a);
    for (const [suffix, text, cls] of [["?download=1", "save report (HTML)", "save-link"], ["", "PDF", "pdf-link"]]) {
      li.appendChild(document.createTextNode(" · "));
      const d = document.createElement("a");
      d.href = suffix ? a.href + suffix : "/report/" + encodeURIComponent(s.name) + ".pdf";
      d.textContent = text; d.className = cls;
      li.appendChild(d);
    }
    if (s.signoff) {
      li.appendChild(document.createTextNode(` · signed off by ${s.signoff.operator} ${utc(s.signoff.t_unix_s)}`));
    } else if (may("report_signoff")) {
      li.appendChild(document.createTextNode(" · "));
      const b = document.createElement("button");
      b.type = "button"; b.className = "signoff-button"; b.textContent = "physicist sign-off";
      b.addEventListener("click", () => signOff(s.name));
      li.appendChild(b);
    }
    ul.appendChild(li);
  }
  if (!body.sessions.length) ul.innerHTML = "<li>no recorded sessions</li>";
}

async function signOff(name) {
  const r = await post(`/api/review/${encodeURIComponent(name)}/signoff`, { comment: "" });
  const body = await r.json();
  $("command-result").textContent = r.ok ? `report ${name} signed off` : `sign-off: ${body.error}`;
  loadSessions();
}

let ws = null;
function connect() {
  // The server sends frames and patient data only to a page that connected logged in: reconnect on login.
  ws = new WebSocket(`ws://${location.host}/ws`);
  ws.onopen = () => { wsOpen = true; };
  ws.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.type === "state") applyState(msg);
    else if (msg.type === "frame") applyFrame(msg);
    else if (msg.type === "proposal_frame") applyProposalFrame(msg);
  };
  ws.onclose = () => { wsOpen = false; setTimeout(connect, 500); };
}

function reconnect() {
  // A new connection presents the new login (or none): frames and plans follow it.
  if (ws) { ws.onclose = null; ws.close(); }
  wsOpen = false;
  connect();
}

function forgetFrames() {
  // Logged out: nothing the login showed stays on screen.
  document.querySelectorAll("#frames img, #proposal img").forEach((img) => { img.removeAttribute("src"); });
  setPlans([], []);
}

function applyFrame(msg) {
  const img = $("frame-" + msg.imager);
  if (img) img.src = `data:${msg.mime};base64,${msg.data}`;
  const cap = $(`frame-${msg.imager}-caption`);
  const seeds = img ? markCount(img, msg.marks) : "";
  if (cap) cap.textContent = `imager ${msg.imager}: pair ${msg.pair_id}${seeds}`;
  frameT[msg.imager] = msg.t_unix_s || null;
  sg.frames[msg.imager] = msg.pair_id;
}

function applyProposalFrame(msg) {
  const img = $("proposal-" + msg.imager);
  if (!img) return;
  if (img.dataset.pairId !== String(msg.pair_id)) {  // a new proposal: the default view again
    $("zoom").value = 1; $("window").value = 98; $("level").value = 50; pan.x = 0; pan.y = 0; applyZoom();
  }
  img.src = `data:${msg.mime};base64,${msg.data}`;
  img.dataset.pairId = msg.pair_id;
  markCount(img, msg.marks);
}

function markCount(img, marks) {
  // The seed marks drawn into the frame (planned crosses, detected circles): for the caption and tests.
  const [planned, detected] = Array.isArray(marks) ? marks : [0, 0];
  img.dataset.plannedMarks = planned;
  img.dataset.detectedMarks = detected;
  return planned ? ` · seeds: ${planned} planned, ${detected} detected` : "";
}

function applyState(s) {
  state = s;
  if (typeof s.server_unix_s === "number") { lastServerUnix = s.server_unix_s; lastRecvPerf = performance.now(); }
  sg.states += 1;
  if (s.timeline_reset) timeline = [];
  timeline.push(...s.timeline);
  const cut = nowUnix() - (s.timeline_span_s || 300);
  while (timeline.length && timeline[0][0] < cut) timeline.shift();
  render();
  const g = s.gating;
  if (g && g.seq !== lastGatingSeq) {
    lastGatingSeq = g.seq;
    // Time from the service's decision to this DOM update being painted (benchmark; same host clock).
    requestAnimationFrame(() => sg.domLatencyMs.push(Date.now() - g.t_unix_s * 1000));
  }
}

function render() {
  const s = state, hb = s.heartbeat;
  $("service-phase").textContent = hb && hb.phase ? hb.phase : "-";
  const age = s.message_age_ms;
  $("message-age").textContent = age ? `last ${age.last.toFixed(0)} ms, p95 ${age.p95.toFixed(0)} ms` : "-";
  $("lost").textContent = s.lost_messages ? `${s.lost_messages} message(s) lost` : "";
  const tol = s.tolerance_3d_mm;
  $("tolerance").textContent = tol ? `${tol} mm (3D and per axis)` + (s.tolerance_rotation_deg ? `, ${s.tolerance_rotation_deg}°` : "") : "unknown";
  if (s.approval_seen === "automatic" || config.approval === "automatic") $("automatic-banner").hidden = false;
  renderCorrection(s.correction);
  renderProposal();
  renderHolds();
  if (s.journal) renderJournal(s.journal);
  if (s.plans) setPlans(s.plans, s.plans_problems || []);
  renderLive();
  drawTimeline();
  renderActions();
}

function serviceAlive() {
  const hb = state && state.heartbeat;
  return !!(wsOpen && hb && nowUnix() - hb.received_unix_s < HEARTBEAT_STALE_S);
}

// Everything that depends on the clock: run every 50 ms, whether or not the feed moves.
function renderLive() {
  if (!state) return;
  const hb = state.heartbeat, alive = serviceAlive();
  const hbAge = hb ? nowUnix() - hb.received_unix_s : null;
  $("service-state").textContent = !hb ? "?" : alive ? hb.state : `LOST (last ${hb.state})`;
  $("service-state").className = "pill" + (alive && hb.state === "MONITORING" ? " ok" : alive ? "" : " bad");
  $("heartbeat-health").textContent = !hb ? "none" : alive ? "ok" : `silent ${hbAge.toFixed(1)} s`;
  $("heartbeat-health").className = "pill " + (alive ? "ok" : "bad");
  $("heartbeat-rate").textContent = alive ? `${state.heartbeat_rate_hz.toFixed(1)} Hz` : "0 Hz";
  $("clock").textContent = utc(nowUnix());
  renderBeam(alive);
  renderFrameAges();
  renderAlert(alive, hbAge);
  renderProposalAge();
  renderSteps(alive);
}

function renderAlert(alive, hbAge) {
  const el = $("alert-banner"), hb = state.heartbeat, g = state.gating;
  const active = hb && ["SETUP", "MONITORING", "PAUSED"].includes(hb.state);
  let msg = "", kind = "";
  if (!wsOpen) { msg = "CONSOLE DISCONNECTED: this page receives nothing; the beam state is unknown here. Reload; if it persists, restart the console."; kind = "console"; }
  else if (!hb) { msg = "NO SERVICE: no heartbeat from the guidance service yet. Start the service (spineguide serve) or check its address."; kind = "service"; }
  else if (!alive) { msg = `SERVICE LOST: no heartbeat for ${hbAge.toFixed(1)} s. The delivery system holds the beam. Check the guidance service; restart it and load the plan again.`; kind = "service"; }
  else if (active && g && g.reason === "frame_source_silent") { msg = "IMAGER SILENT: no kV images arrive. " + reasonInfo("frame_source_silent").action; kind = "imager"; }
  else if (active && config.frames) {
    const ages = ["A", "B"].map((n) => frameT[n] ? nowUnix() - frameT[n] : null).filter((a) => a !== null);
    const oldest = ages.length ? Math.max(...ages) : null;
    if (oldest !== null && oldest > FRAME_STALE_S) { msg = `FRAMES STALE: the newest image shown is ${oldest.toFixed(1)} s old. Check the imager.`; kind = "stale"; }
  }
  el.hidden = !msg;
  el.dataset.kind = kind;
  if (el.textContent !== msg) el.textContent = msg;
}

function renderFrameAges() {
  for (const n of ["A", "B"]) {
    const el = $(`frame-${n}-age`), img = $(`frame-${n}`);
    if (!el || !frameT[n]) continue;
    const a = nowUnix() - frameT[n];
    const stale = a > FRAME_STALE_S;
    el.textContent = stale ? `STALE: ${a.toFixed(1)} s old` : `${a.toFixed(1)} s old`;
    el.className = "age" + (stale ? " stale" : "");
    img.classList.toggle("stale", stale);
  }
}

function renderBeam(alive) {
  const g = state && state.gating;
  const el = $("beam");
  let beam, reason;
  if (!g) { beam = "NO DATA"; reason = "-"; }
  else {
    beam = g.beam; reason = g.reason;
    // ENABLE is a permission that expires (CONVENTIONS): without an unexpired ENABLE the beam is held.
    if (beam === "ENABLE" && nowUnix() > g.valid_until_unix_s) { beam = "HOLD"; reason = "enable expired"; }
  }
  if (!alive && state.heartbeat) { beam = "HOLD"; reason = wsOpen ? "service lost" : "console disconnected"; }
  el.textContent = beam;
  el.className = "beam " + (beam === "NO DATA" ? "unknown" : beam);
  el.dataset.reason = reason;
  $("beam-reason").textContent = reason;
  const info = reason === "enable expired" ? { text: "The last permission expired and no newer one came.", action: "Wait for the next image pair; check the imager if it persists." }
    : reason === "service lost" ? { text: "The guidance service is silent.", action: "Check and restart the guidance service." }
    : reason === "console disconnected" ? { text: "This page receives nothing from the console.", action: "Reload the page; restart the console if it persists." }
    : g ? stateAwareReason(reason) : { text: "", action: "" };
  $("beam-text").textContent = info.text;
  $("beam-action").textContent = beam === "ENABLE" ? "" : info.action ? "Next: " + info.action : "";
  if (g) {
    $("deviation").textContent = g.deviation_mm === null ? "-" : `${g.deviation_mm.toFixed(2)} mm`;
    $("deviation").className = state.tolerance_3d_mm && g.deviation_mm > state.tolerance_3d_mm ? "over" : "";
  }
  renderViews(g);
  const said = `Beam ${beam}. ${beam === "ENABLE" ? "" : info.text}`;
  if (said !== lastBeamAnnounced) { lastBeamAnnounced = said; $("beam-live").textContent = said; }
}

// One-view monitoring (docs/ONE_VIEW.md): which imager the last pair was judged on, and the 95 % bound.
function renderViews(g) {
  const el = $("views");
  let text = "views: -", one = false;
  if (g && g.one_view) {
    const other = ["A", "B"].filter((n) => n !== g.one_view).join(", ");
    const bound = typeof g.deviation_bound_mm === "number" ? ` · 95 % bound ${g.deviation_bound_mm.toFixed(2)} mm` : "";
    text = `ONE VIEW: imager ${other} blocked or unusable, judged on imager ${g.one_view} alone${bound} (out-of-plane estimated)`;
    one = true;
  } else if (g && g.pair_id !== null && g.pair_id !== undefined) {
    text = "views: stereo (both imagers)";
  }
  el.classList.toggle("one", one);
  if (el.textContent !== text) el.textContent = text;
}

// "not_monitoring" covers every state but MONITORING/PAUSED: the next action depends on which.
const NOT_MONITORING_NEXT = {
  IDLE: "Choose the patient and plan, type the fraction number, then Load plan.",
  PLAN_LOADED: "Press start setup.",
  STOPPED: "The fraction has ended: open its report under Recorded sessions (a physicist signs it off).",
};
const SETUP_NEXT = {
  measuring: "Wait for the setup measurement (next image pair).",
  awaiting_approval: "Check the proposed correction above and approve it.",
  awaiting_couch: "Wait for the couch to move.",
  verifying: "Wait for the verification image pair.",
  verified: "Setup verified: press start monitoring.",
};
function stateAwareReason(code) {
  const info = reasonInfo(code), st = state.heartbeat && state.heartbeat.state, phase = state.heartbeat && state.heartbeat.phase;
  if (code === "not_monitoring" && st === "SETUP" && SETUP_NEXT[phase]) return { ...info, action: SETUP_NEXT[phase] };
  if (code === "not_monitoring" && NOT_MONITORING_NEXT[st]) return { ...info, action: NOT_MONITORING_NEXT[st] };
  return info;
}

function renderSteps(alive) {
  const hb = state.heartbeat;
  const st = hb && alive ? hb.state : null, phase = hb ? hb.phase : null;
  let step = "fraction";
  if (st === "PLAN_LOADED") step = "setup";
  else if (st === "SETUP") step = phase === "awaiting_approval" ? "approval" : "setup";
  else if (st === "MONITORING" || st === "PAUSED") step = "monitoring";
  else if (st === "STOPPED") step = "report";
  for (const li of document.querySelectorAll("#steps li")) {
    if (li.dataset.step === step) li.setAttribute("aria-current", "step"); else li.removeAttribute("aria-current");
  }
  document.body.dataset.step = step;
}

function toleranceClass(v, tol) {
  if (tol === null || tol === undefined || v === null || !isFinite(v)) return "";
  return Math.abs(v) <= tol ? "within" : "over";
}

function renderCorrection(c) {
  const ids = ["c-x", "c-y", "c-z", "c-pitch", "c-roll", "c-yaw"];
  if (!c) { ids.forEach((id) => { $(id).textContent = "-"; $(id).className = ""; }); $("correction-words").textContent = ""; return; }
  const v = [...c.translation_mm, ...c.rotation_deg];
  ids.forEach((id, i) => {
    $(id).textContent = fmt(v[i]);
    $(id).className = toleranceClass(v[i], i < 3 ? state.tolerance_3d_mm : state.tolerance_rotation_deg);
  });
  const plan = currentPlan();
  const dirs = plan ? plan.directions : [["room +X", "room -X"], ["towards gantry", "away from gantry"], ["up", "down"]];
  $("correction-words").textContent = "Move the patient: " + c.translation_mm.map((v, i) =>
    Math.abs(v) < 0.05 ? `0.0 mm (${["X", "Y", "Z"][i]})` : `${Math.abs(v).toFixed(1)} mm ${dirs[i][v > 0 ? 0 : 1]}`).join(", ") +
    (plan && plan.patient_position ? ` (patient position ${plan.patient_position})` : " (room directions)");
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

function currentPlan() {
  // The plan chosen on this page (the only one when the console offers one).
  return selectedPlan() || (config.plans.length === 1 ? config.plans[0] : null);
}

function pendingProposal() {
  const hb = state.heartbeat;
  return state.proposal || (hb && hb.phase === "awaiting_approval" && state.status && state.status.pending_correction) || null;
}

function renderProposal() {
  const box = $("proposal");
  const p = pendingProposal();
  box.hidden = !p;
  if (!p) return;
  $("proposal-pair").textContent = p.pair_id;
  const plan = currentPlan();
  const dirs = plan ? plan.directions : [["room +X", "room -X"], ["towards gantry", "away from gantry"], ["up", "down"]];
  $("proposal-position").textContent = plan && plan.patient_position
    ? `Patient position ${plan.patient_position}: directions are the patient's.`
    : "Patient position unknown: directions are the room's (IEC 61217).";
  const v = [...p.translation_mm, ...p.rotation_deg];
  const rotWords = ["about the left-right axis (X)", "about the long axis (Y)", "about the vertical axis (Z)"];
  for (let i = 0; i < 6; i++) {
    const tol = i < 3 ? state.tolerance_3d_mm : state.tolerance_rotation_deg;
    $(`p-v-${i}`).textContent = `${fmt(v[i], 1)} ${i < 3 ? "mm" : "°"}`;
    let word;
    if (i < 3) word = Math.abs(v[i]) < 0.05 ? "-" : `${Math.abs(v[i]).toFixed(1)} mm ${dirs[i][v[i] > 0 ? 0 : 1]}`;
    else word = Math.abs(v[i]) < 0.05 ? "-" : `${Math.abs(v[i]).toFixed(1)}° ${v[i] > 0 ? "positive" : "negative"} ${rotWords[i - 3]}`;
    $(`p-d-${i}`).textContent = word;
    $(`p-t-${i}`).textContent = tol ? `≤ ${tol}${i < 3 ? " mm" : "°"}` : "unknown";
    $(`p-row-${i}`).className = toleranceClass(v[i], tol);
  }
  $("proposal-values").textContent =
    `X ${fmt(p.translation_mm[0])}, Y ${fmt(p.translation_mm[1])}, Z ${fmt(p.translation_mm[2])} mm; ` +
    `pitch ${fmt(p.rotation_deg[0])}, roll ${fmt(p.rotation_deg[1])}, yaw ${fmt(p.rotation_deg[2])} deg`;
  const first = state.first_signoff && state.first_signoff.pair_id === p.pair_id ? state.first_signoff : null;
  $("signoff-status").textContent = state.second_signoff_needed
    ? (first ? `First sign-off: ${first.operator} at ${utc(first.t_unix_s)}. A second user (physicist) must approve.`
             : "This correction is large: it needs two sign-offs (the second by a physicist).")
    : "";
  $("approve-button").textContent = state.second_signoff_needed
    ? (first ? "Second sign-off: approve and move the couch" : "Approve (first of two sign-offs)")
    : "Approve and move the couch";
  $("approve-button").dataset.pairId = p.pair_id;
  renderLevels(p);
  for (const n of ["A", "B"]) {
    const img = $("proposal-" + n);
    img.classList.toggle("other-pair", img.dataset.pairId !== String(p.pair_id));
  }
}

// Per-level plans (docs/PER_LEVEL.md): every level's pose, inter-level motion, and the level that drives.
let chosenLevel = null, levelsPair = null;
function renderLevels(p) {
  const q = p.quality || {}, table = q.levels || p.levels;
  const box = $("levels-box");
  box.hidden = !table;
  if (!table) { chosenLevel = null; return; }
  if (levelsPair !== p.pair_id) { levelsPair = p.pair_id; chosenLevel = null; }
  const driving = chosenLevel || q.driving_level || p.level || table.target;
  const rows = $("levels-rows");
  rows.textContent = "";
  for (const lv of table.levels || []) {
    const tr = document.createElement("tr");
    const pick = document.createElement("td");
    if (lv.ok) {
      const r = document.createElement("input");
      r.type = "radio"; r.name = "driving-level"; r.value = lv.name; r.checked = lv.name === driving;
      r.setAttribute("aria-label", `level ${lv.name} drives the correction`);
      r.addEventListener("change", () => { chosenLevel = lv.name; render(); });
      pick.appendChild(r);
    }
    tr.appendChild(pick);
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = lv.name + (lv.name === table.target ? " (target)" : "");
    tr.appendChild(name);
    const six = lv.pose ? [...lv.pose.translation_mm, ...lv.pose.rotation_deg] : [null, null, null, null, null, null];
    for (const v of six) {
      const td = document.createElement("td");
      td.textContent = v === null ? "-" : fmt(v, 2);
      tr.appendChild(td);
    }
    const st = document.createElement("td");
    st.textContent = lv.ok ? "ok" : `refused: ${lv.reason || "?"}`;
    tr.appendChild(st);
    rows.appendChild(tr);
  }
  $("levels-motion").textContent = (table.inter_level || []).map((m) =>
    `${m.cranial}/${m.caudal}: flexion/extension ${fmt(m.flexion_extension_deg, 2)}°, lateral bending ` +
    `${fmt(m.lateral_bending_deg, 2)}°, axial rotation ${fmt(m.axial_rotation_deg, 2)}°`).join("; ");
  $("levels-discordant").textContent = table.discordant
    ? `The target level's pose differs from its neighbours': ${table.discordance_detail || ""}. Choose the level that drives the correction.`
    : "";
  $("approve-button").dataset.level = driving;
}

function proposalExpired(p) {
  if (!p || !p.t_unix_s || !config.approval_max_age_s) return false;
  return nowUnix() - p.t_unix_s > config.approval_max_age_s;
}

function renderProposalAge() {
  const p = state && pendingProposal();
  if (!p) return;
  const el = $("proposal-age");
  const hb = state.heartbeat;
  const awaiting = serviceAlive() && hb && hb.phase === "awaiting_approval";
  let expired = false;
  if (!p.t_unix_s) el.textContent = "Age of the proposal unknown (the service checks it).";
  else {
    const age = nowUnix() - p.t_unix_s, max = config.approval_max_age_s;
    expired = proposalExpired(p);
    el.textContent = `Measured ${utc(p.t_unix_s)}, ${age.toFixed(0)} s ago` +
      (max ? (expired ? ` — EXPIRED (limit ${max} s): wait for a new proposal` : ` — expires in ${(max - age).toFixed(0)} s`) : "");
  }
  el.className = "age" + (expired ? " stale" : "");
  const imagesOk = ["A", "B"].every((n) => $("proposal-" + n).dataset.pairId === String(p.pair_id)) || !config.frames;
  const first = state.first_signoff && state.first_signoff.pair_id === p.pair_id ? state.first_signoff : null;
  const sameUser = first && me && first.operator === me.operator;
  $("approve-button").disabled = !(may("approve_correction") && awaiting && !expired && imagesOk && !sameUser
                                   && (!first || may("second_signoff")));
}

function holdItem(h) {
  const li = document.createElement("li");
  const info = reasonInfo(h.reason);
  li.className = "hold-entry " + info.category;
  const t = document.createElement("time");
  t.textContent = utc(h.first_unix_s, true);
  li.appendChild(t);
  const b = document.createElement("b");
  b.textContent = ` ${info.text}`;
  li.appendChild(b);
  li.appendChild(document.createTextNode(
    (h.count > 1 ? ` ×${h.count}` : "") + (h.deviation_mm !== null ? ` (${h.deviation_mm.toFixed(2)} mm)` : "") +
    ` [${h.reason}] Next: ${info.action}`));
  return li;
}

function renderHolds() {
  for (const [id, list] of [["holds", state.safety_holds || []], ["routine-holds", state.routine_holds || []]]) {
    const ol = $(id);
    ol.replaceChildren(...[...list].reverse().map(holdItem));
  }
}

function renderJournal(entries) {
  const loads = entries.filter((j) => j.command === "load_plan" && j.ok);
  const last = loads.length ? loads[loads.length - 1] : null;
  $("fraction-loaded").textContent = last
    ? `${last.patient_id} · plan ${last.plan_id} · fraction ${last.fraction} (loaded by ${last.console_user || last.operator} ${utc(last.t_unix_s)})`
    : "none loaded";
  const ol = $("journal");
  ol.replaceChildren(...[...entries].reverse().map((j) => {
    const li = document.createElement("li");
    li.className = "journal-entry" + (j.ok ? "" : " refused");
    const who = j.console_user ? `${j.console_user} via ${j.operator}` : j.operator;
    li.textContent = `${utc(j.t_unix_s)} ${who}: ${j.command}` + (j.fraction ? ` (fraction ${j.fraction})` : "") +
      (j.ok ? "" : ` — refused: ${j.reason}`);
    return li;
  }));
}

function renderActions() {
  const hb = state.heartbeat, alive = serviceAlive();
  const st = alive && hb ? hb.state : null;
  const valid = {
    start_monitoring: st === "SETUP" && hb.phase === "verified",
    start_setup: ["PLAN_LOADED", "MONITORING", "PAUSED"].includes(st),
    pause: st === "MONITORING", resume: st === "PAUSED",
    stop: !!st && st !== "STOPPED",
  };
  for (const b of document.querySelectorAll("#actions button[data-command]")) {
    b.disabled = !(may(b.dataset.command) && valid[b.dataset.command]);
  }
  $("end-button").disabled = !(may("stop") && valid.stop);
  if (!valid.stop) $("end-confirm").hidden = true;
  $("load-plan-button").disabled = !(may("load_plan") && ["IDLE", "PLAN_LOADED"].includes(st) && selectedPlan());
}

function drawTimeline() {
  const cv = $("timeline"), ctx = cv.getContext("2d");
  const want = Math.max(200, Math.floor(cv.clientWidth));
  if (cv.width !== want) cv.width = want;
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
  ctx.fillStyle = "#ccc"; ctx.font = "11px sans-serif";
  ctx.fillText(`${ymax.toFixed(1)} mm`, 2, 10); ctx.fillText(`tolerance ${tol} mm, last ${span} s`, w - 160, 10);
}

function post(url, body) {
  const headers = { "Content-Type": "application/json" };
  if (me && me.csrf) headers["X-SG-CSRF"] = me.csrf;
  return fetch(url, { method: "POST", headers, body: JSON.stringify(body), credentials: "same-origin" });
}

async function sendCommand(command, params) {
  const r = await post("/api/command", { command, params });
  const body = await r.json();
  const el = $("command-result");
  if (r.status === 202) el.textContent = `${command}: first sign-off recorded; ${body.reason}`;
  else el.textContent = r.ok
    ? `${command}: ${body.ok ? "accepted" : "refused: " + body.reason} (state ${body.state}, phase ${body.phase})`
    : `${command}: ${body.error}`;
  el.className = (r.ok && body.ok) || r.status === 202 ? "" : "error";
  if (r.status === 401) setLogin(null);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const secret = $("login-token").value;
  const body = { operator: $("login-operator").value };
  body[config.accounts === "token" ? "token" : "password"] = secret;
  const r = await post("/api/login", body);
  const out = await r.json();
  $("login-token").value = "";
  if (r.ok) { setLogin({ operator: out.operator, role: out.role, csrf: out.csrf }); reconnect(); }
  else { setLogin(null); $("login-status").textContent = `login failed: ${out.error}`; }
});
$("logout-button").addEventListener("click", async () => {
  await post("/api/logout", {}); setLogin(null); forgetFrames(); reconnect();
});
$("plan-select").addEventListener("change", () => { showPlanDetails(); if (state) render(); });
$("load-plan-button").addEventListener("click", () => {
  const p = selectedPlan();
  const n = Number($("fraction-number").value);
  if (!p) return;
  if (!Number.isInteger(n) || n < 1 || n > (config.max_fraction || 99)) {
    $("command-result").textContent = `fraction number must be a whole number from 1 to ${config.max_fraction || 99}`;
    $("command-result").className = "error";
    $("fraction-number").focus();
    return;
  }
  sendCommand("load_plan", { patient_id: p.patient_id, plan_id: p.plan_id, fraction: n });
});
$("approve-button").addEventListener("click", () => {
  const params = { pair_id: Number($("approve-button").dataset.pairId) };
  if (!$("levels-box").hidden && $("approve-button").dataset.level) params.level = $("approve-button").dataset.level;
  sendCommand("approve_correction", params);
});
$("end-button").addEventListener("click", () => { $("end-confirm").hidden = false; $("end-confirm").disabled = false; $("end-confirm").focus(); });
for (const b of document.querySelectorAll("#actions button[data-command]")) {
  b.addEventListener("click", () => { if (b.id === "end-confirm") b.hidden = true; sendCommand(b.dataset.command, {}); });
}
// Zoom (slider) and pan (drag, or arrow keys on a focused image); both images move together.
const pan = { x: 0, y: 0 };
function applyZoom() {
  const z = Number($("zoom").value);
  const lim = 50 * (1 - 1 / z);                  // percent of the image: never pan past its edge
  pan.x = Math.max(-lim, Math.min(lim, pan.x)); pan.y = Math.max(-lim, Math.min(lim, pan.y));
  for (const n of ["A", "B"]) $("proposal-" + n).style.transform = `scale(${z}) translate(${pan.x}%, ${pan.y}%)`;
}
for (const n of ["A", "B"]) {
  const viewer = $("proposal-" + n).parentElement;
  let drag = null;
  viewer.addEventListener("pointerdown", (ev) => { drag = { x: ev.clientX, y: ev.clientY }; viewer.setPointerCapture(ev.pointerId); });
  viewer.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const z = Number($("zoom").value), r = viewer.getBoundingClientRect();
    pan.x += (ev.clientX - drag.x) / r.width * 100 / z; pan.y += (ev.clientY - drag.y) / r.height * 100 / z;
    drag = { x: ev.clientX, y: ev.clientY };
    applyZoom();
  });
  viewer.addEventListener("pointerup", () => { drag = null; });
  viewer.addEventListener("keydown", (ev) => {
    const step = { ArrowLeft: [5, 0], ArrowRight: [-5, 0], ArrowUp: [0, 5], ArrowDown: [0, -5] }[ev.key];
    if (!step) return;
    ev.preventDefault();
    pan.x += step[0]; pan.y += step[1];
    applyZoom();
  });
}
// Window/level: the server re-renders the proposal's raw frames between the chosen percentiles.
let windowTimer = null;
function applyWindow() {
  clearTimeout(windowTimer);
  windowTimer = setTimeout(() => {
    const p = state && pendingProposal();
    if (!p) return;
    const w = Number($("window").value), l = Number($("level").value);
    const lo = Math.max(0, l - w / 2), hi = Math.min(100, l + w / 2);
    if (!(hi > lo)) return;
    for (const n of ["A", "B"]) {
      const img = $("proposal-" + n);
      img.src = `/api/proposal/${n}?pair_id=${p.pair_id}&lo=${lo.toFixed(1)}&hi=${hi.toFixed(1)}`;
      img.dataset.pairId = p.pair_id;
    }
  }, 150);
}
$("zoom").addEventListener("input", applyZoom);
for (const id of ["window", "level"]) $(id).addEventListener("input", applyWindow);

setInterval(renderLive, 50);
loadConfig().then(connect);
