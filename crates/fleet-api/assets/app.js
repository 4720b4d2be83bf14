// Fleet dashboard: live updates, actions and charts. No framework and no build step; the
// pages work without this file, only staler and read-only.
"use strict";

(function () {
  const meta = (name) => {
    const m = document.querySelector(`meta[name="${name}"]`);
    return m ? m.content : "";
  };
  const csrf = meta("csrf-token");

  // ---- talking to the API ---------------------------------------------------------------

  async function api(method, url, body) {
    const init = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(url, init);
    let json = null;
    try {
      json = await res.json();
    } catch (_) {
      json = null;
    }
    return { ok: res.ok, status: res.status, json };
  }

  function errorText(r) {
    if (r.json && r.json.error && r.json.error.message) return r.json.error.message;
    return `the server answered ${r.status}`;
  }

  // ---- toasts -------------------------------------------------------------------------

  function toast(text, kind) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const t = document.createElement("div");
    t.className = `toast ${kind || ""}`;
    t.setAttribute("role", "status");
    t.textContent = text;
    box.appendChild(t);
    while (box.children.length > 5) box.removeChild(box.firstChild);
    setTimeout(() => t.remove(), 6000);
  }

  // ---- refreshing the live parts of the page ------------------------------------------------

  let refreshing = false;
  let again = false;
  let timer = null;

  async function refresh() {
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    try {
      const res = await fetch(location.href, { credentials: "same-origin" });
      if (res.redirected && res.url.includes("/dashboard/sign-in")) {
        location.assign(res.url);
        return;
      }
      if (!res.ok) return;
      const doc = new DOMParser().parseFromString(await res.text(), "text/html");
      const checked = new Set(
        [...document.querySelectorAll('input[name="select"]:checked')].map((i) => i.value),
      );
      for (const el of document.querySelectorAll("[data-live][id]")) {
        const fresh = doc.getElementById(el.id);
        if (fresh && fresh.innerHTML !== el.innerHTML) el.innerHTML = fresh.innerHTML;
      }
      for (const i of document.querySelectorAll('input[name="select"]')) {
        i.checked = checked.has(i.value);
      }
      countSelected();
      document.dispatchEvent(new CustomEvent("fleet:refreshed"));
    } catch (_) {
      // The next event or poll tries again.
    } finally {
      refreshing = false;
      if (again) {
        again = false;
        scheduleRefresh();
      }
    }
  }

  // Many events in a burst make one refresh.
  function scheduleRefresh() {
    if (timer) return;
    timer = setTimeout(() => {
      timer = null;
      refresh();
    }, 400);
  }

  // ---- the live stream ------------------------------------------------------------------

  const banner = () => document.getElementById("live-status");
  function showBanner(text) {
    const b = banner();
    if (!b) return;
    b.textContent = text;
    b.hidden = false;
  }
  function hideBanner() {
    const b = banner();
    if (b) b.hidden = true;
  }

  let pollTimer = null;
  function poll() {
    if (!pollTimer) pollTimer = setInterval(refresh, 30000);
  }

  function connect() {
    if (!("EventSource" in window)) {
      poll();
      return;
    }
    const es = new EventSource("/api/v1/fleet/events");
    document.documentElement.dataset.live = "connecting";
    // A page kept in the back/forward cache must not hold its stream: browsers allow six
    // connections per host, and six cached pages would starve every later request.
    window.addEventListener("pagehide", () => es.close(), { once: true });
    es.addEventListener("open", () => {
      // Back after a loss: what changed meanwhile may be past what the stream replays.
      if (document.documentElement.dataset.live === "lost") scheduleRefresh();
      document.documentElement.dataset.live = "open";
      if (pollTimer) {
        clearInterval(pollTimer);
        pollTimer = null;
      }
      hideBanner();
    });
    es.addEventListener("change", (e) => {
      const c = JSON.parse(e.data);
      const kind = c.to_status === "healthy" ? "good" : "bad";
      toast(`${c.server_name}: ${c.from_status || "never checked"} → ${c.to_status}`, kind);
      scheduleRefresh();
    });
    es.addEventListener("incident", (e) => {
      const i = JSON.parse(e.data);
      if (["opened", "resolved", "acknowledged"].includes(i.kind)) toast(`Incident ${i.kind}: ${i.message}`, "info");
      scheduleRefresh();
    });
    es.addEventListener("cycle", () => scheduleRefresh());
    es.addEventListener("resync", () => refresh());
    es.addEventListener("error", () => {
      document.documentElement.dataset.live = "lost";
      if (es.readyState === EventSource.CLOSED) {
        // Refused (the stream is full, or the session ended): poll, and try again later.
        showBanner("Live updates are unavailable; the page refreshes every 30 s.");
        poll();
        setTimeout(connect, 30000);
      } else {
        showBanner("Live updates lost; reconnecting…");
      }
    });
  }

  // ---- actions ------------------------------------------------------------------------

  function countSelected() {
    const out = document.getElementById("selected-count");
    if (!out) return;
    const n = document.querySelectorAll('input[name="select"]:checked').length;
    out.textContent = `${n} selected`;
  }

  async function run(button, method, url, body) {
    button.disabled = true;
    try {
      const r = await api(method, url, body);
      if (r.ok) {
        toast(`${button.textContent.trim()}: done`, "good");
        scheduleRefresh();
      } else {
        toast(`${button.textContent.trim()}: ${errorText(r)}`, "bad");
      }
      return r;
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("click", async (e) => {
    const target = e.target instanceof Element ? e.target : null;
    if (!target) return;
    const b = target.closest("button[data-method][data-url]");
    if (b) {
      if (b.dataset.confirm && !confirm(b.dataset.confirm)) return;
      const body = b.dataset.body ? JSON.parse(b.dataset.body) : undefined;
      await run(b, b.dataset.method, b.dataset.url, body);
      return;
    }
    const w = target.closest("button[data-window-for]");
    if (w) {
      const now = new Date();
      await run(w, "POST", "/api/v1/fleet/maintenance-windows", {
        name: w.dataset.windowName,
        server_id: w.dataset.windowFor,
        starts_at: now.toISOString(),
        ends_at: new Date(now.getTime() + 3600 * 1000).toISOString(),
      });
      return;
    }
    const bulk = target.closest("button[data-bulk]");
    if (bulk) {
      const ids = [...document.querySelectorAll('input[name="select"]:checked')].map((i) => i.value);
      const group = document.querySelector('#bulk select[name="group"]');
      if (!ids.length || !group) {
        toast("Select servers first", "bad");
        return;
      }
      const r = await run(bulk, bulk.dataset.bulk, `/api/v1/fleet/groups/${group.value}/members`, {
        server_ids: ids,
      });
      if (r && r.ok) for (const i of document.querySelectorAll('input[name="select"]')) i.checked = false;
      countSelected();
    }
  });

  document.addEventListener("change", (e) => {
    if (e.target instanceof HTMLInputElement && e.target.name === "select") countSelected();
  });

  // Forms that call the API: fields become JSON (`a.b` nests), empty fields are left out,
  // local date-times become UTC.
  document.addEventListener("submit", async (e) => {
    const form = e.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("api")) return;
    e.preventDefault();
    const body = {};
    for (const el of form.querySelectorAll("input[name], select[name], textarea[name]")) {
      let v = el.value.trim();
      if (v === "") continue;
      if (el.type === "datetime-local") v = new Date(v).toISOString();
      const path = el.name.split(".");
      let o = body;
      for (const k of path.slice(0, -1)) o = o[k] = o[k] || {};
      o[path[path.length - 1]] = v;
    }
    const err = form.querySelector(".error");
    const button = form.querySelector('button[type="submit"]') || form;
    const r = await run(button, form.dataset.method, form.dataset.url, body);
    if (r.ok) {
      if (err) err.hidden = true;
      if (form.dataset.method === "POST") form.reset();
      refresh();
    } else if (err) {
      err.textContent = errorText(r);
      err.hidden = false;
    }
  });

  // ---- relative times ---------------------------------------------------------------------

  function relative(t) {
    const s = Math.round((Date.now() - t) / 1000);
    const a = Math.abs(s);
    const [n, unit] =
      a < 60 ? [a, "s"] : a < 3600 ? [Math.floor(a / 60), "min"] : a < 86400 ? [Math.floor(a / 3600), "h"] : [Math.floor(a / 86400), "d"];
    return s >= 0 ? `${n} ${unit} ago` : `in ${n} ${unit}`;
  }
  setInterval(() => {
    for (const el of document.querySelectorAll("time[datetime]")) {
      const t = Date.parse(el.getAttribute("datetime"));
      if (!Number.isNaN(t)) el.textContent = relative(t);
    }
  }, 30000);

  // ---- charts ---------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const W = 800;
  const H = 160;
  const PAD = 36;

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (parent) parent.appendChild(el);
    return el;
  }

  function frame(figure, label, height) {
    for (const old of figure.querySelectorAll("svg, .legend, .empty")) old.remove();
    const root = svg("svg", { viewBox: `0 0 ${W} ${height || H}`, role: "img", "aria-label": label, class: "chart-svg" });
    svg("title", {}, root).textContent = label;
    figure.appendChild(root);
    return root;
  }

  function empty(figure, text) {
    for (const old of figure.querySelectorAll("svg, .legend, .empty")) old.remove();
    const p = document.createElement("p");
    p.className = "empty muted";
    p.textContent = text;
    figure.appendChild(p);
  }

  function legend(figure, items) {
    const ul = document.createElement("ul");
    ul.className = "legend";
    for (const [cls, text] of items) {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = `swatch ${cls}`;
      sw.setAttribute("aria-hidden", "true");
      li.append(sw, text);
      ul.appendChild(li);
    }
    figure.appendChild(ul);
  }

  function axes(root, from, to, max, unit) {
    svg("line", { x1: PAD, y1: H - 20, x2: W, y2: H - 20, class: "axis" }, root);
    const t = (x, y, s, anchor) => {
      const el = svg("text", { x, y, "text-anchor": anchor || "start", class: "tick" }, root);
      el.textContent = s;
    };
    t(PAD, H - 4, new Date(from).toLocaleString());
    t(W, H - 4, new Date(to).toLocaleString(), "end");
    t(PAD - 4, 12, `${Math.round(max)}${unit}`, "end");
    t(PAD - 4, H - 22, `0${unit}`, "end");
  }

  function line(root, points, cls) {
    if (!points.length) return;
    svg("polyline", { points: points.map((p) => `${p[0].toFixed(1)},${p[1].toFixed(1)}`).join(" "), class: `line ${cls}` }, root);
  }

  function xOf(series, t) {
    const from = Date.parse(series.from);
    const to = Date.parse(series.to);
    return PAD + ((W - PAD) * (t - from)) / (to - from);
  }

  function yOf(v, max) {
    return H - 20 - ((H - 32) * v) / (max || 1);
  }

  async function json(url) {
    const r = await fetch(url, { credentials: "same-origin" });
    if (!r.ok) throw new Error(`${r.status}`);
    return r.json();
  }

  const HEALTH = ["healthy", "degraded", "critical", "unreachable"];

  async function timeline(figure) {
    const series = await json(figure.dataset.series);
    const log = await json(figure.dataset.changes);
    const from = Date.parse(series.from);
    const to = Date.parse(series.to);
    const changes = log.state_changes
      .map((c) => ({ at: Date.parse(c.changed_at), from: c.from_status, to: c.to_status }))
      .reverse();
    // The health at the range's start: the last change before it; else what the first change
    // inside it changed from; a server never checked before that starts its line there.
    let state = null;
    let start = from;
    const before = changes.filter((c) => c.at <= from);
    const first = changes.find((c) => c.at > from && c.at < to);
    if (before.length) state = before[before.length - 1].to;
    else if (first && first.from) state = first.from;
    else if (first) {
      start = first.at;
      state = first.to;
    }
    else if (series.buckets.length) {
      state = series.buckets[series.buckets.length - 1].worst;
      start = Date.parse(series.buckets[0].start);
    }
    const segments = [];
    for (const c of changes) {
      if (c.at <= start || c.at >= to) continue;
      if (state) segments.push([start, c.at, state]);
      start = c.at;
      state = c.to;
    }
    if (state) segments.push([start, to, state]);
    if (!segments.length) return empty(figure, "No checks in this range.");
    const summary = segments.map((s) => `${s[2]} from ${new Date(s[0]).toLocaleString()}`).join("; ");
    const root = frame(figure, `State timeline: ${summary}`, 40);
    for (const [a, b, st] of segments) {
      const x = xOf(series, a);
      svg("rect", { x: x.toFixed(1), y: 4, width: Math.max(1, xOf(series, b) - x).toFixed(1), height: 24, class: st }, root)
        .appendChild(document.createElementNS(SVG, "title")).textContent = `${st} from ${new Date(a).toLocaleString()}`;
    }
    legend(figure, HEALTH.map((h) => [h, h]));
  }

  async function response(figure) {
    const s = await json(figure.dataset.series);
    const b = s.buckets.filter((x) => x.avg_response_ms !== null);
    if (!b.length) return empty(figure, "No answers in this range.");
    const max = Math.max(...b.map((x) => x.max_response_ms || 0), 1);
    const root = frame(figure, `Response time: mean ${Math.round(b.reduce((a, x) => a + x.avg_response_ms, 0) / b.length)} ms, longest ${max} ms`);
    axes(root, s.from, s.to, max, " ms");
    const half = (s.step_seconds * 1000) / 2;
    const x = (v) => xOf(s, Date.parse(v.start) + half);
    line(root, b.map((v) => [x(v), yOf(v.max_response_ms, max)]), "max");
    line(root, b.map((v) => [x(v), yOf(v.avg_response_ms, max)]), "avg");
    legend(figure, [["avg", "mean"], ["max", "longest"]]);
  }

  async function resources(figure) {
    const s = await json(figure.dataset.series);
    if (!s.buckets.length) return empty(figure, "No metrics in this range.");
    const root = frame(figure, "CPU, memory and disk use in percent");
    axes(root, s.from, s.to, 100, "%");
    const half = (s.step_seconds * 1000) / 2;
    for (const key of ["cpu_percent", "memory_percent", "disk_percent"]) {
      const pts = s.buckets.filter((v) => v[key] !== null).map((v) => [xOf(s, Date.parse(v.start) + half), yOf(v[key], 100)]);
      line(root, pts, key);
    }
    legend(figure, [["cpu_percent", "CPU"], ["memory_percent", "memory"], ["disk_percent", "disk"]]);
  }

  async function llm(figure) {
    const s = await json(figure.dataset.series);
    const b = s.buckets.filter((v) => v.llm_requests !== null);
    if (b.length < 2) return empty(figure, "No LLM counters in this range.");
    // Counters: the increase from one interval to the next; a drop is a restart.
    const inc = [];
    let cost = 0;
    for (let i = 1; i < b.length; i++) {
      const d = b[i].llm_requests - b[i - 1].llm_requests;
      inc.push([b[i], d >= 0 ? d : b[i].llm_requests]);
      const c = (b[i].llm_cost_usd || 0) - (b[i - 1].llm_cost_usd || 0);
      cost += c >= 0 ? c : b[i].llm_cost_usd || 0;
    }
    const total = inc.reduce((a, x) => a + x[1], 0);
    const max = Math.max(...inc.map((x) => x[1]), 1);
    const root = frame(figure, `LLM: ${total} requests, $${cost.toFixed(2)} in this range`);
    axes(root, s.from, s.to, max, "");
    const w = Math.max(1, ((W - PAD) * s.step_seconds * 1000) / (Date.parse(s.to) - Date.parse(s.from)) - 1);
    for (const [v, d] of inc) {
      const y = yOf(d, max);
      svg("rect", { x: xOf(s, Date.parse(v.start)).toFixed(1), y: y.toFixed(1), width: w.toFixed(1), height: (H - 20 - y).toFixed(1), class: "llm" }, root);
    }
    legend(figure, [["llm", `${total} requests, $${cost.toFixed(2)}`]]);
  }

  const CHARTS = { timeline, response, resources, llm };

  function drawCharts() {
    for (const figure of document.querySelectorAll("figure.chart[data-chart]")) {
      const draw = CHARTS[figure.dataset.chart];
      if (draw) draw(figure).catch(() => empty(figure, "The chart could not be loaded."));
    }
  }

  // ---- start ----------------------------------------------------------------------------

  function start() {
    countSelected();
    drawCharts();
    if (document.querySelector("figure.chart")) document.addEventListener("fleet:refreshed", drawCharts);
    connect();
  }

  window.addEventListener("pageshow", (e) => {
    if (e.persisted) {
      refresh();
      connect();
    }
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
