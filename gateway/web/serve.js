// "Serve N customers", the seed talk's demo, from the page: N orders
// placed through the gateway (a few in flight, so one page cannot flood
// the mesh), followed with the order list until each is final, drawn
// live, and the seed's sentence at the end.

import { ApiError, call, el, getMenu, idempotencyKey, short } from "./api.js";

const MAX_CUSTOMERS = 1000;
// A browser opens at most six HTTP/1.1 connections to one host; leave one
// for following.
const IN_FLIGHT = 4;
const SWEEP_MS = 250;
// A busy shop (429) is asked again, after a growing wait, this many times.
const MAX_ATTEMPTS = 40;

export function startServe(section) {
  const $ = (id) => section.querySelector(`#${id}`);
  const form = $("serve-form");
  let run = null;

  getMenu().then((menu) => {
    for (const item of menu.items || []) $("serve-item").append(el("option", { value: item.itemId, text: item.displayName }));
  }, () => {});

  form.addEventListener("submit", (submit) => {
    submit.preventDefault();
    $("serve-count-error").textContent = "";
    $("serve-count").removeAttribute("aria-invalid");
    const count = Number($("serve-count").value);
    if (!Number.isInteger(count) || count < 1 || count > MAX_CUSTOMERS) {
      $("serve-count-error").textContent = `customers must be a whole number from 1 to ${MAX_CUSTOMERS}`;
      $("serve-count").setAttribute("aria-invalid", "true");
      $("serve-count").focus();
      return;
    }
    serve(count, $("serve-item").value);
  });
  $("serve-stop").addEventListener("click", () => run && run.controller.abort());

  async function serve(count, itemId) {
    const menu = await getMenu().catch(() => ({ items: [] }));
    const items = itemId ? [itemId] : (menu.items || []).map((i) => i.itemId);
    if (!items.length) {
      $("serve-error").textContent = "The menu could not be loaded, so there is nothing to order.";
      return;
    }
    const controller = new AbortController();
    const me = { controller, started: performance.now(), startedAt: Date.now(), orders: new Map(), placed: 0, served: [], failed: [], busy: 0, lastBusy: "" };
    run = me;
    $("serve-start").disabled = true;
    $("serve-stop").disabled = false;
    $("serve-error").textContent = "";
    $("serve-busy-note").textContent = "";
    $("serve-result").textContent = "";
    show(me);

    let next = 0;
    const place = async () => {
      while (next < count && !controller.signal.aborted) {
        const n = ++next;
        const request = {
          idempotency_key: idempotencyKey(),
          item_id: items[Math.floor(Math.random() * items.length)],
          customer_name: `Customer ${n}`,
          card_token: "tok_visa",
        };
        for (let attempt = 0; ; attempt++) {
          try {
            const order = await call("POST", "/v1/orders", { body: request, signal: controller.signal });
            me.orders.set(order.orderId, order);
            me.placed += 1;
            break;
          } catch (error) {
            if (error.name === "AbortError") return;
            // Busy (429) or away (503/0): wait as told, then the same key
            // again, which cannot order twice.
            const busy = error instanceof ApiError && [0, 429, 503].includes(error.httpStatus);
            if (!busy || attempt >= MAX_ATTEMPTS) {
              me.failed.push({ n, reason: error.words });
              break;
            }
            me.busy += 1;
            me.lastBusy = `${error.httpStatus || "no answer"}: ${error.message}`;
            $("serve-busy-note").textContent = error.words;
            const wait = error.retryAfter !== undefined ? error.retryAfter * 1000 : Math.min(100 * 2 ** attempt, 2000);
            await sleep(wait * (0.5 + Math.random() / 2), controller.signal);
          }
        }
      }
    };
    const placing = Promise.all(Array.from({ length: Math.min(IN_FLIGHT, count) }, place));
    let placed = false;
    placing.then(() => {
      placed = true;
    });

    try {
      while (!controller.signal.aborted) {
        await sleep(SWEEP_MS, controller.signal);
        await sweep(me);
        show(me);
        const pending = [...me.orders.values()].filter((o) => !o.final).length;
        if (placed && pending === 0) break;
      }
    } catch (error) {
      if (error.name !== "AbortError") $("serve-error").textContent = `Following the orders stopped: ${error.words || error.message}`;
    }
    await placing;
    const seconds = (performance.now() - me.started) / 1000;
    const sentence = controller.signal.aborted
      ? `Stopped after ${seconds.toFixed(2)}s: ${me.served.length} of ${count} customers served`
      : `Took ${seconds.toFixed(2)}s to serve coffee to ${me.served.length} customers`;
    const failures = me.failed.length ? `; ${me.failed.length} not served (${me.failed[0].reason})` : "";
    $("serve-result").textContent = sentence + failures;
    if (me.busy) {
      $("serve-busy-note").textContent = `The shop was busy ${me.busy} times (${me.lastBusy}); each of those customers waited a moment and asked again.`;
    }
    $("serve-start").disabled = false;
    $("serve-stop").disabled = true;
    show(me);
  }

  // Reads the order list, newest first, until every order of this run
  // still brewing has been seen or the list is older than the run.
  async function sweep(me) {
    const pending = new Set([...me.orders.values()].filter((o) => !o.final).map((o) => o.orderId));
    let token = "";
    for (let page = 0; pending.size && page < 20; page++) {
      const query = new URLSearchParams({ page_size: String(MAX_CUSTOMERS) });
      if (token) query.set("page_token", token);
      const answer = await call("GET", `/v1/orders?${query}`, { signal: me.controller.signal });
      const orders = answer.orders || [];
      for (const order of orders) {
        if (!pending.has(order.orderId)) continue;
        pending.delete(order.orderId);
        const state = short(order.state, "ORDER_STATE_");
        if (state !== "READY" && state !== "FAILED" && state !== "CANCELLED") continue;
        order.final = true;
        me.orders.set(order.orderId, order);
        const latency = (Date.parse(order.updateTime) - Date.parse(order.createTime)) / 1000;
        const at = (performance.now() - me.started) / 1000;
        if (state === "READY") me.served.push({ at, latency });
        else me.failed.push({ reason: order.failureReason || state });
      }
      token = answer.nextPageToken || "";
      const oldest = orders.length ? Date.parse(orders[orders.length - 1].createTime) : 0;
      if (!token || oldest < me.startedAt - 60000) break;
    }
  }

  function show(me) {
    $("serve-placed").textContent = String(me.placed);
    $("serve-served").textContent = String(me.served.length);
    $("serve-failed").textContent = String(me.failed.length);
    $("serve-busy").textContent = String(me.busy);
    const sorted = me.served.map((s) => s.latency).sort((a, b) => a - b);
    const pick = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
    $("serve-latency").textContent = sorted.length ? `${pick(0.5).toFixed(2)} s / ${pick(0.99).toFixed(2)} s` : "–";
    chart($("serve-chart"), me);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("stopped", "AbortError"));
    }, { once: true });
  });
}

// Bars: served per second; dots: each customer's latency (right axis).
function chart(canvas, me) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 40, right: 44, top: 10, bottom: 24 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  g.clearRect(0, 0, width, height);
  const seconds = Math.max(1, Math.ceil(Math.max(0, ...me.served.map((s) => s.at), (performance.now() - me.started) / 1000)));
  const perSecond = new Array(seconds).fill(0);
  for (const s of me.served) perSecond[Math.min(seconds - 1, Math.floor(s.at))] += 1;
  const top = Math.max(1, ...perSecond);
  const slowest = Math.max(0.001, ...me.served.map((s) => s.latency));
  g.fillStyle = "#6d5a4c";
  g.font = "12px system-ui, sans-serif";
  g.fillText(String(top), 4, pad.top + 10);
  g.fillText("0", 4, pad.top + h);
  g.fillText(`${slowest.toFixed(2)}s`, width - pad.right + 4, pad.top + 10);
  g.fillText(`${seconds}s`, pad.left + w - 20, height - 6);
  g.fillText("0s", pad.left, height - 6);
  g.fillStyle = "#d9b99b";
  const bar = w / seconds;
  perSecond.forEach((n, i) => {
    const bh = (n / top) * h;
    g.fillRect(pad.left + i * bar + 1, pad.top + h - bh, Math.max(bar - 2, 1), bh);
  });
  g.fillStyle = "#8a4b1f";
  for (const s of me.served) {
    g.fillRect(pad.left + (s.at / seconds) * w - 1.5, pad.top + h - (s.latency / slowest) * h - 1.5, 3, 3);
  }
  g.strokeStyle = "#e2d6c9";
  g.strokeRect(pad.left, pad.top, w, h);
}
