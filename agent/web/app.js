/* anomaly-agent web interface (vanilla JS, no build step, nothing fetched but this server's /api).
 *
 * Untrusted text (log lines, documents, model output) is only ever put into the page with
 * textContent / createTextNode, never as HTML.
 *
 * Evidence views are pluggable: registerModalityView(modality, fn) renders what a candidate's
 * whole modality shows (the log session's lines), registerEvidenceView(kind, fn) renders one
 * evidence item by its kind (log_lines, segment, region, frames, feature). Adding the image or
 * video view when those detectors exist is one registerEvidenceView call.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "anomaly-agent-token";
  const SEV_NAMES = ["none", "low", "medium", "high", "critical"];
  const state = { runId: null, queue: [], cand: null, detail: null, sessionId: null, lineEls: new Map() };
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }
  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function toast(text) {
    const t = $("toast");
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
  }
  function sevBadge(sev) { return el("span", { class: `badge sev-${sev}` }, `${sev} ${SEV_NAMES[sev] || ""}`); }
  function fmt(x) { return typeof x === "number" ? Number(x.toPrecision(4)).toString() : String(x); }

  // ------------------------------------------------------------------ API
  function token() { return sessionStorage.getItem(TOKEN_KEY); }
  function askToken(message) {
    $("token-error").textContent = message || "";
    $("token-dialog").hidden = false;
    $("token-input").focus();
  }
  class ApiError extends Error {
    constructor(status, body) { super((body && body.error) || `HTTP ${status}`); this.status = status; this.body = body; }
  }
  async function api(path, opts = {}) {
    const headers = Object.assign({ Authorization: `Bearer ${token() || ""}` }, opts.headers || {});
    let body = opts.body;
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
    const res = await fetch(`/api${path}`, { method: opts.method || "GET", headers, body });
    if (opts.raw) {
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      return res;
    }
    const data = await res.json().catch(() => null);
    if (res.status === 401) { askToken((data && data.error) || "the token was refused"); throw new ApiError(401, data); }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }
  function enc(id) { return encodeURIComponent(id); }
  function candPath(id) { return `/runs/${enc(state.runId)}/candidates/${enc(id)}`; }

  // ------------------------------------------------------------------ citations
  // [id] in text becomes a button that opens what it cites: a log line / evidence item, a
  // passage (P-...), a rule or another candidate.
  const CITE = /\[([^\[\]\s]{1,300})\]/g;
  function citedText(text) {
    const frag = document.createDocumentFragment();
    let last = 0;
    for (const m of text.matchAll(CITE)) {
      if (m.index > last) frag.appendChild(document.createTextNode(text.slice(last, m.index)));
      frag.appendChild(citeButton(m[1]));
      last = m.index + m[0].length;
    }
    if (last < text.length) frag.appendChild(document.createTextNode(text.slice(last)));
    return frag;
  }
  function citeButton(id) {
    return el("button", { type: "button", class: "cite", dataset: { cite: id }, title: `open ${id}`,
      onclick: () => openCitation(id) }, id);
  }
  async function openCitation(id) {
    const panel = $("citation-panel");
    try {
      if (state.detail && state.detail.candidate.evidence.some((e) => e.id === id)) {
        flashEvidence(id);
        return;
      }
      if (/^P-[0-9a-f]{6,}$/.test(id)) {
        const p = await api(`/knowledge/passages/${enc(id)}`);
        showPanel(`Passage ${p.id}`, `${p.source}${p.heading ? " > " + p.heading : ""} (${p.collection})`, p.text);
        return;
      }
      if (/^R-\d{3,}$/.test(id)) {
        const r = await api(`/rules/${enc(id)}`);
        showPanel(`Rule ${r.id} v${r.version}`, `${r.effect || "guidance"}${r.compiled ? ", compiled" : ", text only"}`, r.text);
        showTab("rules");
        const li = document.querySelector(`#rules li[data-rule="${CSS.escape(id)}"]`);
        if (li) { li.classList.add("flash"); li.scrollIntoView({ block: "nearest" }); setTimeout(() => li.classList.remove("flash"), 2500); }
        return;
      }
      if (state.queue.some((c) => c.id === id)) { await openCandidate(id); return; }
      if (/^R-[0-9a-f]{16}$/.test(id)) { $("run-select").value = id; await selectRun(id); return; }
      showPanel(`Unknown id ${id}`, "", "Nothing in this run or the knowledge store has that id.");
    } catch (err) {
      panel.hidden = true;
      toast(`Cannot open ${id}: ${err.message}`);
    }
  }
  function showPanel(title, meta, text) {
    const panel = clear($("citation-panel"));
    panel.hidden = false;
    panel.append(el("h3", {}, title), meta ? el("p", { class: "muted small" }, meta) : null, el("p", {}, text),
      el("button", { type: "button", class: "link", onclick: () => { panel.hidden = true; } }, "close"));
  }
  function flashEvidence(evId) {
    const item = document.querySelector(`.evidence-item[data-evidence="${CSS.escape(evId)}"]`);
    if (item) { item.classList.add("flash"); setTimeout(() => item.classList.remove("flash"), 2500); }
    const ev = state.detail.candidate.evidence.find((e) => e.id === evId);
    const lines = (ev && Array.isArray(ev.data.lines)) ? ev.data.lines : [];
    let first = null;
    for (const ln of lines) {
      const node = state.lineEls.get(ln);
      if (!node) continue;
      node.classList.add("flash");
      setTimeout(() => node.classList.remove("flash"), 2500);
      if (!first) first = node;
    }
    (first || item) && (first || item).scrollIntoView({ block: "center" });
  }

  // ------------------------------------------------------------------ evidence view registry
  const evidenceViews = new Map();
  const modalityViews = new Map();
  /** Register how one evidence kind is drawn: fn(evidence, candidate) -> Node. */
  function registerEvidenceView(kind, fn) { evidenceViews.set(kind, fn); }
  /** Register what a modality shows above its evidence items: async fn(candidate) -> Node. */
  function registerModalityView(modality, fn) { modalityViews.set(modality, fn); }

  function renderEvidenceItem(ev, cand) {
    const view = evidenceViews.get(ev.kind) || genericView;
    const box = el("div", { class: "evidence-item", dataset: { evidence: ev.id, kind: ev.kind } },
      el("div", {}, citeButton(ev.id), " ", el("span", { class: "tag" }, ev.kind),
        ev.data && ev.data.reason ? el("span", { class: "tag" }, String(ev.data.reason)) : null, " ", ev.summary));
    try { box.appendChild(view(ev, cand)); } catch (err) { box.appendChild(el("p", { class: "error" }, `cannot draw: ${err.message}`)); }
    return box;
  }
  function genericView(ev) {
    return el("pre", {}, JSON.stringify(ev.data, null, 1).slice(0, 2000));
  }

  // logs: the session's lines, flagged lines highlighted (one request per candidate)
  registerModalityView("logs", async (cand) => {
    const view = await api(`${candPath(cand.id)}/lines`);
    const wrap = el("div", {});
    state.lineEls = new Map();
    if (!view.available) { wrap.appendChild(el("p", { class: "muted" }, `Lines not available: ${view.note}`)); return wrap; }
    wrap.appendChild(el("p", { class: "muted small" },
      `Session ${cand.locator.sequence || ""}: ${view.lines.length} line(s) of ${view.source} between lines ` +
      `${view.first_line} and ${view.last_line}; flagged lines highlighted. ${view.note || ""}`));
    const pre = el("div", { class: "log-view", id: "log-view" });
    for (const line of view.lines) {
      const row = el("div", { class: `log-line${line.flagged ? " flagged" : ""}`, id: `line-${line.line_no}`,
        dataset: { line: line.line_no, evidence: line.evidence_ids.join(" ") } },
        el("span", { class: "no" }, line.line_no), el("span", {}, line.text));
      state.lineEls.set(line.line_no, row);
      pre.appendChild(row);
    }
    wrap.appendChild(pre);
    // bring the first flagged line into view inside the log box (not the page)
    requestAnimationFrame(() => {
      const first = pre.querySelector(".log-line.flagged");
      if (first) pre.scrollTop = Math.max(0, first.offsetTop - pre.offsetTop - 40);
    });
    return wrap;
  });

  registerEvidenceView("log_lines", (ev) => {
    const d = ev.data || {};
    const lines = Array.isArray(d.lines) ? d.lines : [];
    const texts = Array.isArray(d.text) ? d.text : [];
    const box = el("div", { class: "small" });
    if (Array.isArray(d.templates) && d.templates.length) {
      box.appendChild(el("div", { class: "muted" }, "templates: ", [...new Set(d.templates.map(String))].slice(0, 4).join(" | ")));
    }
    lines.slice(0, 8).forEach((ln, i) => {
      box.appendChild(el("div", {}, el("button", { type: "button", class: "link", onclick: () => flashEvidence(ev.id) },
        `line ${ln}`), ": ", texts[i] !== undefined ? String(texts[i]) : ""));
    });
    if (d.expected !== undefined || d.observed !== undefined) {
      box.appendChild(el("div", { class: "muted" }, `observed ${fmt(d.observed)} vs expected ${fmt(d.expected)}`));
    }
    return box;
  });

  // time series: inline SVG; with raw values (data.values {name: [..]}, data.x0) a line plot,
  // else the segment on its index axis plus each top variable's observed/expected vs normal range
  registerEvidenceView("segment", (ev) => {
    const d = ev.data || {};
    const W = 440, H = 150, pad = 30;
    const root = svg("svg", { width: W, height: H + 24 * ((d.variables || []).length), viewBox: `0 0 ${W} ${H + 24 * ((d.variables || []).length)}`, role: "img", class: "ts-plot" });
    root.appendChild(svg("title", {}, `segment ${d.t0} .. ${d.t1}`));
    const i0 = Number(d.i0 ?? 0), i1 = Number(d.i1 ?? i0);
    const span = Math.max(10, i1 - i0 + 1);
    let lo = i0 - span, hi = i1 + span;
    const values = d.values && typeof d.values === "object" ? d.values : null;
    const x0 = Number(d.x0 ?? lo);
    if (values) {
      const series = Object.entries(values).filter(([, v]) => Array.isArray(v));
      const n = Math.max(...series.map(([, v]) => v.length), 1);
      lo = x0; hi = x0 + n - 1;
      const all = series.flatMap(([, v]) => v.filter(Number.isFinite));
      const ymin = Math.min(...all), ymax = Math.max(...all);
      const sx = (i) => pad + (W - 2 * pad) * (i - lo) / Math.max(1, hi - lo);
      const sy = (y) => H - pad - (H - 2 * pad) * (y - ymin) / Math.max(1e-9, ymax - ymin);
      root.appendChild(svg("rect", { x: sx(i0), y: pad / 2, width: Math.max(2, sx(i1) - sx(i0)), height: H - pad, fill: "#f6c7a0", opacity: 0.6, class: "flagged-segment" }));
      const colours = ["#2f5f98", "#c2261f", "#4c9f70", "#d9a400"];
      series.slice(0, 4).forEach(([name, v], k) => {
        const pts = v.map((y, i) => Number.isFinite(y) ? `${sx(x0 + i).toFixed(1)},${sy(y).toFixed(1)}` : null).filter(Boolean).join(" ");
        root.appendChild(svg("polyline", { points: pts, fill: "none", stroke: colours[k], "stroke-width": 1.2 }));
        root.appendChild(svg("text", { x: W - pad - 80, y: 14 + 12 * k, fill: colours[k] }, name));
      });
    } else {
      const sx = (i) => pad + (W - 2 * pad) * (i - lo) / Math.max(1, hi - lo);
      root.appendChild(svg("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, stroke: "#8a94a3" }));
      root.appendChild(svg("rect", { x: sx(i0), y: pad / 2, width: Math.max(3, sx(i1) - sx(i0)), height: H - 1.5 * pad, fill: "#f6c7a0", opacity: 0.7, class: "flagged-segment" }));
      root.appendChild(svg("text", { x: sx(i0), y: H - pad + 14 }, `${d.t0 ?? i0}`));
      root.appendChild(svg("text", { x: Math.max(sx(i0) + 40, sx(i1)), y: H - pad + 14 }, `${d.t1 ?? i1}`));
      root.appendChild(svg("text", { x: pad, y: 12 }, `flagged segment, ${d.length ?? span} points; peak score ${fmt(d.peak_score ?? "?")} (threshold ${fmt(d.threshold ?? "?")})`));
    }
    (d.variables || []).slice(0, 5).forEach((v, k) => {
      const y = H + 24 * k + 6;
      const [nlo, nhi] = Array.isArray(v.normal_range) ? v.normal_range.map(Number) : [0, 1];
      const vals = [nlo, nhi, Number(v.observed_at_peak), Number(v.expected_at_peak)].filter(Number.isFinite);
      const vmin = Math.min(...vals), vmax = Math.max(...vals);
      const bx = (x) => 150 + 250 * (x - vmin) / Math.max(1e-9, vmax - vmin);
      root.appendChild(svg("text", { x: 4, y: y + 10 }, `${v.name} (${Math.round(100 * (v.share || 0))}%)`));
      root.appendChild(svg("rect", { x: bx(nlo), y: y + 2, width: Math.max(2, bx(nhi) - bx(nlo)), height: 10, fill: "#cfe3d6" }));
      if (Number.isFinite(Number(v.expected_at_peak))) root.appendChild(svg("circle", { cx: bx(Number(v.expected_at_peak)), cy: y + 7, r: 4, fill: "#2f5f98" }));
      if (Number.isFinite(Number(v.observed_at_peak))) root.appendChild(svg("circle", { cx: bx(Number(v.observed_at_peak)), cy: y + 7, r: 4, fill: "#c2261f" }));
    });
    const box = el("div", {}, root);
    if ((d.variables || []).length) box.appendChild(el("div", { class: "muted small" }, "top variables: green = normal range, blue = expected, red = observed at the peak"));
    return box;
  });

  // images: placeholder of the image's size with the heat-map grid and the box on top
  registerEvidenceView("region", (ev) => {
    const d = ev.data || {};
    const iw = Number(d.width || (d.image_size || [])[0] || 256), ih = Number(d.height || (d.image_size || [])[1] || 256);
    const W = 320, H = Math.round(320 * ih / Math.max(1, iw));
    const k = W / Math.max(1, iw);
    const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img", class: "image-view" },
      svg("title", {}, `${d.image || "image"} region`), svg("rect", { x: 0, y: 0, width: W, height: H, class: "placeholder" }),
      svg("text", { x: 6, y: 14 }, `${d.image || "image"} (${iw}x${ih})`));
    if (Array.isArray(d.heatmap) && d.heatmap.length) {
      const rows = d.heatmap.length, cols = d.heatmap[0].length || 1;
      const peak = Math.max(...d.heatmap.flat().map(Number).filter(Number.isFinite), 1e-9);
      d.heatmap.forEach((row, r) => row.forEach((val, c) => root.appendChild(svg("rect", {
        x: c * W / cols, y: r * H / rows, width: W / cols, height: H / rows, fill: "#c2261f", opacity: (0.6 * Number(val) / peak).toFixed(3) }))));
    }
    const bbox = Array.isArray(d.bbox) ? d.bbox : d.bbox && typeof d.bbox === "object" ? [d.bbox.x, d.bbox.y, d.bbox.w, d.bbox.h] : null;
    if (bbox) root.appendChild(svg("rect", { x: k * bbox[0], y: k * bbox[1], width: k * bbox[2], height: k * bbox[3], fill: "none", stroke: "#c2261f", "stroke-width": 2, class: "bbox" }));
    return el("div", {}, root);
  });

  // video: a keyframe strip, flagged frames outlined
  registerEvidenceView("frames", (ev) => {
    const d = ev.data || {};
    const span = Array.isArray(d.frames) ? d.frames.map(Number) : [Number(d.f0 ?? 0), Number(d.f1 ?? 0)];
    const keys = Array.isArray(d.keyframes) && d.keyframes.length ? d.keyframes.map(Number)
      : Array.from({ length: 6 }, (_, i) => Math.round(span[0] + (span[1] - span[0]) * i / 5));
    const W = 64, H = 44;
    const root = svg("svg", { width: keys.length * (W + 6), height: H + 16, role: "img", class: "frame-strip" }, svg("title", {}, "keyframes"));
    keys.forEach((f, i) => {
      const flagged = f >= span[0] && f <= span[1];
      root.appendChild(svg("rect", { x: i * (W + 6), y: 0, width: W, height: H, class: "placeholder", stroke: flagged ? "#c2261f" : "#c2c8d0", "stroke-width": flagged ? 2 : 1 }));
      root.appendChild(svg("text", { x: i * (W + 6) + 4, y: H + 12 }, `frame ${f}`));
    });
    return el("div", {}, root);
  });

  registerEvidenceView("feature", (ev) => {
    const d = ev.data || {};
    return el("div", { class: "small" }, `value ${fmt(d.value ?? d.observed ?? "?")}, normal range ${JSON.stringify(d.normal_range ?? [d.normal_min, d.normal_max])}`);
  });

  // ------------------------------------------------------------------ runs and queue
  async function loadRuns(selectId) {
    const runs = await api("/runs");
    const sel = clear($("run-select"));
    for (const r of runs) {
      const names = r.inputs.map((i) => i.name).join(", ");
      sel.appendChild(el("option", { value: r.id }, `${r.id} · ${names} · ${r.candidates} candidates`));
    }
    if (!runs.length) { $("run-info").textContent = "No runs yet: upload a log."; return; }
    const id = selectId && runs.some((r) => r.id === selectId) ? selectId : (sessionStorage.getItem("aa-run") || runs[0].id);
    sel.value = runs.some((r) => r.id === id) ? id : runs[0].id;
    await selectRun(sel.value);
  }
  async function selectRun(runId) {
    state.runId = runId;
    sessionStorage.setItem("aa-run", runId);
    state.sessionId = sessionStorage.getItem(`aa-chat-${runId}`);
    clear($("chat-log"));
    if (state.sessionId) await loadChat().catch(() => { state.sessionId = null; });
    await loadQueue();
  }
  async function refreshRunInfo() {
    try {
      const run = await api(`/runs/${enc(state.runId)}`);
      $("run-info").textContent = `${run.status}; detector ${run.detector || "-"}; ${run.verdicts}/${run.candidates} explained, ${run.reviewed} reviewed`;
    } catch (err) { $("run-info").textContent = err.message; }
  }
  async function loadQueue() {
    if (!state.runId) return;
    const params = new URLSearchParams({ sort: "severity", limit: "500" });
    if ($("filter-severity").value) params.set("min_severity", $("filter-severity").value);
    if ($("filter-review").value) params.set("review", $("filter-review").value);
    const page = await api(`/runs/${enc(state.runId)}/candidates?${params}`);
    const text = $("filter-text").value.trim().toLowerCase();
    state.queue = page.items.filter((c) => !text || c.id.toLowerCase().includes(text) || c.reasons.some((r) => r.includes(text)));
    $("queue-count").textContent = `${state.queue.length} of ${page.total} candidates, most severe first`;
    refreshRunInfo();
    const list = clear($("queue"));
    for (const c of state.queue) {
      const li = el("li", { class: state.cand === c.id ? "active" : "", dataset: { id: c.id } },
        el("button", { type: "button", onclick: () => openCandidate(c.id) },
          el("span", {}, sevBadge(c.severity), el("span", { class: "tag" }, c.review), el("span", { class: "tag" }, c.severity_source)),
          el("span", { class: "cid" }, c.id),
          el("span", { class: "muted small" }, `${c.detector} · score ${fmt(c.score)} / ${fmt(c.threshold)} · ${c.reasons.join(", ")}`)));
      list.appendChild(li);
    }
  }

  // ------------------------------------------------------------------ candidate detail
  async function openCandidate(id) {
    state.cand = id;
    document.querySelectorAll("#queue li").forEach((li) => li.classList.toggle("active", li.dataset.id === id));
    const detail = await api(candPath(id));
    state.detail = detail;
    $("detail-empty").hidden = true;
    $("detail").hidden = false;
    $("citation-panel").hidden = true;
    const c = detail.candidate;
    $("cand-title").textContent = c.id;
    $("cand-meta").textContent = `${c.modality} · ${c.detector} · score ${fmt(c.score)} vs threshold ${fmt(c.threshold)} · ` +
      Object.entries(c.locator).map(([k, v]) => `${k} ${v}`).join(", ");
    renderVerdict(detail);
    const box = clear($("evidence"));
    const mview = modalityViews.get(c.modality);
    if (mview) {
      try { box.appendChild(await mview(c)); } catch (err) { box.appendChild(el("p", { class: "error" }, `cannot show ${c.modality}: ${err.message}`)); }
    }
    for (const ev of c.evidence) box.appendChild(renderEvidenceItem(ev, c));
  }

  function renderVerdict(detail) {
    const card = clear($("verdict-card"));
    const v = detail.verdict;
    $("feedback-box").hidden = !v;
    if (!v) {
      card.append(el("h3", {}, "Verdict"), el("p", { class: "muted" },
        `Not explained yet. The detector alone says ${detail.brief.label}, severity ${detail.brief.severity} (${SEV_NAMES[detail.brief.severity]}).`),
        el("button", { type: "button", id: "explain-btn", onclick: explainCurrent }, "Explain"));
      return;
    }
    const vd = v.verdict;
    const parts = [
      el("h3", {}, "Verdict"),
      el("p", { id: "verdict-head" }, sevBadge(v.final_severity), el("strong", {}, v.final_label), ` · ${vd.anomaly_type} · confidence ${fmt(vd.confidence)} · ${vd.explained_by} · `,
        el("span", { class: "tag", id: "verdict-review" }, `${v.review} v${v.version}`)),
      v.final_label !== vd.label || v.final_severity !== vd.severity ?
        el("p", { class: "muted small" }, `The explainer said ${vd.label}, severity ${vd.severity}; an analyst corrected it.`) : null,
      el("p", {}, vd.summary),
      vd.causal_chain.length ? el("ol", {}, vd.causal_chain.map((s) => el("li", {}, s.text, " ", s.evidence_ids.map(citeButton)))) : null,
      el("p", { class: "citations" }, "Cites: ", [...vd.evidence_ids, ...vd.passage_ids, ...vd.rule_ids].map(citeButton)),
      vd.actions.length ? el("ul", { class: "small" }, vd.actions.map((a) => el("li", {}, a))) : null];
    card.append(...parts.filter(Boolean));
    const hist = clear($("fb-history"));
    for (const f of detail.feedback) {
      hist.appendChild(el("li", {}, `v${f.version_after} ${f.author}: ${f.action}${f.severity !== null ? " " + f.severity : ""}${f.note ? " — " + f.note : ""} → ${f.label_after}/${f.severity_after}`));
    }
    $("fb-severity").value = String(v.final_severity);
  }

  async function explainCurrent() {
    const btn = $("explain-btn");
    if (btn) { btn.disabled = true; btn.textContent = "Explaining…"; }
    try {
      await api(`${candPath(state.cand)}/explain`, { method: "POST" });
      await openCandidate(state.cand);
      await loadQueue();
    } catch (err) {
      toast(`Explain failed: ${err.message}`);
      if (btn) { btn.disabled = false; btn.textContent = "Explain"; }
    }
  }

  async function feedback(action, extra) {
    const v = state.detail && state.detail.verdict;
    if (!v) return;
    const body = Object.assign({ action, author: $("fb-author").value.trim() || "analyst", expected_version: v.version }, extra || {});
    try {
      const res = await api(`/verdicts/${v.verdict_id}/feedback`, { method: "POST", json: body });
      $("fb-status").textContent = `Recorded: ${action} → ${res.verdict.final_label}, severity ${res.verdict.final_severity} (version ${res.verdict.version}).`;
      $("fb-note").value = "";
      await openCandidate(state.cand);
      await loadQueue();
    } catch (err) {
      if (err.status === 409) {
        $("fb-status").textContent = `Not recorded: ${err.message}. Reloaded the current state.`;
        await openCandidate(state.cand);
      } else {
        $("fb-status").textContent = `Not recorded: ${err.message}`;
      }
    }
  }

  // ------------------------------------------------------------------ chat
  async function ensureSession() {
    if (state.sessionId) return state.sessionId;
    const s = await api("/chat/sessions", { method: "POST", json: { title: `analysis of ${state.runId}`, run_id: state.runId } });
    state.sessionId = s.id;
    sessionStorage.setItem(`aa-chat-${state.runId}`, s.id);
    return s.id;
  }
  async function loadChat() {
    const msgs = await api(`/chat/sessions/${enc(state.sessionId)}/messages`);
    const log = clear($("chat-log"));
    for (const m of msgs) log.appendChild(chatBubble(m.role, m.content, null));
    log.scrollTop = log.scrollHeight;
  }
  function chatBubble(role, text, meta) {
    const body = el("div", { class: "body" });
    body.appendChild(role === "assistant" ? citedText(text) : document.createTextNode(text));
    return el("li", { class: `msg ${role}` }, body, meta ? el("div", { class: "meta" }, meta) : null);
  }
  async function sendChat(text) {
    const log = $("chat-log");
    log.appendChild(chatBubble("user", text, null));
    const pending = el("li", { class: "msg assistant pending" }, el("div", { class: "body" }, ""), el("div", { class: "meta" }, "thinking…"));
    log.appendChild(pending);
    log.scrollTop = log.scrollHeight;
    $("chat-send").disabled = true;
    try {
      const sid = await ensureSession();
      const res = await api(`/chat/sessions/${enc(sid)}/messages`, { method: "POST", raw: true,
        headers: { Accept: "text/event-stream" }, json: { content: text, run_id: state.runId, candidate_id: state.cand, stream: true } });
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "", streamed = "", tools = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const ev = (block.match(/^event: (.*)$/m) || [])[1];
          const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "null"])[1]);
          if (ev === "tool") {
            tools.push(data.name);
            pending.querySelector(".meta").textContent = `used ${tools.join(", ")}…`;
          } else if (ev === "delta") {
            streamed += data.text;
            pending.querySelector(".body").textContent = streamed;
          } else if (ev === "answer") {
            const done = chatBubble("assistant", data.content,
              `${data.worded_by === "tools" ? "from the tools" : "worded by the model"}; tools: ${data.tool_calls.map((t) => t.name).join(", ") || "none"}${data.note ? "; " + data.note : ""}`);
            done.classList.add("answer");
            done.dataset.cited = data.cited_ids.join(" ");
            log.replaceChild(done, pending);
            if (data.tool_calls.some((t) => t.name === "explain_candidate" || t.name === "add_rule")) {
              if (state.cand) openCandidate(state.cand);
              loadQueue(); loadRules();
            }
          } else if (ev === "error") {
            pending.querySelector(".meta").textContent = `error: ${data.error}`;
          }
        }
      }
    } catch (err) {
      pending.querySelector(".meta").textContent = `error: ${err.message}`;
    } finally {
      $("chat-send").disabled = false;
      log.scrollTop = log.scrollHeight;
    }
  }

  // ------------------------------------------------------------------ rules and knowledge
  async function loadRules() {
    const data = await api("/rules");
    $("rules-version").textContent = `${data.rules.length} rule(s), version ${data.rules_version}`;
    const list = clear($("rules"));
    for (const r of data.rules) {
      list.appendChild(el("li", { dataset: { rule: r.id } }, citeButton(r.id), ` v${r.version} `,
        el("span", { class: "tag" }, r.effect || "guidance"), r.severity !== null ? el("span", { class: "tag" }, SEV_NAMES[r.severity]) : null,
        el("span", { class: "tag" }, r.compiled ? "compiled" : "text only"), " ", r.text, " ",
        el("button", { type: "button", class: "link", onclick: async () => {
          try { await api(`/rules/${enc(r.id)}`, { method: "DELETE" }); await loadRules(); await loadQueue(); } catch (err) { toast(err.message); }
        } }, "remove")));
    }
  }
  function showTab(name) {
    document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
    for (const t of ["chat", "rules", "knowledge"]) $(`tab-${t}`).hidden = t !== name;
  }

  // ------------------------------------------------------------------ wiring
  function wire() {
    $("token-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
      $("token-input").value = "";
      $("token-dialog").hidden = true;
      await start();
    });
    $("logout-btn").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); askToken(""); });
    $("run-select").addEventListener("change", (e) => selectRun(e.target.value).catch((err) => toast(err.message)));
    for (const id of ["filter-severity", "filter-review"]) $(id).addEventListener("change", () => loadQueue().catch((err) => toast(err.message)));
    $("filter-text").addEventListener("input", () => loadQueue().catch((err) => toast(err.message)));
    $("fb-confirm").addEventListener("click", () => feedback("confirm"));
    $("fb-reject").addEventListener("click", () => {
      const v = state.detail.verdict;
      feedback("reject", v.final_label === "normal" ? { severity: Math.max(1, Number($("fb-severity").value)) } : {});
    });
    $("fb-set-severity").addEventListener("click", () => feedback("change_severity", { severity: Number($("fb-severity").value) }));
    $("fb-add-note").addEventListener("click", () => {
      const note = $("fb-note").value.trim();
      if (note) feedback("note", { note }); else $("fb-status").textContent = "Write the note first.";
    });
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("chat-input").value.trim();
      if (!text) return;
      $("chat-input").value = "";
      sendChat(text);
    });
    document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
    $("rule-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = { text: $("rule-text").value.trim() };
      if ($("rule-effect").value) body.effect = $("rule-effect").value;
      if ($("rule-severity").value) body.severity = Number($("rule-severity").value);
      try {
        const r = await api("/rules", { method: "POST", json: body });
        $("rule-text").value = "";
        toast(`Rule ${r.id} ${r.compiled ? "compiled" : "kept as text"}: ${r.text}`);
        await loadRules(); await loadQueue();
      } catch (err) { toast(`Rule not added: ${err.message}`); }
    });
    $("kn-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const list = clear($("kn-results"));
      try {
        const res = await api(`/knowledge/search?${new URLSearchParams({ q: $("kn-query").value, k: "5" })}`);
        if (!res.passages.length) list.appendChild(el("li", { class: "muted" }, "Nothing stored yet."));
        for (const p of res.passages) {
          list.appendChild(el("li", {}, citeButton(p.id), ` ${p.source}${p.heading ? " > " + p.heading : ""} (similarity ${fmt(p.score)}): `, p.text.slice(0, 300)));
        }
      } catch (err) { toast(err.message); }
    });
    $("kn-upload").addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = $("kn-file").files[0];
      if (!f) return;
      try {
        const r = await api(`/knowledge/documents?filename=${enc(f.name)}`, { method: "POST", body: f, headers: { "Content-Type": "application/octet-stream" } });
        toast(`${r.source}: ${r.status}, ${r.passages} passages`);
      } catch (err) { toast(`Not added: ${err.message}`); }
    });
    $("upload-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const status = $("upload-status");
      const upload = async (f) => api(`/uploads?filename=${enc(f.name)}`, { method: "POST", body: f, headers: { "Content-Type": "application/octet-stream" } });
      try {
        status.textContent = "uploading…";
        const main = await upload($("upload-file").files[0]);
        const trainFile = $("upload-train").files[0];
        const train = trainFile ? await upload(trainFile) : null;
        status.textContent = "detecting…";
        const run = await api("/runs", { method: "POST", json: { upload_id: main.id, train_upload_id: train ? train.id : null,
          detector: $("upload-detector").value.trim(), format: $("upload-format").value.trim() } });
        status.textContent = `run ${run.id}: ${run.candidates} candidates`;
        $("upload-box").open = false;
        await loadRuns(run.id);
      } catch (err) { status.textContent = `failed: ${err.message}`; }
    });
    $("report-btn").addEventListener("click", async () => {
      if (!state.runId) return;
      const links = clear($("report-links"));
      links.textContent = "writing report…";
      try {
        const r = await api(`/runs/${enc(state.runId)}/report`, { method: "POST" });
        clear(links);
        for (const [fmtName, url] of Object.entries(r.files)) {
          links.appendChild(el("button", { type: "button", class: "link", onclick: () => download(url, `${r.run_id}-report.${fmtName}`) }, fmtName));
        }
        await loadQueue();
      } catch (err) { links.textContent = `report failed: ${err.message}`; }
    });
  }
  async function download(url, name) {
    const res = await api(url.replace(/^\/api/, ""), { raw: true });
    const blob = await res.blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: name });
    document.body.appendChild(a); a.click(); a.remove();
  }

  async function start() {
    if (!token()) { askToken(""); return; }
    try {
      await loadRuns();
      await loadRules();
    } catch (err) {
      if (err.status !== 401) toast(err.message);
    }
  }

  window.AA = { registerEvidenceView, registerModalityView, renderEvidenceItem, openCitation, state };
  wire();
  start();
})();
