// kubetune board: helpers every page shares (no framework, no build step, nothing from a CDN).
"use strict";

const board = (() => {
  /** Create an element: el("td", {class: "x", dataset: {col: "phase"}}, "text", child, ...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** JSON from the board's API; a JSON error answer ({"error", "field"}) becomes a thrown Error. */
  async function api(path, options = {}) {
    const init = {method: options.method || "GET", headers: {}};
    if (options.body !== undefined) {
      init.body = JSON.stringify(options.body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    if (!response.ok && !options.allowError) {
      const err = new Error((data && data.error) || `${init.method} ${path}: HTTP ${response.status}`);
      err.status = response.status;
      err.data = data;
      throw err;
    }
    if (options.allowError) return {status: response.status, data};
    return data;
  }

  const PHASES = ["Pending", "Running", "Succeeded", "Failed", "Suspended"];

  function phaseBadge(phase) {
    const known = PHASES.includes(phase) ? phase.toLowerCase() : "unknown";
    return el("span", {class: `phase phase-${known}`, dataset: {phase: phase || ""}}, phase || "—");
  }

  /** A progress bar: the element carries data-percent for tests and a text for people. */
  function progressBar(percent, label) {
    const p = typeof percent === "number" && isFinite(percent) ? Math.max(0, Math.min(100, percent)) : null;
    const bar = el("div", {class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      dataset: {percent: p === null ? "" : String(p)}});
    if (p !== null) bar.setAttribute("aria-valuenow", String(p));
    bar.append(el("div", {class: "progress-fill", style: `width: ${p === null ? 0 : p}%`}),
      el("span", {class: "progress-text"}, label || (p === null ? "—" : `${Math.round(p)}%`)));
    return bar;
  }

  function fmtNumber(x, digits = 4) {
    if (x === null || x === undefined || x === "") return "—";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    if (Math.abs(x) >= 1000 || Math.abs(x) < 1e-3) return x.toExponential(2);
    return String(Number(x.toPrecision(digits)));
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined || s === "") return "—";
    if (typeof s !== "number") return String(s);
    s = Math.round(s);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  function fmtTime(t) {
    if (!t) return "—";
    const d = new Date(t);
    return isNaN(d) ? String(t) : d.toLocaleString();
  }

  /** The header every page shows: title, navigation, and where the board looks (/api/info). */
  async function header(active) {
    const nav = document.getElementById("topbar");
    if (!nav) return null;
    nav.replaceChildren(
      el("a", {class: "brand", href: "/"}, "kubetune board"),
      el("a", {href: "/", class: active === "runs" ? "active" : "", id: "nav-runs"}, "Runs"),
      el("a", {href: "/new", class: active === "new" ? "active" : "", id: "nav-new"}, "New run"),
      el("span", {class: "where", id: "where"}, ""));
    try {
      const info = await api("/api/info");
      const where = info.mode === "cluster"
        ? `cluster · ${info.context || "current context"} · namespace ${info.namespace || "default"}`
        : `local · ${info.saves || "saves"}`;
      const span = document.getElementById("where");
      span.textContent = where;
      span.dataset.mode = info.mode;
      if (info.version) span.title = `kubetune ${info.version}`;
      return info;
    } catch (err) {
      document.getElementById("where").textContent = `board unreachable: ${err.message}`;
      return null;
    }
  }

  /** Call `fn` now and every `ms` (short polling); a failing call shows in `errorBox` and retries. */
  function poll(fn, ms, errorBox) {
    let stopped = false;
    let timer = null;
    async function tick() {
      try {
        await fn();
        if (errorBox) errorBox.hidden = true;
      } catch (err) {
        if (errorBox) {
          errorBox.hidden = false;
          errorBox.textContent = err.message;
        }
      }
      if (!stopped) timer = setTimeout(tick, ms);
    }
    tick();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }

  return {el, api, phaseBadge, progressBar, fmtNumber, fmtSeconds, fmtTime, header, poll};
})();
