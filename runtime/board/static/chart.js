// kubetune board: a small SVG line chart (loss, eval loss, learning rate over steps). No library:
// a linear scale on each axis, a few ticks, one <path> per series.
"use strict";
const chart = (() => {
  const NS = "http://www.w3.org/2000/svg";

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return ticks;
  }

  function label(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 10000 || a < 1e-3) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  /**
   * Draw `series` ([{key, title, points: [[x, y], ...]}]) into `svg` (an <svg> element), replacing
   * what was there. The svg gets data-points (the first series' point count) for tests.
   */
  function draw(svg, series, {width = 640, height = 240, xTitle = "step"} = {}) {
    const m = {left: 52, right: 14, top: 10, bottom: 30};
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren();
    const all = series.flatMap((s) => s.points);
    svg.dataset.points = String(series.length ? series[0].points.length : 0);
    for (const s of series) svg.dataset[`points_${s.key}`] = String(s.points.length);
    if (!all.length) {
      svg.append(svgEl("text", {x: width / 2, y: height / 2, "text-anchor": "middle", class: "tick"}, "no points yet"));
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.06;
    y0 = y0 >= 0 && y0 - pad < 0 ? 0 : y0 - pad;
    y1 += pad;
    const X = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
    const Y = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);

    for (const t of niceTicks(y0, y1, 4)) {
      svg.append(svgEl("line", {class: "gridline", x1: m.left, x2: width - m.right, y1: Y(t), y2: Y(t)}));
      svg.append(svgEl("text", {class: "tick", x: m.left - 6, y: Y(t) + 3.5, "text-anchor": "end"}, label(t)));
    }
    for (const t of niceTicks(x0, x1, 6)) {
      svg.append(svgEl("text", {class: "tick", x: X(t), y: height - m.bottom + 15, "text-anchor": "middle"}, label(t)));
    }
    svg.append(svgEl("line", {class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: height - m.bottom}));
    svg.append(svgEl("line", {class: "axis", x1: m.left, x2: width - m.right, y1: height - m.bottom, y2: height - m.bottom}));
    svg.append(svgEl("text", {class: "tick", x: width - m.right, y: height - 3, "text-anchor": "end"}, xTitle));

    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
      const path = svgEl("path", {class: `series-${s.key}`, d});
      path.dataset.series = s.key;
      path.dataset.count = String(s.points.length);
      svg.append(path);
      if (s.points.length < 40 || s.key === "eval_loss") {
        for (const p of s.points) {
          const dot = svgEl("circle", {cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2.4, class: `dot-${s.key}`,
            fill: "currentColor"});
          dot.append(svgEl("title", {}, `${s.title} at ${xTitle} ${p[0]}: ${label(p[1])}`));
          svg.append(dot);
        }
      }
    }
  }

  return {draw};
})();
