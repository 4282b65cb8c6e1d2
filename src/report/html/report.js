// qsweep's report page: draws the sweep embedded in #qsweep-data as a
// scatter plot, parallel coordinates, a run table, per-run details and a
// two-run comparison. Plain DOM and SVG, no libraries: the page must work
// offline and from file://, and stay small at 10,000 runs.
"use strict";

(function () {
  const D = JSON.parse(document.getElementById("qsweep-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const C = Object.fromEntries(D.columns.map((name, i) => [name, i]));
  const runs = D.rows.map((row, i) => ({ i, row, id: row[C.run], detail: D.details[i] }));
  const byId = new Map(runs.map((r) => [r.id, r]));
  const value = (run, column) => run.row[C[column]];
  const quality = (run) => value(run, D.quality);
  const recommended = D.recommendation ? D.recommendation.run : null;
  const fp32 = byId.get("fp32");
  const PAGE = 250;

  // Okabe-Ito colours: told apart by people with any common colour blindness.
  const METHOD_COLOURS = { max: "#0072b2", mse: "#e69f00", entropy: "#009e73", percentile: "#cc79a7" };
  const colour = (run) => (value(run, "calibration") ? METHOD_COLOURS[value(run, "calibration")] || "#56b4e9" : "#000000");
  const isQat = (run) => Number(value(run, "qat_epochs")) > 0;
  const isFused = (run) => value(run, "residual_fusion") === "true";

  // ---- small DOM helpers ------------------------------------------------

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attributes || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svgEl(tag, attributes, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attributes || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // Text with `code` spans, as the Rust side writes names.
  function rich(text) {
    const span = el("span");
    String(text).split("`").forEach((part, i) => span.append(i % 2 ? el("code", {}, part) : document.createTextNode(part)));
    return span;
  }

  const fixed = (digits) => (v) => (typeof v === "number" ? v.toFixed(digits) : "");
  const FORMATS = {
    accuracy: fixed(2), accuracy_delta: (v) => (typeof v === "number" ? (v > 0 ? "+" : "") + v.toFixed(2) : ""),
    top5: fixed(2), agreement: fixed(2), logit_sqnr_db: fixed(1), validation_accuracy: fixed(2),
    latency_p50_ms: fixed(3), latency_p99_ms: fixed(3), throughput: fixed(0),
    int8_kernel_share: (v) => (typeof v === "number" ? (v * 100).toFixed(0) + "%" : ""),
    int8_flop_share: (v) => (typeof v === "number" ? (v * 100).toFixed(1) + "%" : ""),
    model_bytes: bytes, engine_bytes: bytes,
  };
  function bytes(v) {
    if (typeof v !== "number") return "";
    return v >= 1 << 20 ? (v / (1 << 20)).toFixed(1) + " MiB" : (v / 1024).toFixed(1) + " KiB";
  }
  function show(column, v) {
    if (v === null || v === undefined) return "";
    if (FORMATS[column]) return FORMATS[column](v);
    if (column.endsWith("_s") && typeof v === "number") return v.toFixed(2);
    if (column === "float_ops" || column === "float_residual_adds") return String(v).split(";").filter(Boolean).join(", ");
    return String(v);
  }
  // How a delta against fp32 reads: a gain, within the budget, a loss, a large loss.
  function deltaClass(d) {
    if (typeof d !== "number") return null;
    const budget = D.budget || 0.5;
    if (d >= 0) return "gain";
    if (d >= -budget) return "near";
    if (d >= -2) return "loss";
    return "bad";
  }

  // ---- filter state, shared by the table, the plot and the lines --------

  const filter = { text: "", status: "", ranges: {} };
  const listeners = [];
  const onFilter = (f) => listeners.push(f);
  const searchText = runs.map((r) => r.row.map((v) => (v === null ? "" : String(v))).join(" ").toLowerCase());
  function matches(run) {
    if (filter.status && value(run, "status") !== filter.status) return false;
    if (filter.text) {
      const haystack = searchText[run.i];
      if (!filter.text.split(/\s+/).every((term) => haystack.includes(term))) return false;
    }
    for (const [axis, [low, high]] of Object.entries(filter.ranges)) {
      const v = AXES_BY_NAME[axis].position(run);
      if (v === null || v < low || v > high) return false;
    }
    return true;
  }
  function refilter() {
    for (const f of listeners) f();
  }

  // ---- the page ----------------------------------------------------------

  const selection = { detail: recommended || (runs[0] && runs[0].id), a: null, b: null };

  function header() {
    const env = D.environments[0];
    const counts = {};
    for (const r of runs) counts[value(r, "status")] = (counts[value(r, "status")] || 0) + 1;
    const status = Object.entries(counts).map(([k, n]) => `${n} ${k}`).join(", ");
    const measured = env
      ? `Measured with ONNX Runtime ${env.onnxruntime} (${env.engine}, ${env.threads} threads) on ${env.machine.cpu} (${env.machine.cores} cores), ${env.test_images} test images.`
      : "Nothing has been measured yet.";
    const rec = D.recommendation
      ? el("p", { class: "recommendation", id: "recommendation" }, "★ Recommended: ",
          el("a", { href: "#details", onclick: () => selectDetail(D.recommendation.run) }, D.recommendation.run),
          `: ${D.recommendation.why}.`)
      : null;
    return el("header", {},
      el("h1", {}, D.sweep, el("span", { class: "subtitle" }, " qsweep report")),
      el("p", {}, `${runs.length} runs: ${status}. ${measured}`),
      rec,
      el("nav", {}, ["plot", "parallel", "runs", "details", "compare"].map((id) =>
        el("a", { href: "#" + id }, { plot: "Accuracy and speed", parallel: "Parallel coordinates", runs: "Runs", details: "Run details", compare: "Compare two runs" }[id]))));
  }

  // ---- accuracy against latency -------------------------------------------

  const plotState = { x: "latency", zoom: "relevant" };
  const X_AXES = {
    latency: { column: "latency_p50_ms", better: "lower", label: (env) => `latency p50 at batch ${env ? env.latency_batch : "1"} (ms)` },
    throughput: { column: "throughput", better: "higher", label: (env) => `throughput at batch ${env ? env.throughput_batch : "64"} (images/s)` },
  };

  /// Round numbers for an axis: about `count` ticks between low and high.
  function ticks(low, high, count) {
    const span = high - low || 1;
    const step0 = Math.pow(10, Math.floor(Math.log10(span / count)));
    const step = [1, 2, 5, 10].map((m) => m * step0).find((s) => span / s <= count) || step0 * 10;
    const out = [];
    for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }

  // A marker's outline as path data: a square for fp32, a triangle with
  // residual fusion, a circle without.
  function markerPath(run, x, y, size) {
    if (!value(run, "calibration")) {
      return `M${x - size},${y - size}h${2 * size}v${2 * size}h${-2 * size}Z`;
    }
    if (isFused(run)) {
      const s = size * 1.25;
      return `M${x},${y - s}L${x + s},${y + s * 0.8}L${x - s},${y + s * 0.8}Z`;
    }
    return `M${x - size},${y}a${size},${size} 0 1,0 ${2 * size},0a${size},${size} 0 1,0 ${-2 * size},0Z`;
  }
  // Filled for QAT, hollow for PTQ.
  const markerFill = (run) => (isQat(run) ? colour(run) : "#ffffff");

  function marker(run, x, y, size) {
    return svgEl("path", { d: markerPath(run, x, y, size), fill: markerFill(run), stroke: colour(run), "stroke-width": 2 });
  }

  function plot() {
    const section = el("section", { id: "plot" }, el("h2", {}, "Accuracy and speed"));
    const controls = el("div", { class: "controls" });
    const toggle = (name, options) => {
      const group = el("span", { class: "toggle", role: "group" });
      for (const [key, label] of Object.entries(options)) {
        group.append(el("button", { type: "button", "data-toggle": name, "data-value": key, "aria-pressed": String(plotState[name] === key),
          onclick: () => { plotState[name] = key; draw(); } }, label));
      }
      return group;
    };
    const env = D.environments[0];
    controls.append(
      toggle("x", { latency: `Latency, batch ${env ? env.latency_batch : 1}`, throughput: `Throughput, batch ${env ? env.throughput_batch : 64}` }),
      toggle("zoom", { relevant: "Runs that matter", all: "All runs" }));
    const frame = el("div", { class: "plot-frame" });
    const tooltip = el("div", { id: "tooltip", class: "tooltip", role: "status", hidden: true });
    const note = el("p", { class: "note", id: "plot-note" });
    section.append(controls, frame, legend(), note);
    document.body.append(tooltip);

    const W = 920, H = 520, M = { l: 64, r: 24, t: 16, b: 52 };
    function draw() {
      for (const button of controls.querySelectorAll("button")) {
        button.setAttribute("aria-pressed", String(plotState[button.dataset.toggle] === button.dataset.value));
      }
      const axis = X_AXES[plotState.x];
      const points = runs.filter((r) => value(r, "status") === "ok" && typeof value(r, axis.column) === "number" && typeof quality(r) === "number");
      const all = plotState.zoom === "all";
      // The runs that matter: within a few points of the best (the Rust
      // side's plot::relevant_from, shared with accuracy_latency.svg). A
      // run far below would squeeze them onto one line, so it goes to the edge.
      const floor = D.relevant_from === null ? -Infinity : D.relevant_from;
      const relevant = all ? points : points.filter((r) => quality(r) >= floor);
      const shown = relevant.length ? relevant : points;
      const xs = shown.map((r) => value(r, axis.column));
      let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
      let [y0, y1] = [Math.min(...shown.map(quality)), Math.max(...shown.map(quality))];
      if (fp32 && typeof quality(fp32) === "number") { y0 = Math.min(y0, quality(fp32)); y1 = Math.max(y1, quality(fp32)); }
      const xPad = (x1 - x0) * 0.08 || Math.abs(x1) * 0.1 || 1;
      const yPad = (y1 - y0) * 0.08 || 0.5;
      x0 = Math.max(0, x0 - xPad); x1 += xPad; y0 -= yPad; y1 = Math.min(100, y1 + yPad);
      if (y1 <= y0) y1 = y0 + 1;
      const sx = (v) => M.l + ((v - x0) / (x1 - x0)) * (W - M.l - M.r);
      const sy = (v) => H - M.b - ((v - y0) / (y1 - y0)) * (H - M.t - M.b);
      const clampX = (v) => Math.min(Math.max(v, x0), x1);
      const clampY = (v) => Math.min(Math.max(v, y0), y1);

      const root = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": `${D.measure} against ${axis.label(env)}` });
      const grid = svgEl("g", { class: "grid" });
      for (const t of ticks(x0, x1, 8)) {
        grid.append(svgEl("line", { x1: sx(t), x2: sx(t), y1: M.t, y2: H - M.b }), svgEl("text", { x: sx(t), y: H - M.b + 18, "text-anchor": "middle" }, t));
      }
      for (const t of ticks(y0, y1, 7)) {
        grid.append(svgEl("line", { x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t) }), svgEl("text", { x: M.l - 8, y: sy(t) + 4, "text-anchor": "end" }, t));
      }
      root.append(grid,
        svgEl("text", { class: "axis-label", x: (M.l + W - M.r) / 2, y: H - 10, "text-anchor": "middle" }, `${axis.label(env)}, ${axis.better} is better`),
        svgEl("text", { class: "axis-label", transform: `translate(16 ${(M.t + H - M.b) / 2}) rotate(-90)`, "text-anchor": "middle" }, D.measure));
      if (fp32 && typeof quality(fp32) === "number") {
        root.append(svgEl("line", { class: "reference", x1: M.l, x2: W - M.r, y1: sy(quality(fp32)), y2: sy(quality(fp32)) }),
          svgEl("text", { class: "reference-label", x: W - M.r - 4, y: sy(quality(fp32)) - 5, "text-anchor": "end" }, `fp32 ${quality(fp32).toFixed(2)}%`));
        const fx = value(fp32, axis.column);
        if (typeof fx === "number" && fx >= x0 && fx <= x1) {
          root.append(svgEl("line", { class: "reference", x1: sx(fx), x2: sx(fx), y1: M.t, y2: H - M.b }));
        }
      }
      // The Pareto front: no other run is both better on this axis and more accurate.
      const order = points.slice().sort((a, b) => (axis.better === "lower" ? 1 : -1) * (value(a, axis.column) - value(b, axis.column)) || quality(b) - quality(a));
      const front = [];
      let top = -Infinity;
      for (const r of order) if (quality(r) > top) { top = quality(r); front.push(r); }
      root.append(svgEl("polyline", { class: "front", points: front.map((r) => `${sx(clampX(value(r, axis.column)))},${sy(clampY(quality(r)))}`).join(" ") }));

      const layer = svgEl("g", { class: "points" });
      const drawn = [];
      let outside = 0;
      // Past a few thousand runs, one path per look keeps drawing fast;
      // hovering finds runs by position either way.
      const grouped = points.length > 2000;
      const groups = new Map();
      for (const r of points) {
        const [vx, vy] = [value(r, axis.column), quality(r)];
        const out = vx < x0 || vx > x1 || vy < y0 || vy > y1;
        outside += out ? 1 : 0;
        const [px, py] = [sx(clampX(vx)), sy(clampY(vy))];
        const classes = "point" + (out ? " outside" : "") + (matches(r) ? "" : " filtered-out");
        drawn.push({ run: r, x: px, y: py });
        if (grouped) {
          const key = `${classes}|${colour(r)}|${markerFill(r)}`;
          groups.set(key, (groups.get(key) || "") + markerPath(r, px, py, 5.5));
        } else {
          const shape = marker(r, px, py, 5.5);
          shape.setAttribute("class", classes);
          shape.dataset.run = r.id;
          layer.append(shape);
        }
        if (r.id === recommended) {
          layer.append(svgEl("circle", { class: "recommended-ring", cx: px, cy: py, r: 11 }));
        }
      }
      for (const [key, d] of groups) {
        const [classes, stroke, fill] = key.split("|");
        layer.append(svgEl("path", { class: classes, d, stroke, fill, "stroke-width": 2 }));
      }
      root.append(layer);
      // Runs with nearly equal results share a spot, so hovering shows
      // every run under the pointer, not only the one drawn on top.
      const under = (event) => {
        const box = root.getBoundingClientRect();
        const [x, y] = [((event.clientX - box.left) * W) / box.width, ((event.clientY - box.top) * H) / box.height];
        return drawn.filter((d) => Math.hypot(d.x - x, d.y - y) <= 8).sort((a, b) => Math.hypot(a.x - x, a.y - y) - Math.hypot(b.x - x, b.y - y));
      };
      root.addEventListener("mousemove", (event) => {
        const here = under(event).map((d) => d.run);
        if (here.length) hover(here, event);
        else tooltip.hidden = true;
      });
      root.addEventListener("mouseleave", () => { tooltip.hidden = true; });
      root.addEventListener("click", (event) => {
        const here = under(event);
        if (here.length) selectDetail(here[0].run.id, true);
      });
      frame.replaceChildren(root);
      note.textContent = outside
        ? `${outside} run(s) below ${floor.toFixed(2)}% (far from the best) or off the latency range are drawn at the edge, faded; "All runs" shows them in place.`
        : "";
    }

    const figures = (run) => {
      const delta = typeof value(run, "accuracy_delta") === "number" && run.id !== "fp32" ? ` (${show("accuracy_delta", value(run, "accuracy_delta"))})` : "";
      return `${show("accuracy", quality(run))}%${delta}, ${show("latency_p50_ms", value(run, "latency_p50_ms"))} ms, ${show("throughput", value(run, "throughput"))} images/s`;
    };
    function hover(here, event) {
      const lines = [];
      if (here.length === 1) {
        const run = here[0];
        lines.push(el("strong", {}, run.id),
          `${D.quality === "accuracy" ? "top-1" : "agreement"} ${show("accuracy", quality(run))}%` +
            (typeof value(run, "accuracy_delta") === "number" && run.id !== "fp32" ? ` (${show("accuracy_delta", value(run, "accuracy_delta"))} against fp32)` : ""),
          `latency p50 ${show("latency_p50_ms", value(run, "latency_p50_ms"))} ms, p99 ${show("latency_p99_ms", value(run, "latency_p99_ms"))} ms`,
          `throughput ${show("throughput", value(run, "throughput"))} images/s`);
        if (value(run, "int8_format")) {
          lines.push(`int8 kernels ${show("int8_kernel_share", value(run, "int8_kernel_share"))} of weighted ops; ${value(run, "qdq_pairs")} Q/DQ`);
        }
        const floats = show("float_ops", value(run, "float_ops"));
        if (floats) lines.push(`in float: ${floats}`);
        if (run.id === recommended) lines.push("★ recommended");
      } else {
        lines.push(el("strong", {}, `${here.length} runs here`));
        for (const run of here.slice(0, 12)) lines.push(el("span", {}, el("strong", {}, run.id + (run.id === recommended ? " ★" : "")), ": " + figures(run)));
        if (here.length > 12) lines.push(`and ${here.length - 12} more`);
      }
      tooltip.replaceChildren(...lines.map((line) => el("div", {}, line)));
      tooltip.hidden = false;
      tooltip.dataset.runs = here.map((r) => r.id).join(" ");
      place(event);
    }
    function place(event) {
      tooltip.style.left = `${event.pageX + 14}px`;
      tooltip.style.top = `${event.pageY + 14}px`;
    }
    onFilter(draw);
    draw();
    return section;
  }

  function legend() {
    const swatch = (build) => {
      const s = svgEl("svg", { width: 18, height: 18, viewBox: "0 0 18 18" });
      s.append(build());
      return s;
    };
    const fake = (calibration, fused, qat) => ({ row: Object.assign([], { [C.calibration]: calibration, [C.residual_fusion]: fused ? "true" : "false", [C.qat_epochs]: qat ? "1" : "0" }) });
    // Shape and fill entries are drawn in grey: they are not a method.
    const neutral = (calibration, fused, qat) => () => {
      const m = marker(fake(calibration, fused, qat), 9, 9, 5);
      m.setAttribute("stroke", "#555555");
      if (qat) m.setAttribute("fill", "#555555");
      return m;
    };
    const items = [];
    const methods = [...new Set(runs.map((r) => value(r, "calibration")).filter(Boolean))];
    for (const m of methods) items.push(el("span", { class: "legend-item" }, swatch(() => marker(fake(m, false, true), 9, 9, 5)), m));
    items.push(el("span", { class: "legend-item" }, swatch(() => marker(fake("", false, false), 9, 9, 5)), "fp32"));
    items.push(el("span", { class: "legend-item" }, swatch(neutral("none", false, false)), "circle: unfused"));
    items.push(el("span", { class: "legend-item" }, swatch(neutral("none", true, false)), "triangle: residual fusion"));
    items.push(el("span", { class: "legend-item" }, swatch(neutral("none", false, false)), "hollow: PTQ"));
    items.push(el("span", { class: "legend-item" }, swatch(neutral("none", false, true)), "filled: QAT"));
    items.push(el("span", { class: "legend-item" }, swatch(() => svgEl("line", { class: "front", x1: 1, x2: 17, y1: 9, y2: 9 })), "Pareto front"));
    items.push(el("span", { class: "legend-item" }, swatch(() => svgEl("line", { class: "reference", x1: 1, x2: 17, y1: 9, y2: 9 })), "fp32"));
    return el("div", { class: "legend" }, items);
  }

  // ---- parallel coordinates ------------------------------------------------

  function categorical(name, label, order) {
    const values = [...new Set(runs.map((r) => value(r, name)).filter((v) => v !== "" && v !== null))];
    values.sort((a, b) => (order ? order(a) - order(b) : String(a).localeCompare(String(b))));
    return { name, label, values, position: (r) => { const k = values.indexOf(value(r, name)); return k < 0 ? null : values.length > 1 ? k / (values.length - 1) : 0.5; } };
  }
  function numeric(name, label) {
    const vs = runs.map((r) => value(r, name)).filter((v) => typeof v === "number");
    const [low, high] = [Math.min(...vs), Math.max(...vs)];
    return { name, label, low, high, position: (r) => { const v = value(r, name); return typeof v !== "number" ? null : high > low ? (v - low) / (high - low) : 0.5; } };
  }
  const methodOrder = Object.keys(METHOD_COLOURS);
  const AXES = [
    categorical("calibration", "calibration", (m) => methodOrder.indexOf(m)),
    categorical("residual_fusion", "fusion"),
    categorical("qat_epochs", "QAT epochs", Number),
    categorical("float_layers", "ops in float", (v) => (v === "auto" ? 1e9 : Number(v))),
    numeric(D.quality, D.quality === "accuracy" ? "top-1 %" : "agreement %"),
    numeric("latency_p50_ms", "latency ms"),
    numeric("throughput", "images/s"),
    numeric("int8_flop_share", "int8 MACs"),
  ].filter((axis) => (axis.values ? axis.values.length > 0 : isFinite(axis.low)));
  const AXES_BY_NAME = Object.fromEntries(AXES.map((a) => [a.name, a]));

  function parallel() {
    const section = el("section", { id: "parallel" }, el("h2", {}, "Parallel coordinates"),
      el("p", { class: "note" }, "One line per run, coloured by calibration method. Drag along an axis to keep only the runs in that range (the table and the plot follow); double-click an axis to clear it."));
    const frame = el("div", { class: "plot-frame" });
    section.append(frame);
    const W = 920, H = 340, M = { l: 40, r: 40, t: 34, b: 30 };
    const ax = (k) => M.l + (k * (W - M.l - M.r)) / Math.max(1, AXES.length - 1);
    const ay = (p) => H - M.b - p * (H - M.t - M.b);
    function draw() {
      const root = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "parallel coordinates of every run" });
      const lines = svgEl("g", { class: "lines" });
      // Past a few thousand runs, one path per colour keeps drawing fast.
      const grouped = runs.length > 2000;
      const paths = {};
      for (const r of runs) {
        let d = "";
        AXES.forEach((axis, k) => {
          const p = axis.position(r);
          if (p !== null) d += `${d ? "L" : "M"}${ax(k).toFixed(1)},${ay(p).toFixed(1)}`;
        });
        if (!d) continue;
        const state = matches(r) ? colour(r) : "filtered";
        if (grouped) paths[state] = (paths[state] || "") + d;
        else lines.append(svgEl("path", { d, class: "line" + (state === "filtered" ? " filtered-out" : "") + (r.id === recommended ? " recommended" : ""), stroke: state === "filtered" ? null : state, "data-run": r.id }, svgEl("title", {}, r.id)));
      }
      for (const [state, d] of Object.entries(paths)) lines.append(svgEl("path", { d, class: "line" + (state === "filtered" ? " filtered-out" : ""), stroke: state === "filtered" ? null : state }));
      root.append(lines);
      AXES.forEach((axis, k) => {
        const g = svgEl("g", { class: "axis", "data-axis": axis.name });
        g.append(svgEl("line", { x1: ax(k), x2: ax(k), y1: M.t, y2: H - M.b }), svgEl("text", { class: "axis-title", x: ax(k), y: M.t - 14, "text-anchor": "middle" }, axis.label));
        if (axis.values) {
          axis.values.forEach((v, j) => g.append(svgEl("text", { x: ax(k) + 5, y: ay(axis.values.length > 1 ? j / (axis.values.length - 1) : 0.5) + 4 }, v)));
        } else {
          const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));
          g.append(svgEl("text", { x: ax(k) + 5, y: ay(0) + 4 }, fmt(axis.low)), svgEl("text", { x: ax(k) + 5, y: ay(1) + 4 }, fmt(axis.high)));
        }
        const range = filter.ranges[axis.name];
        if (range) g.append(svgEl("rect", { class: "brush", x: ax(k) - 8, width: 16, y: ay(range[1]), height: ay(range[0]) - ay(range[1]) }));
        const hit = svgEl("rect", { class: "axis-hit", x: ax(k) - 12, width: 24, y: M.t, height: H - M.t - M.b });
        brushable(hit, axis, root);
        g.append(hit);
        root.append(g);
      });
      frame.replaceChildren(root);
    }
    function brushable(hit, axis, root) {
      const toP = (event) => {
        const box = root.getBoundingClientRect();
        const y = ((event.clientY - box.top) / box.height) * H;
        return Math.min(1, Math.max(0, (H - M.b - y) / (H - M.t - M.b)));
      };
      hit.addEventListener("pointerdown", (event) => {
        const start = toP(event);
        hit.setPointerCapture(event.pointerId);
        const move = (e) => {
          const p = toP(e);
          filter.ranges[axis.name] = [Math.min(start, p) - 1e-9, Math.max(start, p) + 1e-9];
        };
        const up = (e) => {
          move(e);
          hit.removeEventListener("pointermove", move);
          hit.removeEventListener("pointerup", up);
          const [low, high] = filter.ranges[axis.name];
          if (high - low < 0.01) delete filter.ranges[axis.name];
          refilter();
        };
        hit.addEventListener("pointermove", move);
        hit.addEventListener("pointerup", up);
      });
      hit.addEventListener("dblclick", () => { delete filter.ranges[axis.name]; refilter(); });
    }
    onFilter(draw);
    draw();
    return section;
  }

  // ---- the run table ---------------------------------------------------------

  function table() {
    const section = el("section", { id: "runs" }, el("h2", {}, "Runs"));
    const text = el("input", { id: "filter", type: "search", placeholder: "Filter: words that every shown run contains, e.g. entropy fused", "aria-label": "filter runs", size: 48 });
    const status = el("select", { id: "status-filter", "aria-label": "status" }, el("option", { value: "" }, "any status"),
      ...["ok", "failed", "pending"].map((s) => el("option", { value: s }, s)));
    const clear = el("button", { type: "button", id: "clear-filters" }, "Clear filters");
    const shown = el("span", { id: "shown", class: "note" });
    section.append(el("div", { class: "controls" }, text, status, clear, shown));
    text.addEventListener("input", () => { filter.text = text.value.trim().toLowerCase(); limit = PAGE; refilter(); });
    status.addEventListener("change", () => { filter.status = status.value; limit = PAGE; refilter(); });
    clear.addEventListener("click", () => { filter.text = ""; filter.status = ""; filter.ranges = {}; text.value = ""; status.value = ""; refilter(); });

    const numericColumn = (column) => runs.some((r) => typeof value(r, column) === "number");
    const sort = { column: null, descending: false };
    const head = el("tr", {}, el("th", { class: "compare-column", title: "tick two runs to compare them" }, "compare"),
      D.columns.map((column) => el("th", { "data-column": column, "aria-sort": "none", tabindex: 0, title: "sort by " + column }, column)));
    const body = el("tbody");
    const more = el("button", { type: "button", id: "show-more", hidden: true }, "");
    const wrapper = el("div", { class: "table-wrapper" }, el("table", { id: "runs-table" }, el("thead", {}, head), body));
    section.append(wrapper, more);
    let limit = PAGE;
    more.addEventListener("click", () => { limit = Infinity; render(); });
    head.addEventListener("click", (event) => {
      const th = event.target.closest("th[data-column]");
      if (!th) return;
      const column = th.dataset.column;
      sort.descending = sort.column === column ? !sort.descending : false;
      sort.column = column;
      for (const cell of head.children) cell.setAttribute && cell.dataset.column && cell.setAttribute("aria-sort", cell.dataset.column === column ? (sort.descending ? "descending" : "ascending") : "none");
      render();
    });

    function ordered() {
      const list = runs.filter(matches);
      if (sort.column === null) return list;
      const column = sort.column;
      const asNumber = numericColumn(column);
      const sign = sort.descending ? -1 : 1;
      return list.sort((a, b) => {
        const [va, vb] = [value(a, column), value(b, column)];
        const [ea, eb] = [va === null || va === "", vb === null || vb === ""];
        if (ea || eb) return ea - eb || a.i - b.i; // blanks last, whichever way
        const c = asNumber ? va - vb : String(va).localeCompare(String(vb), undefined, { numeric: true });
        return sign * c || a.i - b.i;
      });
    }
    function row(run) {
      const cells = D.columns.map((column) => {
        const v = value(run, column);
        const attributes = { "data-column": column };
        if (column === "accuracy_delta" && run.id !== "fp32") attributes.class = deltaClass(v);
        if (column === "status") attributes.class = "status-" + v;
        if (typeof v === "number") attributes.title = String(v);
        if (column === "run") {
          return el("td", attributes, run.id === recommended ? el("span", { class: "star", title: "recommended: " + D.recommendation.why }, "★ ") : null,
            el("a", { href: "#details", onclick: () => selectDetail(run.id) }, run.id));
        }
        if (column === "error" && v) return el("td", { ...attributes, class: "error" }, v);
        return el("td", attributes, show(column, v));
      });
      const tick = el("input", { type: "checkbox", class: "compare-tick", "aria-label": "compare " + run.id, checked: selection.a === run.id || selection.b === run.id });
      tick.addEventListener("change", () => pickForComparison(run.id, tick.checked));
      return el("tr", { "data-run": run.id, class: run.id === recommended ? "recommended" : null }, el("td", { class: "compare-column" }, tick), cells);
    }
    function render() {
      const list = ordered();
      const page = list.slice(0, limit);
      body.replaceChildren(...page.map(row));
      shown.textContent = `${list.length} of ${runs.length} runs` + (page.length < list.length ? `, first ${page.length} shown` : "");
      more.hidden = page.length >= list.length;
      more.textContent = `Show all ${list.length} runs`;
    }
    onFilter(render);
    onComparison(render);
    render();
    return section;
  }

  // ---- per-run details --------------------------------------------------------

  // Every run as <option>s, written once as markup: 10,000 of them built
  // node by node, three times over, took longer than the rest of the page.
  let optionsMarkup = null;
  function runOptions() {
    const escape = (t) => t.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/"/g, "&quot;");
    optionsMarkup = optionsMarkup || runs.map((r) => `<option value="${escape(r.id)}">${escape(r.id)}</option>`).join("");
    return optionsMarkup;
  }

  const STAGE_COLOURS = { train: "#8c564b", "prepare-data": "#7f7f7f", calibrate: "#1f77b4", sensitivity: "#9467bd", fallback: "#bcbd22", "learning-rate": "#e377c2", qat: "#d62728", build: "#ff7f0e", evaluate: "#2ca02c" };
  const STATE_WORDS = { ran: "ran in the last run", cached: "cached: made by an earlier run", failed: "failed", pending: "not run yet" };

  function details() {
    const section = el("section", { id: "details" }, el("h2", {}, "Run details"));
    const pick = el("select", { id: "detail-run", "aria-label": "run to show" });
    pick.innerHTML = runOptions();
    const body = el("div", { id: "detail" });
    section.append(el("div", { class: "controls" }, el("label", {}, "Run ", pick)), body);
    pick.addEventListener("change", () => selectDetail(pick.value));
    function draw() {
      const run = byId.get(selection.detail);
      if (!run) { body.replaceChildren(el("p", {}, "No runs.")); return; }
      pick.value = run.id;
      body.replaceChildren(...runDetail(run));
    }
    onDetail(draw);
    draw();
    return section;
  }

  function runDetail(run) {
    const out = [];
    const v = (c) => value(run, c);
    const headline = [`status ${v("status")}`];
    if (typeof quality(run) === "number") headline.push(`${D.quality === "accuracy" ? "top-1" : "agreement"} ${show("accuracy", quality(run))}%` + (run.id !== "fp32" && typeof v("accuracy_delta") === "number" ? ` (${show("accuracy_delta", v("accuracy_delta"))})` : ""));
    if (typeof v("latency_p50_ms") === "number") headline.push(`${show("latency_p50_ms", v("latency_p50_ms"))} ms p50`, `${show("throughput", v("throughput"))} images/s`);
    out.push(el("h3", {}, run.id, run.id === recommended ? el("span", { class: "star" }, " ★ recommended") : null), el("p", { class: "headline" }, headline.join(" · ")));
    if (v("error")) out.push(el("p", { class: "error" }, v("error")));

    // Stage timeline.
    const tasks = run.detail.tasks.map((k) => D.tasks[k]);
    const total = tasks.reduce((s, t) => s + (t[2] || 0), 0);
    const W = 880, barH = 26;
    const timeline = svgEl("svg", { class: "timeline", viewBox: `0 0 ${W} ${barH + 4}`, width: W, height: barH + 4, role: "img", "aria-label": "stage timeline" });
    let x = 0;
    for (const [stage, key, elapsed, state, shared] of tasks) {
      const w = total > 0 ? Math.max(3, ((elapsed || 0) / total) * W) : W / tasks.length;
      timeline.append(svgEl("rect", { x, y: 2, width: Math.max(1, w - 1), height: barH, fill: STAGE_COLOURS[stage] || "#999", class: "stage state-" + state },
        svgEl("title", {}, `${stage} ${key}: ${typeof elapsed === "number" ? elapsed.toFixed(2) + " s" : "-"}, ${STATE_WORDS[state]}${shared > 1 ? `, shared by ${shared} runs` : ""}`)));
      if (w > 70) timeline.append(svgEl("text", { x: x + 5, y: barH - 6, class: "stage-label" }, stage));
      x += w;
    }
    out.push(el("h4", {}, "Stages"), timeline, el("p", { class: "note" }, rich("Width is time; faded stages were cached, made by an earlier `qsweep run`.")),
      tableOf(["stage", "key", "time", "state", "shared by"], tasks.map(([stage, key, elapsed, state, shared]) => [
        stage, key, typeof elapsed === "number" ? elapsed.toFixed(2) + " s" : "-", STATE_WORDS[state], shared > 1 ? `${shared} runs` : "this run"]), "stages-table"));

    // Int8 coverage.
    if (v("int8_format")) {
      const bar = (share) => el("span", { class: "share" }, el("span", { class: "share-fill", style: `width:${(share || 0) * 100}%` }));
      out.push(el("h4", {}, "Int8 coverage"), tableOf(["", ""], [
        ["format", v("int8_format")],
        ["Q/DQ pairs in the model", String(v("qdq_pairs"))],
        ["weighted ops on int8 kernels", el("span", {}, bar(v("int8_kernel_share")), " ", show("int8_kernel_share", v("int8_kernel_share")))],
        ["multiply-adds on int8 kernels", el("span", {}, bar(v("int8_flop_share")), " ", show("int8_flop_share", v("int8_flop_share")))],
        ["residual Adds in float", show("float_residual_adds", v("float_residual_adds")) || "none"],
        ["ops left in float (float_layers " + v("float_layers") + ")", show("float_ops", v("float_ops")) || "none"],
      ], "coverage-table"));
    }

    const ranking = run.detail.ranking !== null && run.detail.ranking !== undefined ? D.rankings[run.detail.ranking] : null;
    if (ranking) out.push(el("h4", {}, `What costs accuracy (${ranking.title})`), sensitivityChart(ranking.ranking));
    const search = run.detail.search !== null && run.detail.search !== undefined ? D.searches[run.detail.search] : null;
    if (search) out.push(el("h4", {}, `Ops left in float until validation top-1 is within ${search.accuracy_budget} points`), searchTable(search));
    if (run.detail.qat) out.push(el("h4", {}, "QAT validation by epoch"), ...qatCurve(run.detail.qat));
    const health = run.detail.health !== null && run.detail.health !== undefined ? D.healths[run.detail.health] : null;
    if (health) {
      out.push(el("h4", {}, health.title), el("p", {}, health.line));
      out.push(health.findings.length ? el("ul", { class: "findings" }, health.findings.map((f) => el("li", {}, rich(f)))) : el("p", {}, "Nothing crosses a threshold."));
      if (health.rows.length) out.push(el("details", {}, el("summary", {}, `every quantized tensor (${health.rows.length})`), tableOf(health.columns, health.rows.map((r) => r.map(rich)), "health-table")));
    }
    const env = run.detail.environment !== null && run.detail.environment !== undefined ? D.environments[run.detail.environment] : null;
    if (env) {
      out.push(el("h4", {}, "Measured on"), tableOf(["", ""], [
        ["engine", `${env.engine} (ONNX Runtime ${env.onnxruntime}, ${env.threads} threads)`],
        ["machine", `${env.machine.cpu}, ${env.machine.cores} cores, ${env.machine.os}, host ${env.machine.host}`],
        ["latency", `batch ${env.latency_batch}; throughput at batch ${env.throughput_batch}`],
        ["test images", String(env.test_images)],
      ], "environment-table"));
    }
    return out;
  }

  function sensitivityChart(ranking) {
    const rows = ranking.ops.slice(0, 12);
    const gain = (op) => Math.max(0, ranking.quantized.kl - op.restored.kl);
    const widest = Math.max(1e-12, ...rows.map(gain));
    const W = 880, left = 330, rowH = 22;
    const chart = svgEl("svg", { class: "sensitivity", viewBox: `0 0 ${W} ${rows.length * rowH + 8}`, width: W, height: rows.length * rowH + 8, role: "img", "aria-label": "sensitivity ranking" });
    rows.forEach((op, k) => {
      const y = 4 + k * rowH;
      const w = (gain(op) / widest) * (W - left - 270);
      chart.append(svgEl("text", { x: left - 8, y: y + 15, "text-anchor": "end" }, op.name.length > 46 ? "…" + op.name.slice(-45) : op.name, svgEl("title", {}, op.name)),
        svgEl("rect", { x: left, y: y + 3, width: Math.max(1, w), height: rowH - 6, class: "bar" }),
        svgEl("text", { x: left + w + 6, y: y + 15 }, `KL ${ranking.quantized.kl.toPrecision(3)} → ${op.restored.kl.toPrecision(2)}, ${(op.restored.agreement * 100).toFixed(1)}% agree`));
    });
    return el("div", {}, el("p", { class: "note" }, `Everything quantized: ${(ranking.quantized.agreement * 100).toFixed(1)}% top-1 agreement with fp32 on ${ranking.samples} images, KL ${ranking.quantized.kl.toPrecision(3)}. Each bar: the KL taken away by restoring that op (and any sharing its Q/DQ pair) to float.`), chart);
  }

  // Validation top-1 by epoch (0 is the PTQ start), the kept epoch ringed,
  // then the same points as a table with loss and learning rate.
  function qatCurve(qat) {
    const W = 560, H = 220, left = 56, right = 16, top = 12, bottom = 34;
    const tops = qat.curve.map((p) => p.top1);
    const low = Math.min(...tops), high = Math.max(...tops), pad = Math.max(0.2, (high - low) * 0.15);
    const last = Math.max(1, qat.curve.length - 1);
    const px = (epoch) => left + (epoch / last) * (W - left - right);
    const py = (top1) => top + (1 - (top1 - (low - pad)) / (high - low + 2 * pad)) * (H - top - bottom);
    const chart = svgEl("svg", { class: "qat-curve", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "QAT validation curve" });
    for (const t of ticks(low - pad, high + pad, 4)) {
      chart.append(svgEl("line", { x1: left, x2: W - right, y1: py(t), y2: py(t), class: "grid" }), svgEl("text", { x: left - 6, y: py(t) + 4, "text-anchor": "end", class: "tick" }, t.toFixed(2)));
    }
    for (const p of qat.curve) chart.append(svgEl("text", { x: px(p.epoch), y: H - bottom + 16, "text-anchor": "middle", class: "tick" }, String(p.epoch)));
    chart.append(svgEl("text", { x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, "epoch (0 = PTQ start)"));
    chart.append(svgEl("polyline", { points: qat.curve.map((p) => `${px(p.epoch)},${py(p.top1)}`).join(" "), class: "qat-line" }));
    for (const p of qat.curve) {
      const kept = p.epoch === qat.kept_epoch;
      chart.append(svgEl("circle", { cx: px(p.epoch), cy: py(p.top1), r: kept ? 7 : 3.5, class: kept ? "qat-kept" : "qat-point" },
        svgEl("title", {}, `epoch ${p.epoch}: validation top-1 ${p.top1.toFixed(2)}%, loss ${p.loss.toFixed(4)}${kept ? " (kept)" : ""}`)));
    }
    const how = `Learning rate ${qat.learning_rate.toExponential()} (${qat.chosen_by}); augmentation: ${qat.augment.length ? qat.augment.join(", ") : "none"}; ${qat.validation_samples} validation images; keeps the ${qat.select} epoch.`;
    const note = qat.returned_start
      ? `No epoch beat the PTQ start's validation top-1 by more than noise (McNemar's test), so this run built its PTQ model unchanged (epoch 0).`
      : `Kept epoch ${qat.kept_epoch}.`;
    const diverged = qat.diverged
      ? ` Its training loss stopped being finite at epoch ${qat.diverged.epoch}, step ${qat.diverged.step}, so it stopped there and built the epoch it had kept; set a lower fixed learning rate.`
      : "";
    return [el("p", { class: "note qat-note" }, how + " " + note + diverged), chart,
      tableOf(["epoch", "validation top-1", "validation loss", "learning rate"], qat.curve.map((p) => [
        String(p.epoch) + (p.epoch === qat.kept_epoch ? " (kept)" : ""), p.top1.toFixed(2) + "%", p.loss.toFixed(4), p.learning_rate.toExponential(2)]), "qat-table")];
  }

  function searchTable(search) {
    return tableOf(["ops in float", "validation top-1", "test top-1", "latency p50 (CPU, batch 1)", "within budget"], search.steps.map((step, k) => [
      (step.float_ops.length ? step.float_ops.join(", ") : "none") + (k === search.chosen ? " (chosen)" : ""),
      step.validation_top1.toFixed(2) + "%", typeof step.test_top1 === "number" ? step.test_top1.toFixed(2) + "%" : "-",
      step.latency_ms.toFixed(3) + " ms", step.within_budget ? "yes" : "no"]), "search-table");
  }

  function tableOf(headings, rows, id) {
    return el("table", { class: "small", id }, headings.some(Boolean) ? el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))) : null,
      el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c))))));
  }

  // ---- two-run comparison -----------------------------------------------------

  // B - A in the column's own format, signed.
  function difference(column, diff) {
    if (diff === null) return "";
    const text = FORMATS[column] ? FORMATS[column](diff) : +diff.toPrecision(3) + "";
    return diff > 0 && !text.startsWith("+") ? "+" + text : text;
  }

  function comparison() {
    const section = el("section", { id: "compare" }, el("h2", {}, "Compare two runs"),
      el("p", { class: "note" }, "Pick two runs here or tick them in the table. Rows where they differ are marked."));
    const a = el("select", { id: "compare-a", "aria-label": "first run" });
    const b = el("select", { id: "compare-b", "aria-label": "second run" });
    a.innerHTML = b.innerHTML = runOptions();
    const out = el("div", { id: "comparison" });
    section.append(el("div", { class: "controls" }, el("label", {}, "A ", a), el("label", {}, "B ", b)), out);
    a.addEventListener("change", () => { selection.a = a.value; comparisonChanged(); });
    b.addEventListener("change", () => { selection.b = b.value; comparisonChanged(); });
    function draw() {
      const [ra, rb] = [byId.get(selection.a), byId.get(selection.b)];
      if (!ra || !rb) { out.replaceChildren(); return; }
      a.value = ra.id; b.value = rb.id;
      const rows = D.columns.map((column) => {
        const [va, vb] = [value(ra, column), value(rb, column)];
        const differs = String(va) !== String(vb);
        const diff = typeof va === "number" && typeof vb === "number" && column !== "run" ? vb - va : null;
        return el("tr", { class: differs ? "differs" : null, "data-column": column }, el("th", {}, column), el("td", {}, show(column, va)), el("td", {}, show(column, vb)),
          el("td", {}, difference(column, diff)));
      });
      out.replaceChildren(el("table", { class: "small", id: "compare-table" },
        el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", { "data-side": "a" }, ra.id), el("th", { "data-side": "b" }, rb.id), el("th", {}, "B − A"))),
        el("tbody", {}, rows)));
    }
    onComparison(draw);
    draw();
    return section;
  }

  // ---- selection -----------------------------------------------------------------

  const detailListeners = [];
  const comparisonListeners = [];
  const onDetail = (f) => detailListeners.push(f);
  const onComparison = (f) => comparisonListeners.push(f);
  function selectDetail(id, scroll) {
    selection.detail = id;
    for (const f of detailListeners) f();
    if (scroll) document.getElementById("details").scrollIntoView();
  }
  // Ticking a run makes it B and the previous B becomes A, so the two
  // latest ticks are compared.
  function pickForComparison(id, picked) {
    if (picked) { if (selection.b !== id) { selection.a = selection.b; selection.b = id; } }
    else if (selection.b === id) { selection.b = selection.a; selection.a = null; }
    else if (selection.a === id) selection.a = null;
    comparisonChanged();
  }
  function comparisonChanged() {
    for (const f of comparisonListeners) f();
  }
  selection.a = fp32 ? "fp32" : runs[0] && runs[0].id;
  selection.b = recommended && recommended !== selection.a ? recommended : runs[1] && runs[1].id;

  // Each view's drawing time, which the benchmark reports.
  const sections = {};
  const timed = (name, build) => {
    const started = performance.now();
    const section = build();
    sections[name] = Math.round(performance.now() - started);
    return section;
  };
  const scriptStarted = performance.now();
  document.body.append(timed("header", header), timed("plot", plot), timed("parallel", parallel), timed("table", table),
    timed("details", details), timed("compare", comparison),
    el("footer", {}, rich("Written by qsweep from the results directory; `qsweep report DIR` writes it again. runs.csv, runs.jsonl and summary.md hold the same results as text.")));
  window.qsweepReport = { readyMs: performance.now(), scriptStartedMs: scriptStarted, sections, runs: runs.length };
  document.documentElement.dataset.ready = "true";
})();
