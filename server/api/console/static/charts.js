// Small time-series charts on uPlot (vendored in vendor/uPlot.iife.min.js). A chart is rebuilt only when its set of
// series changes; new points go through setData, so live updates never reload or re-layout the page.

import { colorOf, fmt, h } from "./api.js";

const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000]; // whole steps only

function timeRange(xs) {
  const hi = xs.length ? xs[xs.length - 1] : Date.now() / 1000;
  return [Math.min(xs.length ? xs[0] : hi, hi - 60), hi];
}

export class TimeChart {
  constructor(el, title, { height = 120, yFormat = fmt, time = true, xLabel = "" } = {}) {
    this.el = el;
    this.height = height;
    this.yFormat = yFormat;
    this.time = time;
    this.xLabel = xLabel;
    this.labels = null;
    this.plot = null;
    el.replaceChildren(h("div", { class: "title" }, title), (this.box = h("div")));
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize({ width: this.width(), height: this.height }));
    this.resize.observe(el);
  }

  width() { return Math.max(160, this.el.clientWidth - 4); }

  // labels: series names; x: numbers (unix seconds when time); ys: one array per label, null for a gap.
  set(labels, x, ys, colors) {
    const key = JSON.stringify(labels);
    if (key !== this.labels) {
      this.labels = key;
      if (this.plot) this.plot.destroy();
      const fmtY = this.yFormat;
      this.plot = new uPlot({
        width: this.width(), height: this.height,
        scales: {
          // a time axis spans at least a minute, so one point does not stretch it over years
          // (from the data itself: for a single point uPlot hands the range function a span of its own)
          x: { time: this.time, range: this.time ? (u) => timeRange(u.data[0]) : undefined },
          // values here are rates, latencies and losses: from 0 (or the lowest point) to a little above the highest
          y: { range: (u, lo, hi) => [Math.min(0, lo ?? 0), hi > 0 ? hi * 1.15 : 1] },
        },
        legend: { show: labels.length > 0, live: false },
        cursor: { drag: { x: false, y: false } },
        axes: [{ size: 28, ...(this.time ? {} : { label: this.xLabel, labelSize: 14, incrs: STEP_INCRS }) },
               { size: 60, values: (u, vals) => vals.map((v) => fmtY(v)) }],
        series: [{}, ...labels.map((l, i) => ({
          label: l, stroke: (colors && colors[i]) || colorOf(i), width: 1.6, spanGaps: true,
          points: { show: true, size: 4 }, value: (u, v) => fmtY(v),
        }))],
      }, [x, ...ys], this.box);
    } else {
      this.plot.setData([x, ...ys]);
    }
    this.el.dataset.points = String(ys.reduce((n, s) => n + s.filter((v) => v !== null && v !== undefined).length, 0));
    this.el.dataset.series = labels.join(",");
  }

  destroy() {
    this.resize.disconnect();
    if (this.plot) this.plot.destroy();
  }
}
