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
          // Confirmed in the page, not with window.confirm(): EHRs embed apps in sandboxed iframes
          // without allow-modals, where confirm() silently answers "no".
          const button = h("button", { type: "button", class: "button danger", "aria-expanded": "false" }, "End enrollment");
          const confirmBox = h("span", { class: "confirm", hidden: "" });
          const yes = h("button", { type: "button", class: "button danger confirm-end" }, `Yes, end it: data from ${e.vendor} stops now`);
          const no = h("button", { type: "button", class: "button secondary" }, "Keep it");
          confirmBox.append(yes, no);
          button.addEventListener("click", () => {
            confirmBox.hidden = false;
            button.setAttribute("aria-expanded", "true");
            yes.focus();
          });
          no.addEventListener("click", () => {
            confirmBox.hidden = true;
            button.setAttribute("aria-expanded", "false");
            button.focus();
          });
          yes.addEventListener("click", async () => {
            yes.disabled = true;
            try {
              render(await api(`/enrollment/${encodeURIComponent(e.id)}/end`, { method: "POST", body: "{}" }));
              live.textContent = `Enrollment with ${e.vendor} ended.`;
            } catch (err) {
              yes.disabled = false;
              live.textContent = `Not ended: ${err.message}`;
            }
          });
          li.append(button, confirmBox);
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
    // Inside an EHR frame printing is often not allowed (no allow-modals); a card to download always is.
    const download = h("a", { class: "button secondary", download: "pairing-code.svg", href: cardUrl(created) }, "Download printable card");
    card.append(print, document.createTextNode(" "), download);
    box.prepend(card);
  }

  function cardUrl(created) {
    const esc = (text) => text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
    const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="400" height="330" viewBox="0 0 400 330">` +
      `<rect width="400" height="330" fill="#fff"/>` +
      `<text x="200" y="32" font-family="sans-serif" font-size="18" text-anchor="middle">Your app pairing code</text>` +
      `<image x="110" y="45" width="180" height="180" href="${esc(created.qr)}"/>` +
      `<text x="200" y="262" font-family="monospace" font-size="30" text-anchor="middle">${esc(created.code)}</text>` +
      `<text x="200" y="300" font-family="sans-serif" font-size="13" text-anchor="middle">Enter it in the app once. Valid until ${esc(fmt.format(new Date(created.expires_at)))}.</text>` +
      `</svg>`;
    return URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
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
