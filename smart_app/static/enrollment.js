// The enrollment panel: prescribe the app (pairing code + QR code, printable), watch it being claimed,
// end an enrollment. The code is shown once, as the server returned it; the QR code is an SVG made
// by fhir-bridge itself (a data: URI), so nothing is fetched from elsewhere.
"use strict";

window.FBEnrollment = (() => {
  const fmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  let pollTimer = null;

  function statusText(e) {
    if (e.status === "pending") return `Code issued, waiting for the app to claim it (expires ${fmt.format(new Date(e.code_expires_at))})`;
    if (e.status === "active") return `Active: the app is paired and sending data (since ${fmt.format(new Date(e.claimed_at))})`;
    if (e.status === "ended") return `Ended ${e.ended_at ? fmt.format(new Date(e.ended_at)) : ""}`;
    if (e.status === "expired") return "Code expired before it was claimed";
    return e.status;
  }

  function draw(box, state, tools) {
    const { api, h } = tools;
    box.replaceChildren();
    const live = h("p", { class: "enroll-status", role: "status", "aria-live": "polite" });
    const list = h("ul", { class: "alert-list" });
    const render = (s) => {
      list.replaceChildren();
      if (!s.enrollments.length) list.appendChild(h("li", { class: "muted" }, "The app has not been prescribed to this patient yet."));
      for (const e of s.enrollments) {
        const li = h("li", { class: "alert", "data-enrollment": e.id, "data-status": e.status });
        li.appendChild(h("span", { class: "badge" }, e.vendor));
        li.appendChild(h("span", { class: "enroll-state" }, statusText(e)));
        if (e.status === "active" || e.status === "pending") {
          const button = h("button", { type: "button", class: "button danger" }, "End enrollment");
          button.addEventListener("click", async () => {
            if (!window.confirm(`End the enrollment with ${e.vendor}? Data from the app stops at once.`)) return;
            button.disabled = true;
            try {
              render(await api(`/enrollment/${encodeURIComponent(e.id)}/end`, { method: "POST", body: "{}" }));
              live.textContent = `Enrollment with ${e.vendor} ended.`;
            } catch (err) {
              button.disabled = false;
              live.textContent = `Not ended: ${err.message}`;
            }
          });
          li.appendChild(button);
        }
        list.appendChild(li);
      }
    };
    render(state);
    box.appendChild(list);

    const form = h("form", { class: "prescribe" });
    if (!state.vendors.length) {
      form.appendChild(h("p", { class: "muted" }, "No app vendor is registered yet (hospital IT: fhir-bridge vendor add)."));
    } else {
      const label = h("label", { for: "prescribe-vendor" }, "App to prescribe");
      const select = h("select", { id: "prescribe-vendor", name: "vendor" });
      for (const v of state.vendors) select.appendChild(h("option", { value: v.id }, v.name));
      const button = h("button", { type: "submit", class: "button" }, "Prescribe app");
      form.append(label, select, button);
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        button.disabled = true;
        try {
          const created = await api("/enrollment", { method: "POST", body: JSON.stringify({ vendor: select.value }) });
          render(created.status);
          showCode(box, created, h);
          live.textContent = "Pairing code created. Give it to the patient to enter in the app.";
          watch(created.id, api, render, live);
        } catch (err) {
          live.textContent = `Not prescribed: ${err.message}`;
        } finally {
          button.disabled = false;
        }
      });
    }
    box.append(form, live);
  }

  function showCode(box, created, h) {
    const old = box.querySelector(".pairing");
    if (old) old.remove();
    const card = h("div", { class: "pairing", "aria-labelledby": "pairing-h" });
    card.appendChild(h("h3", { id: "pairing-h" }, "Pairing code for the patient"));
    card.appendChild(h("p", { class: "enroll-code", id: "pairing-code" }, created.code));
    const img = h("img", { class: "qr", src: created.qr, alt: `QR code of the pairing code ${created.code.split("").join(" ")}`, width: 180, height: 180 });
    card.appendChild(img);
    card.appendChild(h("p", { class: "small" }, `The patient enters this code (or scans the QR code) in the app. It works once and expires ${fmt.format(new Date(created.expires_at))}.`));
    const print = h("button", { type: "button", class: "button secondary" }, "Print code");
    print.addEventListener("click", () => {
      document.body.classList.add("printing-code");
      window.print();
      document.body.classList.remove("printing-code");
    });
    card.appendChild(print);
    box.prepend(card);
  }

  function watch(id, api, render, live) {
    clearInterval(pollTimer);
    let rounds = 0;
    pollTimer = setInterval(async () => {
      rounds += 1;
      if (rounds > 900) { clearInterval(pollTimer); return; }
      try {
        const s = await api("/enrollment");
        const mine = s.enrollments.find((e) => e.id === id);
        if (mine && mine.status !== "pending") {
          clearInterval(pollTimer);
          render(s);
          live.textContent = mine.status === "active" ? "The app has claimed the code: the patient is enrolled." : statusText(mine);
        }
      } catch (err) { /* a missed poll is retried on the next tick */ }
    }, 2000);
  }

  return { draw };
})();
