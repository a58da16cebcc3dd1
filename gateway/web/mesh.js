// The mesh view: every process the gateway's /mesh lists — from the
// registry, healthy or not, plus the registry replicas and the gateway —
// refreshed every second while the view is shown. /mesh gives cumulative
// counters; rates, error shares and p99 here are over the last refresh.
// An instance that leaves the registry's list stays a while as GONE, so
// its going is seen.

import { call, el } from "./api.js";

const EVERY_MS = 1000;
const KEEP_GONE_MS = 30000;

// The q-quantile of a histogram's increase, interpolated inside the
// bucket as Prometheus's histogram_quantile does; null without requests.
export function quantile(q, before, after) {
  const buckets = after.map(([bound, count], i) => [bound, count - (before[i] ? before[i][1] : 0)]);
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [bound, count] of buckets) {
    if (count >= rank) {
      if (bound === null) return lower;
      return lower + ((bound - lower) * (rank - below)) / Math.max(count - below, 1);
    }
    if (bound !== null) lower = bound;
    below = count;
  }
  return lower;
}

function sameBounds(a, b) {
  return a.length === b.length && a.every(([bound], i) => bound === b[i][0]);
}

export function startMesh(section) {
  const $ = (id) => section.querySelector(`#${id}`);
  const previous = new Map(); // key → {timeMs, metrics}
  const gone = new Map(); // key → {process, since}
  let timer = null;
  let inFlight = false;

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const mesh = await call("GET", "/mesh");
      $("mesh-error").textContent = mesh.registryError ? `The registry's list is missing: ${mesh.registryError}` : "";
      render(mesh);
    } catch (error) {
      $("mesh-error").textContent = `The gateway did not answer: ${error.words}`;
    } finally {
      inFlight = false;
    }
  }

  function render(mesh) {
    const seen = new Set();
    const rows = [];
    for (const process of mesh.instances) {
      const key = `${process.service}/${process.instanceId}`;
      seen.add(key);
      gone.delete(key);
      rows.push(row(process, figures(key, mesh.timeMs, process)));
    }
    for (const [key, was] of previous) {
      if (!seen.has(key) && !gone.has(key)) gone.set(key, { process: was.process, since: mesh.timeMs });
    }
    for (const [key, { process, since }] of gone) {
      if (mesh.timeMs - since > KEEP_GONE_MS) {
        gone.delete(key);
        previous.delete(key);
        continue;
      }
      rows.push(row({ ...process, health: "GONE" }, { rate: "–", errors: "–", p99: "–" }, "left the registry"));
    }
    rows.sort((a, b) => a.dataset.key.localeCompare(b.dataset.key));
    $("mesh-rows").replaceChildren(...rows);
    $("mesh-when").textContent = `Updated ${new Date(mesh.timeMs).toLocaleTimeString()}.`;
  }

  function figures(key, timeMs, process) {
    const before = previous.get(key);
    previous.set(key, { timeMs, metrics: process.metrics, process });
    if (!process.metrics) return { rate: "–", errors: "–", p99: "–", why: process.metricsError };
    if (!before || !before.metrics || timeMs <= before.timeMs) return { rate: "…", errors: "…", p99: "…" };
    const seconds = (timeMs - before.timeMs) / 1000;
    const requests = process.metrics.requests - before.metrics.requests;
    const errors = process.metrics.errors - before.metrics.errors;
    if (requests < 0) return { rate: "…", errors: "…", p99: "…" }; // restarted
    const latency = sameBounds(before.metrics.latency, process.metrics.latency)
      ? quantile(0.99, before.metrics.latency, process.metrics.latency)
      : null;
    return {
      rate: (requests / seconds).toFixed(1),
      errors: requests ? `${((100 * errors) / requests).toFixed(1)} %` : "0 %",
      p99: latency === null ? "–" : latency < 1 ? `${(latency * 1000).toFixed(1)} ms` : `${latency.toFixed(2)} s`,
    };
  }

  function row(process, f, note) {
    const health = el("td", { class: `health-${process.health}`, text: process.health });
    if (note || f.why) health.append(el("br"), el("small", { text: note || `metrics: ${f.why}` }));
    const tr = el("tr", {},
      el("td", { text: process.service }),
      el("th", { scope: "row", text: process.instanceId }),
      el("td", {}, el("code", { text: process.address })),
      el("td", { text: process.zone || "–" }),
      health,
      el("td", { class: "num", text: f.rate }),
      el("td", { class: "num", text: f.errors }),
      el("td", { class: "num", text: f.p99 }));
    tr.dataset.key = `${process.service}/${process.instanceId}`;
    tr.dataset.health = process.health;
    return tr;
  }

  return {
    show() {
      refresh();
      if (!timer) timer = setInterval(refresh, EVERY_MS);
    },
    hide() {
      clearInterval(timer);
      timer = null;
    },
  };
}
