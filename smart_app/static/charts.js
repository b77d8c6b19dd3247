// Small SVG charts for the dashboard, written for this app rather than vendored.
//
// Why our own: the dashboard needs exactly three things (a line chart with severity bands and
// markers, multi-series lines, a calendar heat map), must run under a strict CSP with no inline
// styles or eval, must work offline from our own origin, and must be keyboard accessible with a
// data-table alternative. A general chart library would bring far more code than this file and
// still need the accessibility layer written around it.
//
// Every chart: hover or keyboard (arrow keys, Home, End) moves a focus point and announces its value;
// a <details> holds the data as a table, built only when opened (two years of daily data stays fast);
// long series are thinned to at most two points per pixel column (min and max), so 10,000 points
// draw as quickly as 1,000.
"use strict";

const FBCharts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const DAY = 86400000;
  const fmtDate = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric" });
  const fmtMonth = new Intl.DateTimeFormat(undefined, { month: "short" });
  const fmtYearMonth = new Intl.DateTimeFormat(undefined, { month: "short", year: "numeric" });

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function formatValue(v, unit) {
    if (v === null || v === undefined) return "–";
    const rounded = Math.abs(v) >= 100 ? Math.round(v).toLocaleString() : (Math.round(v * 10) / 10).toString();
    return unit && unit !== "score" ? `${rounded} ${unit}` : rounded;
  }

  // First index with t >= x (arrays are sorted by time).
  function lowerBound(t, x) {
    let lo = 0;
    let hi = t.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (t[mid] < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  function slice(series, from, to) {
    const a = lowerBound(series.t, from);
    const b = lowerBound(series.t, to + 1);
    return { t: series.t.slice(a, b), v: series.v.slice(a, b) };
  }

  // Keep first, last, min and max per pixel column: the shape survives, the path stays small.
  function thin(t, v, x, columns) {
    if (t.length <= columns * 2) return t.map((_, i) => i);
    const keep = [];
    let column = -1;
    let minI = -1;
    let maxI = -1;
    const flush = () => {
      if (minI < 0) return;
      if (minI === maxI) keep.push(minI);
      else if (minI < maxI) keep.push(minI, maxI);
      else keep.push(maxI, minI);
    };
    for (let i = 0; i < t.length; i++) {
      const c = Math.floor(x(t[i]));
      if (c !== column) {
        flush();
        column = c;
        minI = maxI = i;
      } else {
        if (v[i] < v[minI]) minI = i;
        if (v[i] > v[maxI]) maxI = i;
      }
    }
    flush();
    return keep;
  }

  function niceTicks(lo, hi, count) {
    const span = hi - lo || 1;
    const step0 = span / count;
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || mag * 10;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(Math.round(v * 100) / 100);
    return ticks;
  }

  function timeTicks(from, to, width) {
    const months = (to - from) / (30 * DAY);
    const every = months <= 4 ? 1 : months <= 8 ? 2 : months <= 14 ? 3 : months <= 30 ? 6 : 12;
    const ticks = [];
    const start = new Date(from);
    let d = new Date(start.getFullYear(), start.getMonth() + 1, 1);
    while (d.getTime() <= to) {
      if (d.getMonth() % every === 0 || every === 1) ticks.push(d.getTime());
      d = new Date(d.getFullYear(), d.getMonth() + 1, 1);
    }
    const maxTicks = Math.max(2, Math.floor(width / 70));
    while (ticks.length > maxTicks) ticks.splice(1, 1);
    return ticks;
  }

  // opts: {title, unit, series:[{label, t, v, cls}], bands:[[low,label],..], yMin, yMax, markers:[{t,v,label,cls}],
  //        from, to, empty}
  function lineChart(figure, opts) {
    figure.replaceChildren();
    const titleId = `${figure.id}-title`;
    const heading = html("figcaption", { id: titleId, class: "chart-title" }, opts.title);
    figure.appendChild(heading);
    const visible = opts.series.map((s) => ({ ...s, ...slice(s, opts.from, opts.to) }));
    const count = visible.reduce((n, s) => n + s.t.length, 0);
    if (!count) {
      figure.appendChild(html("p", { class: "empty" }, opts.empty));
      return;
    }
    const width = Math.max(280, Math.floor(figure.clientWidth || 600));
    const height = opts.height || 200;
    const m = { l: 44, r: opts.bands ? 136 : 14, t: 10, b: 26 };
    const pw = width - m.l - m.r;
    const ph = height - m.t - m.b;
    let yMin = opts.yMin;
    let yMax = opts.yMax;
    if (yMin === undefined || yMax === undefined) {
      let lo = Infinity;
      let hi = -Infinity;
      for (const s of visible) for (const v of s.v) { if (v < lo) lo = v; if (v > hi) hi = v; }
      if (yMin === undefined) yMin = Math.min(0, lo);
      if (yMax === undefined) yMax = hi <= yMin ? yMin + 1 : hi * 1.08;
    }
    const x = (t) => m.l + ((t - opts.from) / Math.max(1, opts.to - opts.from)) * pw;
    const y = (v) => m.t + ph - ((v - yMin) / (yMax - yMin)) * ph;

    const svg = el("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img", tabindex: 0, class: "chart-svg",
      "aria-labelledby": titleId, "aria-describedby": `${figure.id}-desc`,
    });
    figure.appendChild(svg);

    if (opts.bands) {
      opts.bands.forEach(([low, label], i) => {
        const high = i + 1 < opts.bands.length ? opts.bands[i + 1][0] : yMax;
        if (low >= yMax) return;
        el("rect", { x: m.l, y: y(Math.min(high, yMax)), width: pw, height: y(low) - y(Math.min(high, yMax)), class: `band band-${i}` }, svg);
        const label_ = el("text", { x: m.l + pw + 6, y: (y(low) + y(Math.min(high, yMax))) / 2 + 4, class: "band-label" }, svg);
        label_.textContent = `${label} ${low}+`;
      });
    }
    for (const v of niceTicks(yMin, yMax, 4)) {
      el("line", { x1: m.l, x2: m.l + pw, y1: y(v), y2: y(v), class: "grid" }, svg);
      el("text", { x: m.l - 6, y: y(v) + 4, class: "tick y" }, svg).textContent = formatValue(v);
    }
    const ticks = timeTicks(opts.from, opts.to, pw);
    ticks.forEach((t) => {
      el("line", { x1: x(t), x2: x(t), y1: m.t + ph, y2: m.t + ph + 4, class: "axis" }, svg);
      const d = new Date(t);
      el("text", { x: x(t), y: height - 6, class: "tick x" }, svg).textContent =
        d.getMonth() === 0 || ticks.length <= 3 ? fmtYearMonth.format(d) : fmtMonth.format(d);
    });
    el("line", { x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph, class: "axis" }, svg);

    for (const s of visible) {
      if (!s.t.length) continue;
      const keep = thin(s.t, s.v, x, pw);
      let d = "";
      keep.forEach((i, k) => { d += `${k ? "L" : "M"}${x(s.t[i]).toFixed(1)},${y(s.v[i]).toFixed(1)}`; });
      el("path", { d, class: `line ${s.cls || ""}` }, svg);
      if (s.t.length <= 120) {
        for (let i = 0; i < s.t.length; i++) el("circle", { cx: x(s.t[i]), cy: y(s.v[i]), r: 3, class: `dot ${s.cls || ""}` }, svg);
      }
    }
    for (const mk of opts.markers || []) {
      if (mk.t < opts.from || mk.t > opts.to) continue;
      const g = el("g", { class: `marker ${mk.cls || ""}` }, svg);
      el("circle", { cx: x(mk.t), cy: y(mk.v), r: 6 }, g);
      el("text", { x: x(mk.t), y: Math.max(12, y(mk.v) - 10), class: "marker-label" }, g).textContent = mk.label;
    }

    // Focus point: hover or keys move it; the value is announced.
    const rule = el("line", { x1: 0, x2: 0, y1: m.t, y2: m.t + ph, class: "rule", visibility: "hidden" }, svg);
    const focusDot = el("circle", { r: 5, class: "focus-dot", visibility: "hidden" }, svg);
    const tip = html("div", { class: "tooltip", hidden: "" });
    const live = html("p", { class: "sr-only", "aria-live": "polite" });
    figure.append(tip, live);
    const primary = visible.find((s) => s.t.length) || visible[0];
    let index = primary.t.length - 1;
    const describe = (i) => {
      const t = primary.t[i];
      const parts = visible.filter((s) => s.t.length).map((s) => {
        const j = Math.min(s.t.length - 1, Math.max(0, lowerBound(s.t, t)));
        const k = j > 0 && Math.abs(s.t[j - 1] - t) < Math.abs(s.t[j] - t) ? j - 1 : j;
        return `${s.label}: ${formatValue(s.v[k], opts.unit)}`;
      });
      return `${fmtDate.format(new Date(t))} · ${parts.join(" · ")}`;
    };
    const show = (i, announce) => {
      index = Math.max(0, Math.min(primary.t.length - 1, i));
      const px = x(primary.t[index]);
      const py = y(primary.v[index]);
      rule.setAttribute("x1", px); rule.setAttribute("x2", px); rule.setAttribute("visibility", "visible");
      focusDot.setAttribute("cx", px); focusDot.setAttribute("cy", py); focusDot.setAttribute("visibility", "visible");
      tip.textContent = describe(index);
      tip.hidden = false;
      const scale = svg.getBoundingClientRect().width / width || 1;
      tip.style.left = `${Math.min(px * scale, Math.max(0, svg.clientWidth - 220))}px`;
      if (announce) live.textContent = tip.textContent;
    };
    const hide = () => {
      rule.setAttribute("visibility", "hidden"); focusDot.setAttribute("visibility", "hidden"); tip.hidden = true;
    };
    svg.addEventListener("pointermove", (ev) => {
      const box = svg.getBoundingClientRect();
      const t = opts.from + ((ev.clientX - box.left) * (width / box.width) - m.l) / pw * (opts.to - opts.from);
      let i = lowerBound(primary.t, t);
      if (i > 0 && (i >= primary.t.length || t - primary.t[i - 1] < primary.t[i] - t)) i -= 1;
      show(i, false);
    });
    svg.addEventListener("pointerleave", hide);
    svg.addEventListener("blur", hide);
    svg.addEventListener("focus", () => show(index, true));
    svg.addEventListener("keydown", (ev) => {
      const step = ev.shiftKey ? 7 : 1;
      const moves = { ArrowLeft: index - step, ArrowRight: index + step, Home: 0, End: primary.t.length - 1 };
      if (ev.key in moves) { ev.preventDefault(); show(moves[ev.key], true); }
    });

    if (visible.filter((s) => s.t.length).length > 1) {
      const legend = html("ul", { class: "chart-legend" });
      for (const s of visible) {
        if (!s.t.length) continue;
        const li = html("li");
        const swatch = el("svg", { width: 18, height: 10, "aria-hidden": "true" });
        el("line", { x1: 0, x2: 18, y1: 5, y2: 5, class: `line ${s.cls || ""}` }, swatch);
        li.append(swatch, document.createTextNode(` ${s.label}`));
        legend.appendChild(li);
      }
      figure.appendChild(legend);
    }
    const desc = html("p", { id: `${figure.id}-desc`, class: "chart-desc" });
    const last = primary.t.length - 1;
    desc.textContent = `${primary.t.length} result${primary.t.length === 1 ? "" : "s"} from ${fmtDate.format(new Date(primary.t[0]))} to ` +
      `${fmtDate.format(new Date(primary.t[last]))}; latest ${formatValue(primary.v[last], opts.unit)}. ` +
      "Use the arrow keys on the chart to read values.";
    figure.appendChild(desc);
    figure.appendChild(dataTable(opts.title, visible, opts.unit));
  }

  function dataTable(title, series, unit) {
    const details = html("details", { class: "data-table" });
    details.appendChild(html("summary", {}, `Show ${title} as a table`));
    details.addEventListener("toggle", () => {
      if (!details.open || details.querySelector("table")) return;
      const table = html("table");
      table.appendChild(html("caption", { class: "sr-only" }, title));
      const head = html("tr");
      head.appendChild(html("th", { scope: "col" }, "Date"));
      const active = series.filter((s) => s.t.length);
      active.forEach((s) => head.appendChild(html("th", { scope: "col" }, `${s.label}${unit && unit !== "score" ? ` (${unit})` : ""}`)));
      const thead = html("thead");
      thead.appendChild(head);
      table.appendChild(thead);
      const rows = new Map();
      active.forEach((s, col) => s.t.forEach((t, i) => {
        const key = new Date(t).toISOString().slice(0, 10);
        if (!rows.has(key)) rows.set(key, new Array(active.length).fill(null));
        rows.get(key)[col] = s.v[i];
      }));
      const tbody = html("tbody");
      [...rows.keys()].sort().reverse().forEach((key) => {
        const tr = html("tr");
        tr.appendChild(html("th", { scope: "row" }, key));
        rows.get(key).forEach((v) => tr.appendChild(html("td", {}, formatValue(v))));
        tbody.appendChild(tr);
      });
      table.appendChild(tbody);
      const wrap = html("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": `${title} data` });
      wrap.appendChild(table);
      details.appendChild(wrap);
    });
    return details;
  }

  // days: [[ "YYYY-MM-DD", minutes ], ...]; one square per day, weeks as columns, newest on the right.
  function calendar(container, days, from, to) {
    container.replaceChildren();
    const byDay = new Map(days);
    const start = new Date(Math.max(from, to - 370 * DAY));
    start.setUTCDate(start.getUTCDate() - start.getUTCDay());
    const weeks = Math.ceil((to - start.getTime()) / (7 * DAY)) + 1;
    const size = 11;
    const gap = 2;
    const width = 30 + weeks * (size + gap);
    const height = 7 * (size + gap) + 18;
    const max = Math.max(1, ...days.map((d) => d[1]));
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-labelledby": `${container.id}-desc`, class: "calendar-svg" });
    ["Mon", "Wed", "Fri"].forEach((name, i) => {
      el("text", { x: 0, y: 18 + (1 + i * 2) * (size + gap) + 9, class: "tick" }, svg).textContent = name;
    });
    let active = 0;
    let lastMonth = -1;
    let lastLabel = -9;
    for (let w = 0; w < weeks; w++) {
      for (let d = 0; d < 7; d++) {
        const day = new Date(start.getTime() + (w * 7 + d) * DAY);
        if (day.getTime() > to) break;
        const key = day.toISOString().slice(0, 10);
        if (d === 0 && day.getUTCMonth() !== lastMonth) {
          lastMonth = day.getUTCMonth();
          if (w - lastLabel >= 3) {
            lastLabel = w;
            el("text", { x: 30 + w * (size + gap), y: 10, class: "tick" }, svg).textContent = fmtMonth.format(day);
          }
        }
        const minutes = byDay.get(key);
        let level = "none";
        if (minutes !== undefined) {
          active += 1;
          level = minutes <= 0 ? "data" : `use-${Math.min(3, Math.ceil((minutes / max) * 3))}`;
        }
        const cell = el("rect", { x: 30 + w * (size + gap), y: 18 + d * (size + gap), width: size, height: size, rx: 2, class: `day ${level}` }, svg);
        const title = el("title", {}, cell);
        title.textContent = minutes === undefined ? `${key}: no app data` : `${key}: app data${minutes > 0 ? `, ${Math.round(minutes)} min of use` : ""}`;
      }
    }
    container.appendChild(svg);
    const legend = html("p", { class: "legend small" });
    legend.append(
      html("span", { class: "swatch none" }), " no data ",
      html("span", { class: "swatch data" }), " data sent ",
      html("span", { class: "swatch use-3" }), " more app use",
    );
    container.appendChild(legend);
    container.appendChild(html("p", { id: `${container.id}-desc`, class: "sr-only" }, `App data on ${active} of the days shown.`));
    const table = dataTable("Days with app data", [{ label: "Minutes of app use", t: days.map((d) => Date.parse(`${d[0]}T12:00:00Z`)), v: days.map((d) => d[1]) }], "min");
    container.appendChild(table);
  }

  return { lineChart, calendar, formatValue, fmtDate, DAY };
})();
