// The relationship panels: shared goals (set, edit words, status and target, progress), tasks (assign, status), messages
// (compose, thread, unread count, the not-for-emergencies notice) and the care team's timeline.
//
// Everything goes to /app/<launch id>/api/..., so the panels only ever touch the launched patient;
// POSTs carry the page's CSRF token. Text (goals, messages) is always set with textContent.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const fmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric" });
  const fmtTime = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  let state = null;

  function h(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
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
    if (!response.ok) throw new Error((body && body.message) || `HTTP ${response.status}`);
    return body;
  }

  function goalLine(g) {
    const li = h("li", { "data-goal": g.id, "data-status": g.status });
    li.appendChild(h("span", { class: "goal-text" }, g.description));
    li.appendChild(h("span", { class: "badge" }, g.status));
    if (g.target) {
      const due = g.target.due_date ? ` by ${fmt.format(new Date(g.target.due_date))}` : "";
      li.appendChild(h("span", { class: "muted small" }, `Target: ${g.target.label} ${g.target.words} ${g.target.value}${due}`));
      const p = g.progress;
      let text = "No data yet";
      if (p && p.latest !== null) text = `Latest ${p.latest} on ${fmt.format(new Date(p.at))}${p.met ? ": target met" : ": not there yet"}`;
      li.appendChild(h("span", { class: `progress${p && p.met ? " met" : ""}` }, text));
    }
    if (g.status === "active" || g.status === "proposed" || g.status === "on-hold") {
      const done = h("button", { type: "button", class: "button secondary" }, "Mark achieved");
      done.addEventListener("click", () => act(done, `/goals/${encodeURIComponent(g.id)}`, { status: "completed" }));
      li.appendChild(done);
    }
    li.appendChild(editForm(g));
    return li;
  }

  // The options of the "set a goal" form's select, for the same choice in an edit form.
  function optionsFrom(selectId, selected) {
    return Array.from(document.getElementById(selectId).options, (o) => {
      const option = h("option", { value: o.value }, o.textContent);
      if (o.value === (selected || "")) option.selected = true;
      return option;
    });
  }

  // Edit a goal in place: its words, its status and its measurable target (or none).
  function editForm(g) {
    const box = h("details", { class: "goal-edit" });
    box.appendChild(h("summary", {}, "Edit"));
    const form = h("form", { novalidate: "" });
    const id = (name) => `goal-edit-${name}-${g.id}`;
    const field = (name, label, node) => {
      form.appendChild(h("label", { for: id(name) }, label));
      node.id = id(name);
      node.name = name;
      form.appendChild(node);
      return node;
    };
    const text = field("description", "Goal", h("input", { maxlength: "500" }));
    text.value = g.description;
    const status = field("status", "Status", h("select", {}));
    for (const [value, label] of [["proposed", "Proposed"], ["active", "Active"], ["on-hold", "On hold"], ["completed", "Achieved"], ["cancelled", "Cancelled"]]) {
      const option = h("option", { value }, label);
      if (value === g.status) option.selected = true;
      status.appendChild(option);
    }
    const target = g.target || {};
    const measure = field("measure", "Measure", h("select", {}));
    measure.replaceChildren(...optionsFrom("goal-measure", target.measure));
    const comparator = field("comparator", "Target", h("select", {}));
    comparator.replaceChildren(...optionsFrom("goal-comparator", target.comparator));
    const value = field("value", "Value", h("input", { type: "number", min: "0", step: "any" }));
    value.value = target.value ?? "";
    const due = field("due_date", "By", h("input", { type: "date" }));
    due.value = target.due_date || "";
    const save = h("button", { type: "submit", class: "button" }, "Save goal");
    form.appendChild(save);
    const note = h("p", { class: "form-status", role: "status", "aria-live": "polite" });
    form.appendChild(note);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      save.disabled = true;
      const body = { description: text.value, status: status.value, target: null };
      if (measure.value) {
        body.target = { measure: measure.value, comparator: comparator.value, value: value.value === "" ? null : Number(value.value), due_date: due.value || null };
      }
      try {
        await api(`/goals/${encodeURIComponent(g.id)}`, { method: "POST", body: JSON.stringify(body) });
        await load();
      } catch (err) {
        note.textContent = `Not saved: ${err.message}`;
        save.disabled = false;
      }
    });
    box.appendChild(form);
    return box;
  }

  function taskLine(t) {
    const li = h("li", { "data-task": t.id, "data-status": t.status });
    li.appendChild(h("span", { class: "task-text" }, t.title));
    const label = t.status === "completed" ? `Done ${t.completed ? fmt.format(new Date(t.completed)) : ""}` : t.status === "requested" ? "Open" : "Cancelled";
    li.appendChild(h("span", { class: "badge task-status" }, label.trim()));
    if (t.due_date) li.appendChild(h("span", { class: "muted small" }, `due ${fmt.format(new Date(t.due_date))}`));
    if (t.status === "requested") {
      const cancel = h("button", { type: "button", class: "button secondary" }, "Cancel task");
      cancel.addEventListener("click", () => act(cancel, `/tasks/${encodeURIComponent(t.id)}/cancel`, {}));
      li.appendChild(cancel);
    }
    return li;
  }

  async function act(button, path, body) {
    button.disabled = true;
    try {
      await api(path, { method: "POST", body: JSON.stringify(body) });
      await load();
    } catch (err) {
      button.disabled = false;
      button.after(h("span", { class: "error", role: "alert" }, ` ${err.message}`));
    }
  }

  function list(box, items, line, empty) {
    box.replaceChildren();
    if (!items.length) { box.appendChild(h("p", { class: "muted" }, empty)); return; }
    const ul = h("ul", { class: "rel-list" });
    for (const item of items) ul.appendChild(line(item));
    box.appendChild(ul);
  }

  function drawMessages() {
    document.getElementById("crisis-notice").textContent = state.notice;
    const badge = document.getElementById("unread");
    badge.hidden = !state.unread;
    badge.textContent = state.unread ? `${state.unread} unread` : "";
    const thread = document.getElementById("thread");
    thread.replaceChildren();
    if (!state.messages.length) thread.appendChild(h("li", { class: "muted" }, "No messages yet."));
    for (const m of state.messages) {
      const li = h("li", { class: `${m.direction}${m.unread ? " unread" : ""}`, "data-message": m.id });
      li.appendChild(h("span", { class: "who" }, `${m.from === "patient" ? "Patient (via the app)" : "Care team"} · ${fmtTime.format(new Date(m.sent))}${m.unread ? " · new" : ""}`));
      li.appendChild(h("span", { class: "message-text" }, m.text));
      thread.appendChild(li);
    }
  }

  function drawTimeline() {
    const box = document.getElementById("timeline");
    box.replaceChildren();
    if (!state.timeline.length) box.appendChild(h("li", { class: "muted" }, "No actions recorded yet."));
    for (const e of state.timeline) {
      box.appendChild(h("li", { "data-action": e.action }, `${fmtTime.format(new Date(e.at))}: ${e.label} (${e.who})`));
    }
  }

  async function load() {
    try {
      state = await api("/relationship");
    } catch (err) {
      for (const id of ["goals", "tasks"]) document.getElementById(id).replaceChildren(h("p", { class: "error" }, err.message));
      return;
    }
    list(document.getElementById("goals"), state.goals, goalLine, "No shared goals yet. Agree one with the patient below.");
    list(document.getElementById("tasks"), state.tasks, taskLine, "No tasks assigned.");
    drawMessages();
    drawTimeline();
    document.body.dataset.relationship = "ready";
  }

  function onSubmit(id, build, path, done) {
    const form = document.getElementById(id);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const status = form.querySelector(".form-status");
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      status.textContent = "Sending…";
      try {
        await api(path, { method: "POST", body: JSON.stringify(build(form)) });
        status.textContent = done;
        form.reset();
        await load();
      } catch (err) {
        status.textContent = `Not sent: ${err.message}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  onSubmit("goal-form", (f) => {
    const body = { description: f.description.value };
    if (f.measure.value) {
      body.target = { measure: f.measure.value, comparator: f.comparator.value, value: f.value.value === "" ? null : Number(f.value.value), due_date: f.due_date.value || null };
    }
    return body;
  }, "/goals", "Goal set: it is being written to the EHR and shared with the patient's app.");

  onSubmit("task-form", (f) => {
    const [kind, measure] = f.kind.value.split(":");
    return { kind, measure: measure || null, title: f.title.value, due_date: f.due_date.value || null };
  }, "/tasks", "Task assigned: it is being written to the EHR and sent to the patient's app.");

  onSubmit("message-form", (f) => ({ text: f.text.value }), "/messages", "Message sent.");

  document.querySelector(".panel.messages").addEventListener("focusin", async () => {
    if (state && state.unread) {
      try { await api("/messages/read", { method: "POST", body: "{}" }); } catch (err) { return; }
      state.unread = 0;
      document.getElementById("unread").hidden = true;
    }
  }, { once: true });

  window.FBRelationship = { reload: load };
  load();
})();
