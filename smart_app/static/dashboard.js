// The dashboard page: fetch this launch's summary, draw the panels, send the clinician's actions.
//
// Every request goes to /app/<launch id>/api/..., so this page can only ever ask about the patient
// of its own launch; POSTs carry the page's CSRF token. Text from the EHR is always set with
// textContent, never parsed as HTML.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const main = document.getElementById("main");
  const notices = document.getElementById("notices");
  const DAY = FBCharts.DAY;
  let data = null;
  let rangeDays = 180;

  performance.mark("fb-start");

  function h(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function notice(kind, text, action) {
    const box = h("div", { class: `notice ${kind}` });
    box.appendChild(h("p", {}, text));
    if (action) box.appendChild(action);
    notices.appendChild(box);
  }

  async function api(path, options) {
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    init.headers = Object.assign({ Accept: "application/json" }, init.headers);
    if (init.method && init.method !== "GET") {
      init.headers["X-CSRF-Token"] = config.csrf;
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(`${config.api}${path}`, init);
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok) {
      const error = new Error((body && body.message) || `HTTP ${response.status}`);
      error.status = response.status;
      error.code = body && body.error;
      throw error;
    }
    return body;
  }

  function range() {
    const now = Date.now();
    if (rangeDays) return { from: now - rangeDays * DAY, to: now };
    let first = now - 30 * DAY;
    for (const s of Object.values(data.series)) if (s.t.length && s.t[0] < first) first = s.t[0];
    return { from: first - DAY, to: now };
  }

  function series(key, label, cls) {
    const s = data.series[key] || { t: [], v: [] };
    return { label, t: s.t, v: s.v, cls };
  }

  function drawBanner() {
    const p = data.patient;
    const name = document.getElementById("patient-name");
    const meta = document.getElementById("patient-meta");
    if (p) {
      name.textContent = p.name;
      meta.textContent = [p.birthDate && `Born ${p.birthDate}`, p.gender].filter(Boolean).join(" · ");
    } else {
      name.textContent = "Patient dashboard";
      meta.textContent = "The patient's name could not be read from the EHR.";
    }
  }

  function drawSymptoms(r) {
    const markers = data.markers.phq9 || {};
    const marks = [];
    if (markers.baseline) marks.push({ ...markers.baseline, label: "Baseline", cls: "baseline" });
    if (markers.response) marks.push({ ...markers.response, label: "Response", cls: "response" });
    if (markers.remission) marks.push({ ...markers.remission, label: "Remission", cls: "remission" });
    FBCharts.lineChart(document.getElementById("chart-phq9"), {
      title: "PHQ-9 (depression), 0–27", unit: "score", series: [series("phq9", "PHQ-9", "phq9")],
      bands: data.bands.phq9, yMin: 0, yMax: 27, markers: marks, ...r,
      empty: "No PHQ-9 results yet. They appear here once the patient's app sends questionnaires.",
    });
    FBCharts.lineChart(document.getElementById("chart-gad7"), {
      title: "GAD-7 (anxiety), 0–21", unit: "score", series: [series("gad7", "GAD-7", "gad7")],
      bands: data.bands.gad7, yMin: 0, yMax: 21, ...r,
      empty: "No GAD-7 results yet.",
    });
    const summary = document.getElementById("phq9-summary");
    summary.replaceChildren();
    if (markers.latest) {
      const parts = [`Latest PHQ-9 ${markers.latest.v} (${markers.latest.band}) on ${FBCharts.fmtDate.format(new Date(markers.latest.t))}`];
      if (markers.change_pct !== undefined) parts.push(`${markers.change_pct > 0 ? "+" : ""}${markers.change_pct}% since baseline ${markers.baseline.v}`);
      if (markers.remission) parts.push("remission reached (below 5)");
      else if (markers.response) parts.push("response reached (50% or more below baseline)");
      summary.textContent = parts.join("; ") + ".";
      const item9 = data.series.phq9_item9;
      if (item9 && item9.v.length && item9.v[item9.v.length - 1] > 0) {
        summary.appendChild(h("strong", { class: "safety" }, " Latest PHQ-9 item 9 (thoughts of self-harm) was answered above “not at all”."));
      }
    }
  }

  function drawAlliance(r) {
    FBCharts.lineChart(document.getElementById("chart-dwai"), {
      title: "D-WAI total, 6–30", unit: "score", series: [series("dwai_total", "D-WAI total", "dwai")], yMin: 6, yMax: 30, ...r,
      empty: "No alliance (D-WAI) answers yet.",
    });
    const themes = [["bond", "Bond", 1], ["task", "Tasks", 2], ["goal", "Goals", 3]].map(
      ([key, label, n]) => series(`dwai_${key}`, label, `item item-${n}`));
    FBCharts.lineChart(document.getElementById("chart-dwai-themes"), {
      title: "D-WAI bond, tasks and goals, 2–10", unit: "score", series: themes, yMin: 2, yMax: 10, ...r, height: 160,
      empty: "No alliance (D-WAI) answers yet.",
    });
  }

  function drawEngagement(r) {
    const e = data.engagement;
    const text = document.getElementById("engagement-summary");
    text.replaceChildren();
    if (e.last_data === null) {
      text.textContent = "No app data has arrived for this patient yet. Prescribe the app below to start.";
    } else {
      text.appendChild(document.createTextNode(`Last data from the app: ${FBCharts.fmtDate.format(new Date(e.last_data))}. `));
      if (e.silent_days >= 7) {
        text.appendChild(h("strong", { class: "warn" }, `Silent for ${e.silent_days} days.`));
      } else {
        text.appendChild(document.createTextNode(e.silent_days === 0 ? "Active today." : `Silent for ${e.silent_days} day${e.silent_days === 1 ? "" : "s"}.`));
      }
    }
    FBCharts.calendar(document.getElementById("calendar"), e.days, r.from, r.to);
  }

  function drawSensing(r) {
    FBCharts.lineChart(document.getElementById("chart-sleep"), {
      title: "Sleep, hours per night", unit: "h", series: [series("sleep", "Sleep", "sleep")], yMin: 0, ...r,
      empty: "No sleep data yet.",
    });
    FBCharts.lineChart(document.getElementById("chart-steps"), {
      title: "Steps per day", unit: "steps", series: [series("steps", "Steps", "steps")], yMin: 0, ...r,
      empty: "No step counts yet.",
    });
  }

  function drawAlerts() {
    const box = document.getElementById("alerts");
    box.replaceChildren();
    const bridge = data.alerts.bridge || [];
    const ehr = data.alerts.ehr || [];
    if (!bridge.length && !ehr.length) {
      box.appendChild(h("p", { class: "muted" }, "No open alerts for this patient."));
      return;
    }
    const list = h("ul", { class: "alert-list" });
    for (const a of bridge) {
      const li = h("li", { class: `alert ${a.priority}` });
      li.appendChild(h("span", { class: "badge" }, a.priority === "urgent" ? "Urgent" : "Alert"));
      li.appendChild(h("span", { class: "alert-text" }, a.reason));
      li.appendChild(h("span", { class: "muted small" }, ` · ${FBCharts.fmtDate.format(new Date(a.at))}`));
      const button = h("button", { type: "button", class: "button secondary" }, "Acknowledge");
      button.addEventListener("click", async () => {
        button.disabled = true;
        try {
          await api(`/alerts/${encodeURIComponent(a.id)}/acknowledge`, { method: "POST", body: "{}" });
          li.replaceChildren(h("span", { class: "muted" }, `Acknowledged: ${a.reason}`));
        } catch (err) {
          button.disabled = false;
          li.appendChild(h("span", { class: "error", role: "alert" }, ` ${err.message}`));
        }
      });
      li.appendChild(button);
      list.appendChild(li);
    }
    for (const a of ehr) {
      const li = h("li", { class: `alert ehr ${a.priority || ""}` });
      li.appendChild(h("span", { class: "badge" }, a.kind === "Flag" ? "Flag" : a.priority === "urgent" ? "Urgent task" : "Task"));
      li.appendChild(h("span", { class: "alert-text" }, a.text));
      if (a.description && a.description !== a.text) li.appendChild(h("span", { class: "small" }, ` ${a.description}`));
      if (a.at) li.appendChild(h("span", { class: "muted small" }, ` · ${FBCharts.fmtDate.format(new Date(a.at))}`));
      li.appendChild(h("span", { class: "muted small" }, " · in the EHR"));
      list.appendChild(li);
    }
    box.appendChild(list);
  }

  function drawEnrollment() {
    const box = document.getElementById("enrollment");
    box.replaceChildren();
    const e = data.enrollment;
    if (!e) {
      box.appendChild(h("p", { class: "muted" }, "Enrollment is not available on this installation."));
      return;
    }
    if (window.FBEnrollment) window.FBEnrollment.draw(box, e, { api, h, reload: load });
  }

  function drawAll() {
    const r = range();
    drawBanner();
    drawAlerts();
    drawSymptoms(r);
    drawAlliance(r);
    drawEngagement(r);
    drawSensing(r);
    drawEnrollment();
  }

  function showProblems() {
    for (const p of data.problems || []) notice("warning", p.message);
  }

  async function load() {
    main.setAttribute("aria-busy", "true");
    notices.replaceChildren();
    try {
      data = await api("/summary");
    } catch (err) {
      main.setAttribute("aria-busy", "false");
      document.body.dataset.state = "error";
      if (err.status === 401 || err.status === 404) {
        main.hidden = true;
        notice("error", err.message || "Your EHR session has expired. Open the app again from the patient's chart.");
      } else if (err.status) {
        notice("error", `${err.message} Reload the page to try again.`);
      } else {
        notice("error", "fhir-bridge could not be reached. Check the network connection and reload the page.");
      }
      return;
    }
    performance.mark("fb-data");
    showProblems();
    drawAll();
    main.setAttribute("aria-busy", "false");
    document.body.dataset.state = "ready";
    performance.mark("fb-interactive");
    performance.measure("fb-render", "fb-data", "fb-interactive");
  }

  document.querySelectorAll(".range button").forEach((button) => {
    button.addEventListener("click", () => {
      rangeDays = Number(button.dataset.days);
      document.querySelectorAll(".range button").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
      if (data) drawAll();
    });
  });

  const form = document.getElementById("follow-up-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const status = form.querySelector(".form-status");
    const button = form.querySelector("button");
    button.disabled = true;
    status.textContent = "Sending…";
    const requestId = form.dataset.requestId || (form.dataset.requestId = crypto.getRandomValues(new Uint32Array(4)).join("-"));
    try {
      await api("/follow-up", {
        method: "POST",
        body: JSON.stringify({ reason: form.reason.value, note: form.note.value, request_id: requestId }),
      });
      status.textContent = "Follow-up requested: a task is being written to the EHR for the care team.";
      form.reset();
      delete form.dataset.requestId;
    } catch (err) {
      status.textContent = `Not sent: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (data) drawAll(); }, 150);
  });

  window.FBDashboard = { reload: load };
  load();
})();
