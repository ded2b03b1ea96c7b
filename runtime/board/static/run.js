// kubetune board, one run: progress, stage timeline, loss curve, conditions, events, log tail,
// Suspend / Resume / Delete, and a chat with the result once it can be loaded (chatAvailable).
"use strict";
(() => {
  const {el, api, phaseBadge, progressBar, fmtNumber, fmtSeconds, fmtTime, poll} = board;
  const name = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const base = `/api/runs/${encodeURIComponent(name)}`;
  const errorBox = document.getElementById("error");
  const $ = (id) => document.getElementById(id);
  document.title = `${name} · kubetune board`;
  $("run-name").textContent = name;
  let run = null;
  const stops = [];

  function showError(msg) {
    errorBox.hidden = false;
    errorBox.textContent = msg;
  }

  /** A time of today as its clock time, an older one as its date. */
  function shortTime(t) {
    const d = new Date(t);
    if (!t || isNaN(d)) return t ? String(t) : "—";
    return d.toDateString() === new Date().toDateString() ? d.toLocaleTimeString() : d.toLocaleDateString();
  }

  // ------------------------------------------------------------------ the run itself
  function renderRun(r) {
    run = r;
    const status = r.status || {};
    const progress = status.progress || {};
    const phase = r.phase || status.phase || "";
    document.body.dataset.phase = phase;
    $("run-phase").replaceChildren(phaseBadge(phase));
    const percent = typeof progress.percent === "number" ? progress.percent : (phase === "Succeeded" ? 100 : null);
    const steps = progress.totalSteps ? `${progress.step || 0}/${progress.totalSteps} steps` : "";
    const bar = progressBar(percent, [percent === null ? "" : `${Math.round(percent)}%`, steps].filter(Boolean).join(" · "));
    bar.id = "progress-bar";
    bar.dataset.step = String(progress.step ?? "");
    $("progress").replaceChildren(bar);
    const stage = status.stage ? `stage ${status.stage.name} (${(status.stage.index ?? 0) + 1}/${status.stage.count ?? "?"})` : "";
    $("progress-facts").textContent = [stage,
      progress.loss !== undefined && progress.loss !== null ? `loss ${fmtNumber(progress.loss)}` : "",
      progress.etaSeconds !== undefined && progress.etaSeconds !== null ? `ETA ${fmtSeconds(progress.etaSeconds)}` : "",
      progress.tokensPerSecond ? `${fmtNumber(progress.tokensPerSecond, 3)} tokens/s` : "",
    ].filter(Boolean).join(" · ");

    $("timeline").replaceChildren(...(r.stages || []).map((s, i) => el("div", {class: "step", dataset: {stage: s.name, phase: s.phase || "Pending"}},
      el("div", {}, el("span", {class: "name"}, `${i + 1}. ${s.name}`), el("span", {class: "type"}, s.type || "")),
      el("div", {}, phaseBadge(s.phase || "Pending")),
      el("div", {class: "when"}, s.startTime ? `${fmtTime(s.startTime)}${s.completionTime ? " → " + fmtTime(s.completionTime) : ""}` : ""))));

    const suspended = Boolean((r.spec || {}).suspend) || phase === "Suspended";
    const finished = phase === "Succeeded" || phase === "Failed";
    $("suspend").disabled = suspended || finished;
    $("resume").disabled = !suspended;
    const grafana = $("grafana");
    grafana.hidden = !r.grafanaUrl;
    if (r.grafanaUrl) grafana.href = r.grafanaUrl;

    const uri = (x) => (x && (x.uri || x)) || null;
    const locs = [["checkpoint", r.checkpoint ? `${uri(r.checkpoint)}${r.checkpoint.step ? ` (step ${r.checkpoint.step})` : ""}` : null],
      ["output", uri(r.output)]];
    for (const s of r.stages || []) {
      if (uri(s.output)) locs.push([`${s.name} output`, uri(s.output)]);
    }
    $("locations").replaceChildren(...locs.flatMap(([k, v]) => [el("dt", {}, k),
      el("dd", {class: "mono", dataset: {loc: k}}, v || "—")]));

    $("conditions").tBodies[0].replaceChildren(...(r.conditions || []).map((c) => el("tr", {dataset: {condition: c.type, status: c.status}},
      el("td", {}, c.type), el("td", {}, c.status), el("td", {}, c.reason || ""), el("td", {class: "msg"}, c.message || ""))));
    $("events").tBodies[0].replaceChildren(...(r.events || []).map((e) => el("tr", {dataset: {reason: e.reason || "", type: e.type || ""}},
      el("td", {class: e.type === "Warning" ? "warning" : "", title: e.type || ""}, e.reason || ""),
      el("td", {class: "msg"}, e.message || ""),
      el("td", {class: "when", title: fmtTime(e.time)}, `${shortTime(e.time)}${e.count > 1 ? ` ×${e.count}` : ""}`))));
    if ($("yaml").textContent !== (r.yaml || "")) $("yaml").textContent = r.yaml || "";
    $("chat-panel").hidden = !r.chatAvailable;
  }

  async function refreshRun() {
    try {
      renderRun(await api(base));
    } catch (err) {
      if (err.status === 404) {
        showError(`run ${name} not found (deleted?)`);
        stops.forEach((stop) => stop());
        return;
      }
      throw err;
    }
  }

  // ------------------------------------------------------------------ history: the curves
  async function refreshHistory() {
    const h = await api(`${base}/history`);
    // Steps restart at each stage: a later stage's points continue after the earlier stages' last step.
    const offsets = {};
    let offset = 0;
    let lastStage;
    const pts = (h.points || []).filter((p) => typeof p.step === "number").map((p) => {
      if (p.stage !== undefined && p.stage !== lastStage) {
        if (!(p.stage in offsets)) offsets[p.stage] = lastStage === undefined ? 0 : offset;
        lastStage = p.stage;
      }
      const x = p.step + (p.stage !== undefined ? offsets[p.stage] : 0);
      offset = Math.max(offset, x);
      return {...p, x};
    });
    const series = (key) => pts.filter((p) => typeof p[key] === "number").map((p) => [p.x, p[key]]);
    chart.draw($("loss-chart"), [{key: "loss", title: "loss", points: series("loss")},
      {key: "eval_loss", title: "eval loss", points: series("eval_loss")}]);
    chart.draw($("lr-chart"), [{key: "learning_rate", title: "learning rate", points: series("learning_rate")}], {height: 150});
    $("history-source").textContent = h.source ? `(${h.source})` : "";
  }

  // ------------------------------------------------------------------ the log tail
  async function refreshLogs() {
    const l = await api(`${base}/logs?tail=200`);
    const pre = $("log");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    if (pre.textContent !== (l.text || "")) {
      pre.textContent = l.text || "";
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    $("log-pod").textContent = l.pod ? `(${l.pod})` : "";
  }

  // ------------------------------------------------------------------ actions
  async function act(button, method, path, then) {
    button.disabled = true;
    try {
      await api(path, {method});
      errorBox.hidden = true;
      if (then) then();
      else await refreshRun();
    } catch (err) {
      showError(err.message);
      button.disabled = false;
    }
  }
  $("suspend").addEventListener("click", (e) => act(e.target, "POST", `${base}/suspend`));
  $("resume").addEventListener("click", (e) => act(e.target, "POST", `${base}/resume`));
  $("delete").addEventListener("click", (e) => {
    if (!window.confirm(`Delete run ${name}? Its outputs stay where they are; the run and its status go.`)) return;
    act(e.target, "DELETE", base, () => { location.href = "/"; });
  });

  // ------------------------------------------------------------------ chat (SSE over fetch)
  const messages = [];
  const chatLog = $("chat-log");

  /** Read an SSE body with fetch + ReadableStream; call onEvent(obj) for each `data:` JSON. */
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (value) buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (data) onEvent(JSON.parse(data));
      }
      if (done) break;
    }
  }

  $("chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    messages.push({role: "user", content: text});
    chatLog.append(el("div", {class: "chat-msg user"}, text));
    const answer = el("div", {class: "chat-msg assistant", dataset: {state: "streaming", tokens: "0"}});
    chatLog.append(answer);
    chatLog.scrollTop = chatLog.scrollHeight;
    $("chat-send").disabled = true;
    let finished = false;
    try {
      const response = await fetch(`${base}/chat`, {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({messages, maxNewTokens: 64})});
      if (!response.ok) {
        let msg = `HTTP ${response.status}`;
        try { msg = (await response.json()).error || msg; } catch (_) { /* not JSON */ }
        throw new Error(msg);
      }
      await readEvents(response, (ev) => {
        if (ev.token !== undefined) {
          answer.textContent += ev.token;
          answer.dataset.tokens = String(Number(answer.dataset.tokens) + 1);
        }
        if (ev.done) {
          if (typeof ev.text === "string") answer.textContent = ev.text;
          answer.dataset.state = "done";
          finished = true;
        }
        if (ev.error) throw new Error(ev.error);
        chatLog.scrollTop = chatLog.scrollHeight;
      });
      if (!finished) throw new Error("the answer stopped before it was done");
      messages.push({role: "assistant", content: answer.textContent});
    } catch (err) {
      answer.classList.add("error");
      answer.dataset.state = "error";
      answer.textContent = `${answer.textContent ? answer.textContent + "\n" : ""}error: ${err.message}`;
      messages.pop();
    } finally {
      $("chat-send").disabled = false;
      input.focus();
    }
  });

  board.header("run");
  stops.push(poll(refreshRun, 1500, errorBox));
  stops.push(poll(refreshHistory, 2000));
  stops.push(poll(refreshLogs, 3000));
})();
