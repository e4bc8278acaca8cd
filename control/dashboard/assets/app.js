// The Flynn dashboard: one page, rendered from the cluster's own API (the same calls the
// CLI makes), on the dashboard's own origin. The session cookie is HttpOnly; this script
// holds only the CSRF token, which every change carries.
"use strict";

let csrf = null;
let timers = [];

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function stopTimers() {
  timers.forEach(clearInterval);
  timers = [];
}

function every(ms, f) {
  timers.push(setInterval(f, ms));
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opts.headers["x-csrf-token"] = csrf || "";
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { message: text }; }
  if (r.status === 401) {
    // The login form once: polls still in flight when the session ends also get 401.
    if (csrf !== null) {
      csrf = null;
      login("The session has ended: log in again.");
    }
    throw new ApiError(401, (data && data.message) || "log in again");
  }
  if (!r.ok) throw new ApiError(r.status, (data && (data.message || data.error)) || r.statusText);
  return data;
}

const api = (path) => call("GET", "/api" + path);
const change = (method, path, body) => call(method, "/api" + path, body);

// Writes a form's status line, found by id: the page may have been drawn again since the
// form was sent.
function tell(id, cls, text) {
  const m = document.getElementById(id);
  if (m) { m.className = cls; m.textContent = text; }
}

function errorLine(e) {
  return h("p", { class: "error", role: "alert", text: e.message || String(e) });
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

// ---- live charts ----

const SVG = "http://www.w3.org/2000/svg";
const POINTS = 60;

function fmt(v) {
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

// A small line chart of the last POINTS values, with the latest one written beside it.
function sparkline(label, unit, id) {
  const points = [];
  const value = h("span", { class: "chart-value", id: id + "-value", text: "–" });
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", "180");
  svg.setAttribute("height", "48");
  svg.setAttribute("viewBox", "0 0 180 48");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#0550ae");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  const el = h("figure", { class: "chart", id }, h("figcaption", {}, label + ": ", value), svg);
  return {
    el,
    push(v, text) {
      points.push(v);
      if (points.length > POINTS) points.shift();
      const known = points.filter((p) => p !== null);
      const max = Math.max(1e-9, ...known);
      line.setAttribute("points", points
        .map((p, i) => (p === null ? null : (i * 3) + "," + (46 - (p / max) * 44).toFixed(1)))
        .filter((p) => p !== null).join(" "));
      value.textContent = text || (v === null ? "–" : fmt(v) + (unit ? " " + unit : ""));
      svg.setAttribute("aria-label", label + ": " + value.textContent);
    },
  };
}

// Asks /charts every two seconds and hands each answer with the one before to `draw`.
function followCharts(draw) {
  let prev = null, prevAt = 0;
  const tick = async () => {
    try {
      const now = await call("GET", "/charts");
      // Rates over this browser's clock: successive answers may come from different hosts.
      const at = performance.now();
      draw(now, prev, prev ? (at - prevAt) / 1000 : 0);
      prev = now;
      prevAt = at;
    } catch (_) { /* a missed sample leaves a gap */ }
  };
  tick();
  every(2000, tick);
}

// Sums, over the hosts in both samples, what grew on each: a host that missed a sample
// (or restarted, its counters back at zero) adds nothing rather than its whole history.
function grown(now, prev, pick) {
  let sum = 0;
  for (const x of now.hosts) {
    const before = prev.hosts.find((p) => p.addr === x.addr);
    if (!x.answered || !before || !before.answered) continue;
    const d = pick(x) - pick(before);
    if (d > 0) sum += d;
  }
  return sum;
}

// Cumulative latency buckets grown over the hosts in both samples, merged by bound:
// [[bound, n]], the last bound null (+Inf).
function grownBuckets(now, prev, app) {
  const merged = new Map();
  for (const x of now.hosts) {
    const before = prev.hosts.find((p) => p.addr === x.addr);
    if (!x.answered || !before || !before.answered) continue;
    const a = (x.apps[app] || {}).latency || [];
    const b = new Map(((before.apps[app] || {}).latency || []).map(([le, n]) => [le, n]));
    for (const [le, n] of a) {
      const d = n - (b.get(le) || 0);
      if (d > 0) merged.set(le, (merged.get(le) || 0) + d);
    }
  }
  return [...merged.entries()].sort((x, y) => (x[0] === null ? Infinity : x[0]) - (y[0] === null ? Infinity : y[0]));
}

function appCharts(name) {
  const rps = sparkline("Requests/s", "", "chart-rps");
  const lat = sparkline("p99", "ms", "chart-p99");
  const mem = sparkline("Memory", "MiB", "chart-memory");
  const cpu = sparkline("CPU", "%", "chart-cpu");
  followCharts((now, prev, dt) => {
    const app = (x) => x.apps[name] || {};
    let memory = 0, seen = false;
    for (const x of now.hosts) {
      if (x.answered && app(x).memory_bytes !== undefined) { memory += app(x).memory_bytes; seen = true; }
    }
    mem.push(seen ? memory / 1048576 : null);
    if (!prev || dt <= 0) { rps.push(null); lat.push(null); cpu.push(null); return; }
    rps.push(grown(now, prev, (x) => app(x).requests || 0) / dt);
    const cpuGrown = now.hosts.reduce((sum, x) => {
      const before = prev.hosts.find((p) => p.addr === x.addr);
      if (!x.answered || !before || !before.answered) return sum;
      // Per job: one that ended leaves the sum, one that started joins it.
      const was = app(before).cpu || {};
      return sum + Object.entries(app(x).cpu || {}).reduce((s, [job, c]) => s + (job in was && c > was[job] ? c - was[job] : 0), 0);
    }, 0);
    cpu.push(cpuGrown / dt * 100);
    // The buckets are cumulative: the last (+Inf) holds every request.
    const buckets = grownBuckets(now, prev, name);
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (total === 0) { lat.push(null); return; }
    const hit = buckets.find(([, n]) => n >= 0.99 * total);
    if (!hit || hit[0] === null) lat.push(5000, "over 5000 ms"); else lat.push(hit[0] * 1000);
  });
  return h("div", { class: "charts" }, rps.el, lat.el, mem.el, cpu.el);
}

function hostCharts() {
  const box = h("div", { class: "charts", id: "host-charts" });
  const charts = {};
  followCharts((now) => {
    for (const x of now.hosts) {
      if (!charts[x.addr]) {
        charts[x.addr] = sparkline("Load " + x.addr.replace(/:\d+$/, "") + (x.cpus ? " (" + x.cpus + " CPUs)" : ""), "", "load-" + Object.keys(charts).length);
        box.append(charts[x.addr].el);
      }
      charts[x.addr].push(x.answered ? x.load1 : null);
    }
  });
  return box;
}

// ---- deploying an image archive from the browser ----
//
// The archive (`docker save` or an OCI layout, tarred) is read in place with File.slice:
// its tar headers are indexed, its manifest and config read, and each layer hashed
// (SHA-256 checked against the digest the archive names it by, SHA-512 as the cluster
// stores it), then uploaded unless the cluster has it, then a release made and its rollout
// followed: the same calls `flynn docker push` makes.

async function readText(file, at, size) {
  return new TextDecoder().decode(await file.slice(at, at + size).arrayBuffer());
}

function octal(bytes) {
  const t = new TextDecoder().decode(bytes).replace(/\0.*$/s, "").trim();
  return t ? parseInt(t, 8) : 0;
}

function cstr(bytes) {
  const i = bytes.indexOf(0);
  return new TextDecoder().decode(i < 0 ? bytes : bytes.subarray(0, i));
}

function cleanName(n) {
  return n.replace(/^\.\//, "").replace(/\/+$/, "");
}

// Name → {at, size} of every file, and name → target of every symlink.
async function indexTar(file) {
  // No prototype: an entry named "constructor" is an entry like any other.
  const entries = Object.create(null), links = Object.create(null);
  let at = 0, longName = null;
  while (at + 512 <= file.size) {
    const head = new Uint8Array(await file.slice(at, at + 512).arrayBuffer());
    if (head.every((b) => b === 0)) break;
    // A tar header carries the sum of its own bytes (its checksum field read as spaces).
    const sum = head.reduce((n, b, i) => n + (i >= 148 && i < 156 ? 32 : b), 0);
    const size = octal(head.subarray(124, 136));
    if (sum !== octal(head.subarray(148, 156)) || !(size >= 0)) {
      throw new Error(file.name + " is not a tar archive (expected a docker save or OCI image archive)");
    }
    const type = String.fromCharCode(head[156] || 48);
    let name = cstr(head.subarray(0, 100));
    const prefix = cstr(head.subarray(345, 500));
    if (prefix && new TextDecoder().decode(head.subarray(257, 262)) === "ustar") name = prefix + "/" + name;
    if (longName !== null) { name = longName; longName = null; }
    const data = at + 512;
    if ((type === "L" || type === "x") && size > 1 << 20) {
      throw new Error(file.name + " has a tar header of " + size + " bytes: not an image archive");
    }
    if (type === "L") {
      longName = (await readText(file, data, size)).replace(/\0+$/, "");
    } else if (type === "x") {
      const pax = await readText(file, data, size);
      const m = pax.match(/\d+ path=([^\n]*)\n/);
      if (m) longName = m[1];
    } else if (type === "2") {
      links[cleanName(name)] = cstr(head.subarray(157, 257));
    } else if (type === "0" || type === "\0" || type === "7") {
      entries[cleanName(name)] = { at: data, size };
    }
    at = data + Math.ceil(size / 512) * 512;
  }
  return { entries, links };
}

function resolveEntry(tar, name) {
  for (let i = 0; i < 8; i++) {
    if (tar.entries[name]) return tar.entries[name];
    const target = tar.links[name];
    if (target === undefined) return null;
    const base = target.startsWith("/") ? [] : name.split("/").slice(0, -1);
    for (const part of target.split("/")) {
      if (part === "..") base.pop(); else if (part && part !== ".") base.push(part);
    }
    name = base.join("/");
  }
  return null;
}

async function tarJson(file, tar, name) {
  const e = resolveEntry(tar, name);
  if (!e) throw new Error(name + " is missing from the archive");
  if (e.size > 16 << 20) throw new Error(name + " is too large to be a manifest");
  try { return JSON.parse(await readText(file, e.at, e.size)); }
  catch (_) { throw new Error(name + " is not valid JSON"); }
}

// The layers (bottom first, each {name, sha256}) and the run config of an image archive.
async function parseImage(file, tar) {
  const blob = (d) => {
    if (!/^sha256:[0-9a-f]{64}$/.test(d.digest || "")) throw new Error("unsupported digest " + d.digest);
    return "blobs/sha256/" + d.digest.slice(7);
  };
  const inName = (n) => { const m = n.match(/^blobs\/sha256\/([0-9a-f]{64})$/); return m ? m[1] : null; };
  let configName, layerNames = [], layerDigests = [];
  if (resolveEntry(tar, "manifest.json")) {
    const manifest = await tarJson(file, tar, "manifest.json");
    if (!Array.isArray(manifest) || !manifest[0]) throw new Error("manifest.json lists no image");
    configName = manifest[0].Config;
    layerNames = manifest[0].Layers || [];
  } else if (resolveEntry(tar, "index.json")) {
    let desc = ((await tarJson(file, tar, "index.json")).manifests || [])[0];
    for (let i = 0; desc && (desc.mediaType || "").includes("index") && i < 4; i++) {
      desc = ((await tarJson(file, tar, blob(desc))).manifests || [])[0];
    }
    if (!desc) throw new Error("index.json lists no manifest");
    const manifest = await tarJson(file, tar, blob(desc));
    configName = blob(manifest.config);
    layerNames = (manifest.layers || []).map(blob);
  } else {
    throw new Error("not a docker save or OCI image archive (no manifest.json or index.json)");
  }
  const config = await tarJson(file, tar, configName);
  const diffIds = (config.rootfs && config.rootfs.diff_ids) || [];
  layerDigests = layerNames.map((n, i) => inName(n) || (diffIds[i] || "").replace(/^sha256:/, "") || null);
  const c = config.config || {};
  return {
    layers: layerNames.map((name, i) => ({ name, sha256: layerDigests[i] })),
    config: { entrypoint: c.Entrypoint || [], cmd: c.Cmd || [], env: c.Env || [], working_dir: c.WorkingDir || "", user: c.User || "" },
  };
}

const hexOf = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

function putLayer(sha512, blob, onProgress) {
  return new Promise((resolve, reject) => {
    const x = new XMLHttpRequest();
    x.open("PUT", "/api/layers/" + sha512);
    x.setRequestHeader("x-csrf-token", csrf || "");
    x.upload.onprogress = (e) => onProgress(e.loaded);
    x.onload = () => {
      if (x.status === 401) {
        if (csrf !== null) { csrf = null; login("The session has ended: log in again."); }
        reject(new Error("log in again"));
      }
      else if (x.status >= 200 && x.status < 300) resolve();
      else {
        let m = x.statusText;
        try { m = JSON.parse(x.responseText).message || m; } catch (_) {}
        reject(new Error("uploading a layer: " + m));
      }
    };
    x.onerror = () => reject(new Error("uploading a layer: the connection failed"));
    x.send(blob);
  });
}

async function deployArchive(app, file, say, bar) {
  const enc = encodeURIComponent(app);
  say("Reading " + file.name + "…");
  const tar = await indexTar(file);
  const image = await parseImage(file, tar);
  const total = image.layers.reduce((n, l) => n + (resolveEntry(tar, l.name) || { size: 0 }).size, 0);
  let done = 0, uploaded = 0;
  bar.max = Math.max(1, total);
  const layers = [];
  for (const [i, l] of image.layers.entries()) {
    const e = resolveEntry(tar, l.name);
    if (!e) throw new Error("layer " + l.name + " is missing from the archive");
    // Hashed whole in memory (WebCrypto does not stream): larger layers go with the CLI.
    if (e.size > 1 << 30) throw new Error("layer " + (l.name) + " is over 1 GiB: deploy this image with flynn docker push");
    const label = "layer " + (i + 1) + "/" + image.layers.length;
    say(label + ": checking (" + (e.size / 1048576).toFixed(1) + " MB)…");
    const bytes = await file.slice(e.at, e.at + e.size).arrayBuffer();
    if (l.sha256 && hexOf(await crypto.subtle.digest("SHA-256", bytes)) !== l.sha256) {
      throw new Error(label + " is corrupt: its SHA-256 is not the one the image names");
    }
    const sha512 = hexOf(await crypto.subtle.digest("SHA-512", bytes));
    const head = new Uint8Array(bytes.slice(0, 4));
    const compression = head[0] === 0x1f && head[1] === 0x8b ? "gzip"
      : head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd ? "zstd" : "none";
    const has = await fetch("/api/layers/" + sha512, { method: "HEAD", credentials: "same-origin" });
    if (has.ok) {
      say(label + ": already in the cluster");
    } else {
      say(label + ": uploading…");
      await putLayer(sha512, file.slice(e.at, e.at + e.size), (n) => { bar.value = done + n; });
      uploaded += 1;
    }
    done += e.size;
    bar.value = done;
    layers.push({ sha512, size: e.size, compression });
  }
  say("Creating the release…");
  const release = await change("POST", "/apps/" + enc + "/releases", { image: { layers, config: image.config } });
  for (let i = 0; i < 240; i++) {
    const r = await api("/apps/" + enc + "/releases/" + encodeURIComponent(release.id) + "/rollout");
    const types = Object.entries(r.processes || {}).map(([t, p]) => t + " " + p.running + "/" + p.want + " running").join(", ");
    if (r.state === "done") {
      // The form says "Deployed" once the page is drawn again with the release, not
      // before: a "Deployed" on the page about to be replaced would be read too early.
      say("Rolled out " + release.id + "; showing it…");
      return "Deployed " + release.id + (types ? ": " + types : "") + " (" + layers.length + " layers, " + uploaded + " uploaded).";
    }
    if (r.state === "failed") throw new Error(release.id + " failed: " + (r.error || "its jobs did not start"));
    say("Deploying " + release.id + (types ? ": " + types : "") + (r.waiting ? " (" + r.waiting + ")" : "") + "…");
    await new Promise((ok) => setTimeout(ok, 1000));
  }
  throw new Error(release.id + " is still rolling out; see its jobs below");
}

// ---- login ----

function login(message) {
  stopTimers();
  document.getElementById("nav").hidden = true;
  const err = h("p", { class: "error", role: "alert", id: "login-error", text: message || "" });
  const input = h("input", { id: "secret", type: "password", autocomplete: "current-password", required: true, size: 44 });
  const form = h("form", { class: "login", onsubmit: async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      try {
        const r = await fetch("/login", {
          method: "POST",
          credentials: "same-origin",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ token: input.value }),
        });
        const data = await r.json().catch(() => ({}));
        if (!r.ok) { err.textContent = data.message || ("login refused (" + r.status + ")"); input.select(); return; }
        csrf = data.csrf;
        input.value = "";
        // One render: a changed hash renders through its event, an unchanged one here.
        if (location.hash !== "#/apps") location.hash = "#/apps"; else route();
      } catch (e) { err.textContent = String(e); }
    } },
    h("h1", { text: "Log in" }),
    h("p", { class: "muted" }, "With the login token (", h("code", { text: "flynn -a dashboard env get LOGIN_TOKEN" }), ") or a controller key."),
    h("label", { for: "secret", text: "Login token or controller key" }),
    input,
    h("div", { class: "row" }, h("button", { class: "primary", type: "submit", id: "login-submit", text: "Log in" })),
    err);
  show(form);
  input.focus();
}

async function logout() {
  stopTimers();
  const token = csrf;
  // Logged out from here on: a poll that comes back with 401 meanwhile draws nothing.
  csrf = null;
  try {
    await fetch("/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": token || "" } });
  } catch (_) { /* gone already */ }
  login("Logged out.");
}

// ---- apps ----

async function appsPage() {
  const apps = await api("/apps");
  const showSystem = location.hash.includes("system");
  const list = apps.filter((a) => showSystem || !a.system).sort((a, b) => a.name.localeCompare(b.name));
  const newName = h("input", { id: "new-app", size: 24, pattern: "[a-z0-9][a-z0-9-]*", required: true });
  const createMsg = h("p", { role: "status", id: "create-status" });
  const createForm = h("form", { id: "create-app", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const a = await change("POST", "/apps", { name: newName.value.trim() });
        location.hash = "#/apps/" + encodeURIComponent(a.name);
      } catch (e) { createMsg.className = "error"; createMsg.textContent = e.message; }
    } },
    h("label", { for: "new-app", text: "New app" }),
    h("div", { class: "row" }, newName, h("button", { type: "submit", id: "create-submit", text: "Create" })), createMsg);
  show(
    h("h1", { text: "Apps" }),
    createForm,
    h("p", {}, h("a", { href: showSystem ? "#/apps" : "#/apps?system", text: showSystem ? "Hide system apps" : "Show system apps" })),
    list.length === 0 ? h("p", { class: "muted", id: "apps", text: "No apps yet: create one above, then deploy an image to it." }) :
    h("table", { id: "apps" },
      h("thead", {}, h("tr", {}, h("th", { text: "Name" }), h("th", { text: "Kind" }))),
      h("tbody", {}, list.map((a) => h("tr", {},
        h("td", {}, h("a", { href: "#/apps/" + encodeURIComponent(a.name), text: a.name })),
        h("td", { text: a.system ? "system" : "app" }))))));
}

function envText(global) {
  return Object.entries(global || {}).map(([k, v]) => k + "=" + v).join("\n");
}

function parseEnv(text) {
  const out = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const i = line.indexOf("=");
    if (i <= 0) throw new Error("not KEY=VALUE: " + line);
    out[line.slice(0, i).trim()] = line.slice(i + 1);
  }
  return out;
}

async function appPage(name) {
  const enc = encodeURIComponent(name);
  const [app, formation, jobs, releases, routes, hosts, certs, resources, providers] = await Promise.all([
    api("/apps/" + enc), api("/apps/" + enc + "/formation"), api("/apps/" + enc + "/jobs"),
    api("/apps/" + enc + "/releases"), api("/apps/" + enc + "/routes"), api("/hosts"),
    api("/certificates"), api("/apps/" + enc + "/resources"), api("/providers"),
  ]);
  // Host ids are 64-bit: shown by address, which is what an operator knows them by.
  const hostName = {};
  for (const x of hosts) hostName[x.node_id] = x.addr.replace(/:\d+$/, "");
  const current = releases.find((r) => r.id === formation.release);
  const types = Object.keys(Object.assign({}, current ? current.processes : {}, formation.processes || {})).sort();

  const jobsBody = h("tbody", { id: "jobs-body" });
  const renderJobs = (list) => {
    // Jobs that ended over a minute ago are history, not the app's state.
    const live = list.filter((j) => !j.ended_ms || Date.now() - j.ended_ms < 60000);
    jobsBody.replaceChildren(...live.map((j) => h("tr", {},
      h("td", { class: "mono", text: j.id }), h("td", { text: j.type }), h("td", { class: "mono", text: hostName[j.host] || "host " + j.host }),
      h("td", { class: "state-" + j.state, text: j.state }), h("td", { class: "mono", text: j.release }))));
  };
  renderJobs(jobs);
  every(1000, async () => { try { renderJobs(await api("/apps/" + enc + "/jobs")); } catch (_) {} });

  const scaleMsg = h("p", { role: "status", id: "scale-status" });
  const inputs = {};
  const scaleForm = h("form", { id: "scale", onsubmit: async (ev) => {
      ev.preventDefault();
      const processes = {};
      const changes = [];
      for (const t of types) {
        const n = parseInt(inputs[t].value, 10);
        if (!(n >= 0)) { scaleMsg.textContent = t + ": a count of 0 or more"; return; }
        const was = (formation.processes || {})[t] || 0;
        processes[t] = n;
        if (n !== was) changes.push(t + " " + was + " → " + n);
      }
      if (changes.length === 0) { scaleMsg.textContent = "Nothing to change."; return; }
      if (!(await confirmDialog("Scale " + name + ": " + changes.join(", ") + "?"))) return;
      try {
        const f = await change("POST", "/apps/" + enc + "/scale", { processes });
        formation.processes = f.processes;
        scaleMsg.className = "ok";
        scaleMsg.textContent = "Scaled: " + changes.join(", ") + ". Jobs below follow the rollout.";
      } catch (e) { scaleMsg.className = "error"; scaleMsg.textContent = e.message; }
    } },
    types.length === 0 ? h("p", { class: "muted", text: "No release yet." }) :
    h("div", { class: "row" }, types.map((t) => {
      inputs[t] = h("input", { id: "scale-" + t, type: "number", min: "0", max: "1000", value: String((formation.processes || {})[t] || 0), size: 4 });
      return [h("label", { for: "scale-" + t, text: t }), inputs[t]];
    }), types.length ? h("button", { class: "primary", type: "submit", id: "scale-submit", text: "Scale" }) : null),
    scaleMsg);

  const deployMsg = h("p", { role: "status", id: "deploy-status" });
  const deployBar = h("progress", { id: "deploy-progress", value: "0", max: "1", hidden: true });
  const deployFile = h("input", { id: "deploy-file", type: "file", accept: ".tar,application/x-tar" });
  const deployForm = h("form", { id: "deploy", onsubmit: async (ev) => {
      ev.preventDefault();
      const file = deployFile.files[0];
      if (!file) { deployMsg.className = "error"; deployMsg.textContent = "Choose an image archive first."; return; }
      deployBar.hidden = false;
      deployMsg.className = "";
      try {
        const said = await deployArchive(name, file, (t) => { deployMsg.textContent = t; }, deployBar);
        // The page again, with the new release, its types to scale and its jobs.
        await route();
        tell("deploy-status", "ok", said);
      } catch (e) { deployMsg.className = "error"; deployMsg.textContent = e.message; }
    } },
    h("label", { for: "deploy-file", text: "Image archive (docker save or OCI, .tar)" }),
    h("div", { class: "row" }, deployFile, h("button", { class: "primary", type: "submit", id: "deploy-submit", text: "Deploy" })),
    deployBar, deployMsg);

  const envMsg = h("p", { role: "status", id: "env-status" });
  const envArea = h("textarea", { id: "env", spellcheck: "false" });
  envArea.value = envText(app.env && app.env.global);
  const envForm = h("form", { id: "env-form", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const want = parseEnv(envArea.value);
        const had = (app.env && app.env.global) || {};
        const set = {};
        for (const [k, v] of Object.entries(want)) if (had[k] !== v) set[k] = v;
        const unset = Object.keys(had).filter((k) => !(k in want));
        if (Object.keys(set).length === 0 && unset.length === 0) { envMsg.textContent = "Nothing to change."; return; }
        const updated = await change("POST", "/apps/" + enc + "/env", { set, unset });
        app.env = updated.env;
        const f = await api("/apps/" + enc + "/formation");
        envMsg.className = "ok";
        envMsg.textContent = "Saved" + (f.release && f.release !== formation.release ? "; new release " + f.release + " is rolling out." : ".");
        formation.release = f.release;
      } catch (e) { envMsg.className = "error"; envMsg.textContent = e.message; }
    } },
    h("label", { for: "env", text: "Environment (KEY=VALUE per line)" }), envArea,
    h("div", { class: "row" }, h("button", { class: "primary", type: "submit", id: "env-submit", text: "Save env" })),
    envMsg);

  const relMsg = h("p", { role: "status" });
  const relTable = h("table", { id: "releases" },
    h("thead", {}, h("tr", {}, ["Release", "Created", "Processes", ""].map((t) => h("th", { text: t })))),
    h("tbody", {}, releases.slice().reverse().map((r) => h("tr", {},
      h("td", { class: "mono", text: r.id + (r.id === formation.release ? " (current)" : "") }),
      h("td", { text: ago(r.created_ms) }),
      h("td", { text: Object.keys(r.processes || {}).join(", ") }),
      h("td", {}, r.id === formation.release ? null : h("button", { type: "button", onclick: async () => {
          if (!(await confirmDialog("Roll " + name + " back to " + r.id + "'s image and processes?"))) return;
          try {
            const nr = await change("POST", "/apps/" + enc + "/releases", { image: r.image, processes: r.processes });
            relMsg.className = "ok"; relMsg.textContent = "Rolling out " + nr.id + " (the image of " + r.id + ").";
          } catch (e) { relMsg.className = "error"; relMsg.textContent = e.message; }
        }, text: "Roll back to this" }))))));

  const routeMsg = h("p", { role: "status", id: "route-status" });
  const certName = (id) => { const c = certs.find((x) => x.id === id); return c ? c.domains.join(", ") : id; };
  const routeDomain = h("input", { id: "route-domain", placeholder: "www.example.com", size: 30 });
  const routeHttps = h("input", { id: "route-https", type: "checkbox" });
  const certPem = h("textarea", { id: "route-cert", class: "pem", spellcheck: "false", placeholder: "-----BEGIN CERTIFICATE-----" });
  const keyPem = h("textarea", { id: "route-key", class: "pem", spellcheck: "false", placeholder: "-----BEGIN PRIVATE KEY-----" });
  const httpForm = h("form", { id: "route-http", onsubmit: async (ev) => {
      ev.preventDefault();
      const domain = routeDomain.value.trim();
      try {
        let certificate = null;
        if (certPem.value.trim() || keyPem.value.trim()) {
          // The certificate goes in first; the route then names it.
          const c = await change("POST", "/certificates", { domains: [domain], cert_pem: certPem.value, key_pem: keyPem.value });
          certificate = c.id;
        }
        await change("POST", "/apps/" + enc + "/routes", { type: "http", domain, certificate, https_redirect: routeHttps.checked });
        await route();
        tell("route-status", "ok", "Added " + domain + (certificate ? " with its certificate." : "."));
      } catch (e) { tell("route-status", "error", e.message); }
    } },
    h("label", { for: "route-domain", text: "Add an HTTP route: domain" }), routeDomain,
    h("label", { for: "route-cert", text: "Its certificate (PEM, optional)" }), certPem,
    h("label", { for: "route-key", text: "The certificate's private key (PEM)" }), keyPem,
    h("div", { class: "row" }, routeHttps, h("label", { for: "route-https", text: "Redirect plain HTTP to HTTPS" })),
    h("div", { class: "row" }, h("button", { type: "submit", id: "route-http-submit", text: "Add HTTP route" })));
  const tcpPort = h("input", { id: "route-port", type: "number", min: "1", max: "65535", size: 6, placeholder: "any" });
  const tcpForm = h("form", { id: "route-tcp", onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const r = await change("POST", "/apps/" + enc + "/routes", { type: "tcp", port: tcpPort.value ? parseInt(tcpPort.value, 10) : null });
        await route();
        tell("route-status", "ok", "Added TCP port " + r.port + ".");
      } catch (e) { tell("route-status", "error", e.message); }
    } },
    h("label", { for: "route-port", text: "Add a TCP route: port (empty: the router picks one)" }),
    h("div", { class: "row" }, tcpPort, h("button", { type: "submit", id: "route-tcp-submit", text: "Add TCP route" })));
  const routesTable = h("table", { id: "routes" },
    h("thead", {}, h("tr", {}, ["Route", "Service", "TLS", ""].map((t) => h("th", { text: t })))),
    h("tbody", {}, routes.map((r) => h("tr", {},
      h("td", { class: "mono", text: r.type === "tcp" ? "tcp :" + r.port : (r.domain + (r.path || "")) }),
      h("td", { text: r.service || "" }),
      h("td", { text: r.certificate ? "certificate for " + certName(r.certificate) + (r.https_redirect ? ", HTTP redirected" : "") : "" }),
      h("td", {}, h("button", { type: "button", "aria-label": "Remove the route " + (r.domain || r.port), onclick: async () => {
          if (!(await confirmDialog("Remove the route " + (r.type === "tcp" ? "tcp :" + r.port : r.domain) + "?"))) return;
          try {
            await change("DELETE", "/apps/" + enc + "/routes/" + encodeURIComponent(r.id));
            // A certificate no other route serves goes with its route.
            if (r.certificate && !routes.some((o) => o.id !== r.id && o.certificate === r.certificate)) {
              await change("DELETE", "/certificates/" + encodeURIComponent(r.certificate)).catch(() => {});
            }
            route();
          } catch (e) { routeMsg.className = "error"; routeMsg.textContent = e.message; }
        }, text: "Remove" }))))));

  const resMsg = h("p", { role: "status", id: "resource-status" });
  const providerSelect = h("select", { id: "provider" }, providers.map((p) => h("option", { value: p.name, text: p.name })));
  const resForm = h("form", { id: "resource-add", onsubmit: async (ev) => {
      ev.preventDefault();
      const provider = providerSelect.value;
      resMsg.className = ""; resMsg.textContent = "Provisioning " + provider + "…";
      try {
        const r = await change("POST", "/providers/" + encodeURIComponent(provider) + "/resources", { app: name });
        await route();
        tell("resource-status", "ok", "Added " + provider + " " + r.id + (r.release ? "; " + r.release + " rolls out with its env." : "."));
      } catch (e) { tell("resource-status", "error", e.message); }
    } },
    h("label", { for: "provider", text: "Add a database" }),
    h("div", { class: "row" }, providerSelect, h("button", { type: "submit", id: "resource-submit", text: "Add" })), resMsg);
  const resTable = resources.length === 0 ? h("p", { class: "muted", id: "resources", text: "No databases." }) :
    h("table", { id: "resources" },
      h("thead", {}, h("tr", {}, ["Resource", "Provider", "Env", ""].map((t) => h("th", { text: t })))),
      h("tbody", {}, resources.map((r) => h("tr", {},
        h("td", { class: "mono", text: r.id }), h("td", { text: r.provider }),
        h("td", { class: "mono", text: Object.keys(r.env || {}).join(" ") }),
        h("td", {}, h("button", { type: "button", "aria-label": "Remove " + r.id, onclick: async () => {
            if (!(await confirmDialog("Remove " + r.provider + " " + r.id + " and its data?"))) return;
            try { await change("DELETE", "/resources/" + encodeURIComponent(r.id)); route(); }
            catch (e) { resMsg.className = "error"; resMsg.textContent = e.message; }
          }, text: "Remove" }))))));

  show(
    h("h1", {}, "App ", h("span", { class: "mono", id: "app-name", text: name })),
    h("p", {}, h("a", { href: "#/apps/" + enc + "/logs", text: "Logs" }), " · release ", h("span", { class: "mono", text: formation.release || "none" })),
    h("h2", { text: "Now" }), appCharts(name),
    h("h2", { text: "Deploy" }), deployForm,
    h("h2", { text: "Scale" }), scaleForm,
    h("h2", { text: "Jobs" }),
    h("table", { id: "jobs" }, h("thead", {}, h("tr", {}, ["Job", "Type", "Host", "State", "Release"].map((t) => h("th", { text: t })))), jobsBody),
    h("h2", { text: "Env" }), envForm,
    h("h2", { text: "Releases" }), relTable, relMsg,
    h("h2", { text: "Routes" }), routesTable, routeMsg, httpForm, tcpForm,
    h("h2", { text: "Databases" }), resTable, resForm);
}

async function logsPage(name) {
  const enc = encodeURIComponent(name);
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const typeIn = h("input", { id: "log-type", value: params.get("type") || "", size: 10 });
  const jobIn = h("input", { id: "log-job", value: params.get("job") || "", size: 30 });
  const out = h("div", { class: "log", id: "log", role: "log", "aria-live": "polite" });
  const seen = new Set();
  let after = null;
  const query = () => {
    const q = new URLSearchParams();
    if (typeIn.value) q.set("type", typeIn.value);
    if (jobIn.value) q.set("job", jobIn.value);
    if (after) q.set("after", after); else q.set("lines", "200");
    return q.toString();
  };
  const poll = async () => {
    try {
      const lines = await api("/apps/" + enc + "/log?" + query());
      const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      for (const l of lines) {
        const key = l.ts + "-" + l.host + "-" + l.seq;
        if (seen.has(key)) continue;
        seen.add(key);
        out.append(new Date(l.ts).toISOString().slice(11, 23) + " " + l.type + "." + l.job.slice(0, 12) + ": " + l.msg + "\n");
      }
      if (lines.length) after = (lines[lines.length - 1].ts - 1000) + "-0-0";
      if (atEnd) out.scrollTop = out.scrollHeight;
    } catch (_) { /* shown on the next page load */ }
  };
  const filter = h("form", { class: "row", onsubmit: (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      if (typeIn.value) q.set("type", typeIn.value);
      if (jobIn.value) q.set("job", jobIn.value);
      location.hash = "#/apps/" + enc + "/logs" + (q.toString() ? "?" + q : "");
    } },
    h("label", { for: "log-type", text: "Process type" }), typeIn,
    h("label", { for: "log-job", text: "Job" }), jobIn,
    h("button", { type: "submit", text: "Filter" }));
  show(h("h1", {}, "Logs of ", h("a", { href: "#/apps/" + enc, text: name })), filter, out);
  await poll();
  every(1000, poll);
}

// ---- hosts and cluster ----

function componentState(v) {
  if (v && typeof v === "object") {
    if (v.enabled === false) return "off";
    for (const k of ["state", "status", "backend", "mode"]) if (typeof v[k] === "string") return v[k];
  }
  return "on";
}

async function hostsPage() {
  const hosts = await api("/hosts/details");
  show(h("h1", { text: "Hosts" }),
    h("table", { id: "hosts" },
      h("thead", {}, h("tr", {}, ["Host", "Role", "Leader", "Reachable", "Version", "Jobs", "Volumes"].map((t) => h("th", { text: t })))),
      h("tbody", {}, hosts.map((x) => h("tr", {},
        h("td", { class: "mono", text: x.addr }), h("td", { text: x.role }),
        h("td", { text: x.leader ? "yes" : "" }), h("td", { class: x.reachable ? "ok" : "error", text: x.reachable ? "yes" : "no" }),
        h("td", { text: x.version || "" }), h("td", { text: String(x.jobs.length) }), h("td", { text: String(x.volumes.length) }))))),
    ...hosts.map((x, i) => h("section", { "aria-labelledby": "host-" + i },
      h("h2", { id: "host-" + i }, "Host ", h("span", { class: "mono", text: x.addr }), " (" + x.role + ")"),
      h("p", { class: "components" }, "Components: ", x.components === null ? h("span", { class: "error", text: "no answer" }) :
        Object.entries(x.components).map(([name, v], j) => [j ? ", " : "", h("span", { class: "mono", text: name }), " " + componentState(v)])),
      x.jobs.length === 0 ? h("p", { class: "muted", text: "No jobs." }) :
      h("table", { class: "host-jobs" },
        h("thead", {}, h("tr", {}, ["Job", "App", "Type", "State"].map((t) => h("th", { text: t })))),
        h("tbody", {}, x.jobs.map(([id, app, type, state]) => h("tr", {},
          h("td", { class: "mono", text: id }), h("td", {}, h("a", { href: "#/apps/" + encodeURIComponent(app), text: app })),
          h("td", { text: type }), h("td", { class: "state-" + state, text: state }))))),
      x.volumes.length === 0 ? null :
      h("table", { class: "host-volumes" },
        h("thead", {}, h("tr", {}, ["Volume", "App", "Provider", "Size"].map((t) => h("th", { text: t })))),
        h("tbody", {}, x.volumes.map(([id, app, provider, size]) => h("tr", {},
          h("td", { class: "mono", text: id }), h("td", { text: app || "" }), h("td", { text: provider }),
          h("td", { text: size ? (size / 1048576).toFixed(0) + " MiB" : "" }))))))));
}

async function clusterPage() {
  const [s, hosts, page] = await Promise.all([api("/status"), api("/hosts"), api("/status/page")]);
  const leader = hosts.find((x) => x.leader);
  const verdict = page.data || {};
  const detail = Object.entries(verdict.detail || {});
  const failing = detail.filter(([, v]) => v && v.status !== "healthy" && !(v.detail && v.detail.optional));
  const rows = [["Raft term", s.term], ["Commit index (applied here)", s.last_applied_index === null ? "none" : s.last_applied_index], ["Leader", leader ? leader.addr : (s.leader_addr || "none")],
    ["State revision", s.revision], ["This host", s.addr + " (" + s.role + ")"], ["Hosts", hosts.length + " (" + hosts.filter((x) => x.reachable).length + " reachable)"], ["Version", s.version]];
  show(h("h1", { text: "Cluster" }),
    h("p", { id: "verdict", class: verdict.status === "healthy" ? "ok" : "error",
      text: "Status: " + (verdict.status || "unknown") + (failing.length ? " (" + failing.map(([k]) => k).join(", ") + ")" : "") }),
    h("table", { id: "cluster" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row", text: k }), h("td", { text: String(v) }))))),
    h("h2", { text: "Host load" }), hostCharts());
}

// ---- plumbing ----

function confirmDialog(question) {
  return new Promise((resolve) => {
    const d = h("dialog", { id: "confirm", "aria-labelledby": "confirm-q" },
      h("p", { id: "confirm-q", text: question }),
      h("div", { class: "row" },
        h("button", { class: "primary", type: "button", id: "confirm-yes", onclick: () => { d.close(); d.remove(); resolve(true); }, text: "Yes" }),
        h("button", { type: "button", id: "confirm-no", onclick: () => { d.close(); d.remove(); resolve(false); }, text: "Cancel" })));
    d.addEventListener("cancel", () => { d.remove(); resolve(false); });
    document.body.append(d);
    d.showModal();
    d.querySelector("#confirm-yes").focus();
  });
}

// One page render at a time: a hash change during one renders again once it ends, so an
// older render never lands over a newer one. Every caller's promise settles once the page
// it asked for is drawn, so what it writes next lands on that page.
let routing = null, routeAgain = false;

function route() {
  if (routing) { routeAgain = true; return routing; }
  routing = (async () => {
    try {
      do {
        routeAgain = false;
        await renderRoute();
      } while (routeAgain);
    } finally {
      routing = null;
    }
  })();
  return routing;
}

async function renderRoute() {
  stopTimers();
  if (!csrf) {
    try {
      const r = await fetch("/session", { credentials: "same-origin" });
      if (!r.ok) return login();
      csrf = (await r.json()).csrf;
    } catch (_) { return login(); }
  }
  document.getElementById("nav").hidden = false;
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/apps";
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (parts[0] === "apps" && parts.length === 1) await appsPage();
    else if (parts[0] === "apps" && parts[2] === "logs") await logsPage(parts[1]);
    else if (parts[0] === "apps") await appPage(parts[1]);
    else if (parts[0] === "hosts") await hostsPage();
    else if (parts[0] === "cluster") await clusterPage();
    else await appsPage();
    document.getElementById("main").focus({ preventScroll: true });
    // When each page stood rendered from its data: what the load benchmark reads.
    performance.mark("flynn:rendered");
  } catch (e) {
    if (e.status !== 401) show(errorLine(e));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").addEventListener("click", logout);
  route();
});
