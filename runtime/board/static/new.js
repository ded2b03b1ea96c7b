// kubetune board, New run: a form generated from the FineTuneJob's JSON schema (/api/schema),
// presets (/api/presets), live validation (/api/validate, debounced) with each error next to its
// field, the plan and memory estimate, the YAML to copy or download, and Start (/api/runs).
//
// The document being edited is `job`; every control carries data-field (its path, written the way
// `kubetune validate` names fields: spec.stages[0].lora.rank). A control shows the schema's default
// in grey until it is changed; only changed values go into the job (and its YAML).
"use strict";
(() => {
  const {el, api} = board;
  const $ = (id) => document.getElementById(id);
  const SKIP = new Set(["apiVersion", "kind", "status"]);
  let root = null; // the schema of the whole document
  let lfNames = {};
  let job = {};
  let presets = [];
  let timer = null;
  let seq = 0;
  let lastOk = false;

  // ------------------------------------------------------------------ paths
  const pathText = (parts) => parts.reduce((s, p) => (typeof p === "number" ? `${s}[${p}]` : s ? `${s}.${p}` : p), "");
  const lfKey = (parts) => pathText(parts[0] === "spec" ? parts.slice(1) : parts).replace(/\[\d+\]/g, "[]");

  function getAt(parts) {
    let node = job;
    for (const p of parts) {
      if (node === null || node === undefined || typeof node !== "object") return undefined;
      node = node[p];
    }
    return node;
  }

  function setAt(parts, value) {
    let node = job;
    parts.slice(0, -1).forEach((p, i) => {
      if (node[p] === null || node[p] === undefined || typeof node[p] !== "object") node[p] = typeof parts[i + 1] === "number" ? [] : {};
      node = node[p];
    });
    const last = parts[parts.length - 1];
    if (value === undefined) {
      if (Array.isArray(node)) node[last] = undefined;
      else delete node[last];
    } else node[last] = value;
  }

  // ------------------------------------------------------------------ schema
  function deref(s) {
    let seen = 0;
    while (s && s.$ref && seen++ < 20) {
      const target = s.$ref.replace(/^#\//, "").split("/").reduce((n, k) => (n ? n[k] : undefined), root);
      const {$ref, ...rest} = s;
      s = {...(target || {}), ...rest};
    }
    if (s && Array.isArray(s.allOf) && s.allOf.length === 1) {
      const {allOf, ...rest} = s;
      s = {...deref(allOf[0]), ...rest};
    }
    return s || {};
  }

  /** {kind, schema, nullable}: object | list | array | map | enum | boolean | integer | number | string | any */
  function describe(raw) {
    let s = deref(raw);
    let nullable = Boolean(s.nullable);
    const alts = s.anyOf || s.oneOf;
    if (alts) {
      const rest = alts.filter((a) => deref(a).type !== "null");
      nullable = nullable || rest.length < alts.length;
      if (rest.length === 1) {
        const {anyOf, oneOf, ...outer} = s;
        s = {...deref(rest[0]), ...Object.fromEntries(Object.entries(outer).filter(([, v]) => v !== undefined))};
      } else return {kind: "any", schema: s, nullable};
    }
    let type = s.type;
    if (Array.isArray(type)) {
      nullable = nullable || type.includes("null");
      type = type.find((t) => t !== "null");
    }
    if (s.enum) return {kind: "enum", schema: s, nullable};
    if (s.const !== undefined) return {kind: "const", schema: s, nullable};
    if (type === "object" || s.properties) {
      if (s.properties && Object.keys(s.properties).length) return {kind: "object", schema: s, nullable};
      return {kind: "map", schema: s, nullable};
    }
    if (type === "array") {
      const items = describe(s.items || {});
      return {kind: items.kind === "object" ? "list" : "array", schema: s, items, nullable};
    }
    if (["boolean", "integer", "number", "string"].includes(type)) return {kind: type, schema: s, nullable};
    return {kind: "any", schema: s, nullable};
  }

  // ------------------------------------------------------------------ values
  function shown(value) {
    if (value === undefined || value === null) return "";
    if (Array.isArray(value)) return value.map((v) => (typeof v === "object" ? JSON.stringify(v) : String(v))).join(", ");
    if (typeof value === "object") return Object.entries(value).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join("\n");
    return String(value);
  }

  function scalar(text, kind) {
    const t = text.trim();
    if (t === "") return undefined;
    if (kind === "integer" || kind === "number") return t !== "" && !isNaN(Number(t)) ? Number(t) : t;
    if (kind === "boolean") return t === "true" ? true : t === "false" ? false : t;
    if (kind === "any") {
      try {
        return JSON.parse(t);
      } catch (_) {
        return t;
      }
    }
    return t;
  }

  function parse(text, d) {
    if (d.kind === "array") {
      if (text.trim() === "") return undefined;
      return text.split(",").map((x) => x.trim()).filter((x) => x !== "").map((x) => scalar(x, d.items.kind));
    }
    if (d.kind === "map") {
      const out = {};
      const valueKind = describe(d.schema.additionalProperties && typeof d.schema.additionalProperties === "object" ? d.schema.additionalProperties : {}).kind;
      for (const line of text.split("\n")) {
        if (!line.trim()) continue;
        const at = line.indexOf(":");
        const key = (at < 0 ? line : line.slice(0, at)).trim();
        const value = at < 0 ? "" : line.slice(at + 1).trim();
        out[key] = valueKind === "string" ? value : scalar(value, valueKind === "any" ? "any" : valueKind) ?? "";
      }
      return Object.keys(out).length ? out : undefined;
    }
    return scalar(text, d.kind);
  }

  // ------------------------------------------------------------------ rendering
  function helpOf(d, name) {
    return d.schema.description && d.schema.description !== name ? d.schema.description : "";
  }

  function lfBadge(parts) {
    const lf = lfNames[lfKey(parts)];
    return lf ? el("div", {class: "lf"}, "LLaMA-Factory: ", el("code", {}, lf)) : null;
  }

  function control(parts, d, name) {
    const path = pathText(parts);
    const value = getAt(parts);
    const fallback = d.schema.default;
    const isDefault = value === undefined;
    const current = isDefault ? fallback : value;
    const common = {name: path, id: `f-${path}`, class: isDefault && fallback !== undefined ? "is-default" : "",
      dataset: {control: path}};
    let input;
    // a boolean that may stay unset (default null: "decided at run time") is a three-way choice
    const choices = d.kind === "enum" ? d.schema.enum : d.kind === "boolean" && d.nullable && fallback == null ? [true, false] : null;
    if (choices) {
      const options = choices.map((v) => el("option", {value: JSON.stringify(v), selected: current === v}, String(v)));
      if (d.nullable || fallback === undefined) options.unshift(el("option", {value: "", selected: current === undefined || current === null}, "(unset)"));
      input = el("select", common, options);
      input.addEventListener("change", () => changed(parts, input.value === "" ? undefined : JSON.parse(input.value), input));
    } else if (d.kind === "boolean") {
      input = el("input", {...common, type: "checkbox", checked: Boolean(current)});
      input.addEventListener("change", () => changed(parts, input.checked, input));
    } else if (d.kind === "map") {
      input = el("textarea", {...common, rows: 2, placeholder: "key: value (one a line)"});
      input.value = shown(current);
      input.addEventListener("input", () => changed(parts, parse(input.value, d), input));
    } else {
      const placeholder = d.kind === "array" ? "comma-separated" : fallback === undefined || fallback === null ? "" : `default ${shown(fallback)}`;
      input = el("input", {...common, type: "text", placeholder, inputmode: d.kind === "integer" || d.kind === "number" ? "decimal" : null});
      input.value = shown(current);
      input.addEventListener("input", () => changed(parts, parse(input.value, d), input));
    }
    return input;
  }

  function fieldRow(parts, d, name, required) {
    const path = pathText(parts);
    const input = control(parts, d, name);
    return el("div", {class: "field", dataset: {field: path, kind: d.kind}},
      el("label", {for: input.id, class: required ? "required" : ""}, name),
      input,
      helpOf(d, name) ? el("div", {class: "help"}, helpOf(d, name)) : null,
      lfBadge(parts),
      el("div", {class: "field-error", hidden: true}));
  }

  function hasValue(parts) {
    const v = getAt(parts);
    return v !== undefined && v !== null && !(typeof v === "object" && Object.keys(v).length === 0);
  }

  function section(parts, title, d, open, extra) {
    const path = pathText(parts);
    const body = el("div", {class: "body"},
      helpOf(d, title) ? el("div", {class: "help muted status-line"}, helpOf(d, title)) : null,
      lfBadge(parts),
      el("div", {class: "section-error", hidden: true}));
    const details = el("details", {class: "section", dataset: {field: path, kind: d.kind}, open},
      el("summary", {}, title, extra || null), body);
    return {details, body};
  }

  function objectBody(parts, d, body) {
    const required = new Set(d.schema.required || []);
    for (const [key, sub] of Object.entries(d.schema.properties || {})) {
      if (parts.length === 0 && SKIP.has(key)) continue;
      if (parts.length === 0 && key === "spec") { // the spec's parts are the form's top-level sections
        objectBody(["spec"], describe(sub), body);
        continue;
      }
      body.append(node([...parts, key], key, sub, required.has(key)));
    }
  }

  function node(parts, name, raw, required) {
    const d = describe(raw);
    if (d.kind === "const") return null;
    if (d.kind === "object") {
      const {details, body} = section(parts, name, d, required || hasValue(parts));
      objectBody(parts, d, body);
      return details;
    }
    if (d.kind === "list") {
      const {details, body} = section(parts, name, d, required || hasValue(parts));
      const items = getAt(parts) || [];
      items.forEach((item, i) => {
        if (item === undefined) return;
        const label = item && (item.name || item.key) ? `${name}[${i}]: ${item.name || item.key}${item.type ? ` (${item.type})` : ""}` : `${name}[${i}]`;
        const remove = el("button", {type: "button", class: "danger", dataset: {remove: pathText([...parts, i])},
          style: "margin-left: 10px; padding: 1px 8px; font-size: 12px",
          onclick: (e) => { e.preventDefault(); removeItem(parts, i); }}, "remove");
        const item_ = section([...parts, i], label, d.items, true, remove);
        item_.details.classList.add("list-item");
        objectBody([...parts, i], d.items, item_.body);
        body.append(item_.details);
      });
      body.append(el("div", {class: "list-tools"}, el("button", {type: "button", dataset: {add: pathText(parts)},
        onclick: (e) => { e.preventDefault(); addItem(parts, d.items); }}, `+ add ${name.replace(/s$/, "")}`)));
      return details;
    }
    return fieldRow(parts, d, name, required);
  }

  function render() {
    const form = $("form-root");
    const openNow = new Set([...form.querySelectorAll("details[open]")].map((x) => x.dataset.field));
    const closedNow = new Set([...form.querySelectorAll("details:not([open])")].map((x) => x.dataset.field));
    const rootDesc = {kind: "object", schema: root};
    const body = el("div", {});
    objectBody([], rootDesc, body);
    for (const det of body.querySelectorAll("details")) { // keep what the user opened or closed
      if (openNow.has(det.dataset.field)) det.open = true;
      if (closedNow.has(det.dataset.field)) det.open = false;
    }
    form.replaceChildren(...body.childNodes);
  }

  // ------------------------------------------------------------------ editing
  function changed(parts, value, input) {
    setAt(parts, value);
    if (input) input.classList.remove("is-default");
    scheduleValidate();
  }

  function newItem(d, index, parts) {
    const item = {};
    const props = d.schema.properties || {};
    for (const key of d.schema.required || []) {
      const sub = describe(props[key] || {});
      if (sub.kind === "enum") item[key] = sub.schema.default ?? sub.schema.enum[0];
      else if (key === "name") item[key] = `${parts[parts.length - 1].replace(/s$/, "")}${index + 1}`;
    }
    return item;
  }

  function addItem(parts, d) {
    const list = (getAt(parts) || []).filter((x) => x !== undefined);
    list.push(newItem(d, list.length, parts));
    setAt(parts, list);
    render();
    scheduleValidate(0);
  }

  function removeItem(parts, i) {
    const list = (getAt(parts) || []).filter((_, j) => j !== i && _ !== undefined);
    setAt(parts, list.length ? list : undefined);
    render();
    scheduleValidate(0);
  }

  function choosePreset(p) {
    job = JSON.parse(JSON.stringify(p.job));
    for (const b of document.querySelectorAll("[data-preset]")) b.classList.toggle("chosen", b.dataset.preset === p.id);
    $("form-root").replaceChildren();
    render();
    scheduleValidate(0);
  }

  // ------------------------------------------------------------------ validation
  function scheduleValidate(ms = 400) {
    clearTimeout(timer);
    $("start").disabled = true;
    timer = setTimeout(validate, ms);
  }

  /** The job to send: no removed list items, no objects left empty by clearing their fields
   * (an object inside a list stays: it is an item). The form's own state keeps them, so a field
   * typed over keeps its place in the YAML. */
  function cleanJob() {
    const clean = (v, inList) => {
      if (Array.isArray(v)) return v.filter((x) => x !== undefined).map((x) => clean(x, true));
      if (v && typeof v === "object") {
        const out = {};
        for (const [k, x] of Object.entries(v)) {
          const c = clean(x, false);
          if (c !== undefined) out[k] = c;
        }
        return Object.keys(out).length || inList ? out : undefined;
      }
      return v;
    };
    return clean(job, true);
  }

  async function validate() {
    const mine = ++seq;
    $("validation-status").textContent = "checking…";
    $("validation-status").className = "status-line muted";
    let r;
    try {
      r = await api("/api/validate", {method: "POST", body: {job: cleanJob()}});
    } catch (err) {
      if (mine !== seq) return;
      $("validation-status").textContent = `could not validate: ${err.message}`;
      $("validation-status").className = "status-line bad";
      return;
    }
    if (mine !== seq) return; // an older answer: a newer request is on its way
    showErrors(r.errors || []);
    lastOk = Boolean(r.ok);
    $("start").disabled = !lastOk;
    const st = $("validation-status");
    st.textContent = r.ok ? "valid ✓ (the same checks as kubetune validate and the cluster's CRD)" : `${r.errors.length} problem${r.errors.length === 1 ? "" : "s"}`;
    st.className = `status-line ${r.ok ? "ok" : "bad"}`;
    st.dataset.ok = String(Boolean(r.ok));
    st.dataset.seq = String(mine);
    $("yaml").textContent = r.yaml || "";
    showPlan(r.plan);
    showEstimate(r.estimate);
  }

  function clearErrors() {
    for (const e of document.querySelectorAll(".field-error, .section-error")) { e.hidden = true; e.textContent = ""; }
    for (const f of document.querySelectorAll(".invalid")) f.classList.remove("invalid");
  }

  /** The element an error belongs to: its field, else the nearest section above it. */
  function placeOf(field) {
    let path = field || "";
    while (path) {
      const found = document.querySelector(`#form-root [data-field="${CSS.escape(path)}"]`);
      if (found) return found;
      const cut = Math.max(path.lastIndexOf("."), path.lastIndexOf("["));
      path = cut > 0 ? path.slice(0, cut) : "";
    }
    return null;
  }

  function showErrors(errors) {
    clearErrors();
    $("error-list").replaceChildren(...errors.map((e) => el("li", {dataset: {field: e.field || ""}}, e.field ? `${e.field}: ${e.message}` : e.message)));
    for (const e of errors) {
      const place = placeOf(e.field);
      if (!place) continue;
      const box = place.classList.contains("field") ? place.querySelector(":scope > .field-error") : place.querySelector(":scope > .body > .section-error");
      const text = place.dataset.field === e.field ? e.message : `${e.field}: ${e.message}`;
      box.textContent = box.textContent ? `${box.textContent}\n${text}` : text;
      box.hidden = false;
      box.dataset.field = e.field || "";
      place.classList.add("invalid");
      for (let p = place.parentElement; p; p = p.parentElement) if (p.tagName === "DETAILS") p.open = true;
    }
  }

  function showPlan(plan) {
    const box = $("plan");
    if (!Array.isArray(plan) || !plan.length) { box.textContent = ""; return; }
    box.replaceChildren("Stages: ", ...plan.flatMap((s, i) => [i ? " → " : "",
      el("span", {class: "mono", dataset: {planStage: s.name || ""}, title: s.writes ? `writes ${s.writes}` : ""},
        `${s.name}${s.type && s.type !== s.name ? ` (${s.type})` : ""}`)]));
  }

  function showEstimate(est) {
    const box = $("estimate");
    if (!est) { box.replaceChildren(el("span", {class: "muted"}, "once the job is valid")); return; }
    if (est.unavailable) { box.replaceChildren(el("span", {class: "muted", id: "estimate-unavailable"}, `no estimate: ${est.unavailable}`)); return; }
    const rows = (est.stages || []).map((s) => el("tr", {dataset: {stage: s.stage || "", bytes: s.bytes ?? ""}},
      el("td", {}, s.stage || ""), el("td", {class: "mono", dataset: {col: "perDevice"}}, String(s.perDevice ?? "—")),
      el("td", {class: "muted"}, s.breakdown && typeof s.breakdown === "object"
        ? Object.entries(s.breakdown).map(([k, v]) => `${k} ${v}`).join(" · ") : String(s.breakdown ?? ""))));
    const m = est.model || {};
    const params = typeof m.params === "number"
      ? `model: ${m.params >= 1e9 ? `${(m.params / 1e9).toFixed(1)}B` : m.params >= 1e6 ? `${(m.params / 1e6).toFixed(1)}M` : m.params.toLocaleString()} parameters${m.source ? ` (from ${m.source})` : ""}`
      : "";
    box.replaceChildren(params ? el("div", {class: "muted status-line"}, params) : "", el("table", {id: "estimate-table"},
      el("thead", {}, el("tr", {}, el("th", {}, "stage"), el("th", {}, "GPU memory per device"), el("th", {}, "of which"))),
      el("tbody", {}, rows)));
  }

  // ------------------------------------------------------------------ YAML and start
  $("copy-yaml").addEventListener("click", async () => {
    const text = $("yaml").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents($("yaml"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      document.execCommand("copy");
    }
    $("copied").textContent = "copied";
    setTimeout(() => { $("copied").textContent = ""; }, 1500);
  });

  $("download-yaml").addEventListener("click", () => {
    const name = ((job.metadata || {}).name || "finetunejob").replace(/[^a-z0-9-]/g, "-");
    const a = el("a", {href: URL.createObjectURL(new Blob([$("yaml").textContent], {type: "application/yaml"})), download: `${name}.yaml`});
    document.body.append(a);
    a.click();
    a.remove();
  });

  $("start").addEventListener("click", async () => {
    $("start").disabled = true;
    const r = await api("/api/runs", {method: "POST", body: {job: cleanJob()}, allowError: true}).catch((err) => ({status: 0, data: {error: err.message}}));
    if (r.status === 201 && r.data && r.data.name) {
      location.href = `/runs/${encodeURIComponent(r.data.name)}`;
      return;
    }
    const data = r.data || {};
    if (Array.isArray(data.errors) && data.errors.length) showErrors(data.errors);
    $("error").hidden = false;
    $("error").textContent = `could not start: ${data.error || `HTTP ${r.status}`}`;
    $("start").disabled = !lastOk;
  });

  // ------------------------------------------------------------------ start up
  async function init() {
    board.header("new");
    const [schema, pre] = await Promise.all([api("/api/schema"), api("/api/presets").catch(() => ({presets: []}))]);
    const s = schema.schema || {};
    lfNames = schema.llamafactoryNames || {};
    if (s.properties && s.properties.spec) root = s;
    else { // the spec's schema alone: put metadata.name beside it
      root = {...s, type: "object", required: ["metadata", "spec"], properties: {
        metadata: {type: "object", description: "The run's metadata.", required: ["name"],
          properties: {name: {type: "string", description: "Job name (a DNS label)."}}},
        spec: {...s, $defs: undefined, definitions: undefined}}};
    }
    presets = pre.presets || [];
    $("presets").replaceChildren(...presets.map((p) => el("button", {type: "button", class: "preset", dataset: {preset: p.id},
      onclick: () => choosePreset(p)}, el("span", {class: "title"}, p.title), el("span", {class: "desc"}, p.description || ""))));
    if (presets.length) choosePreset(presets[0]);
    else {
      job = {apiVersion: "kubetune.io/v1alpha1", kind: "FineTuneJob", metadata: {name: "my-run"}, spec: {}};
      render();
      scheduleValidate(0);
    }
    document.body.dataset.ready = "true";
  }

  init().catch((err) => {
    $("error").hidden = false;
    $("error").textContent = `could not load the form: ${err.message}`;
  });
})();
