// kubetune board, the Runs page: the runs of the namespace (or the local saves folder), refreshed
// by short polling of /api/runs; rows are updated in place (no page reload).
"use strict";
(() => {
  const {el, api, phaseBadge, progressBar, fmtNumber, poll} = board;
  const body = document.querySelector("#runs tbody");
  const empty = document.getElementById("no-runs");
  const refreshed = document.getElementById("refreshed");
  let polls = 0;

  function progressLabel(r) {
    if (r.percent === null || r.percent === undefined) return r.step ? `step ${r.step}` : "—";
    const steps = r.totalSteps ? ` · ${r.step || 0}/${r.totalSteps}` : "";
    return `${Math.round(r.percent)}%${steps}`;
  }

  function row(r) {
    return el("tr", {dataset: {run: r.name, phase: r.phase || ""}},
      el("td", {dataset: {col: "name"}}, el("a", {href: `/runs/${encodeURIComponent(r.name)}`}, r.name)),
      el("td", {dataset: {col: "phase"}}, phaseBadge(r.phase)),
      el("td", {dataset: {col: "stage"}}, r.stage || "—"),
      el("td", {dataset: {col: "progress", step: r.step ?? ""}}, progressBar(r.percent, progressLabel(r))),
      el("td", {dataset: {col: "loss"}, class: "mono"}, fmtNumber(r.loss)),
      el("td", {dataset: {col: "eta"}}, r.eta || "—"),
      el("td", {dataset: {col: "age"}, title: r.created || ""}, r.age || "—"));
  }

  async function refresh() {
    const data = await api("/api/runs");
    const items = data.items || [];
    const rows = new Map([...body.children].map((tr) => [tr.dataset.run, tr]));
    const seen = new Set();
    items.forEach((r, i) => {
      seen.add(r.name);
      const fresh = row(r);
      const old = rows.get(r.name);
      if (old) old.replaceWith(fresh);
      if (body.children[i] !== fresh) body.insertBefore(fresh, body.children[i] || null);
    });
    for (const [name, tr] of rows) if (!seen.has(name)) tr.remove();
    empty.hidden = items.length > 0;
    polls += 1;
    body.closest("table").dataset.polls = String(polls);
    refreshed.textContent = `${items.length} run${items.length === 1 ? "" : "s"} · refreshed ${new Date().toLocaleTimeString()}`;
  }

  board.header("runs");
  poll(refresh, 2000, document.getElementById("error"));
})();
