// The order view: the menu, the form, then the order being made, live:
// each event as it happens, espresso and milk side by side on a timeline,
// the payment's state, the trace id (and a link to Jaeger when the
// gateway knows where it is), and a cancel button while it brews.

import {
  FINAL, call, clearViolations, el, getConfig, getMenu, idempotencyKey, money, newTrace,
  short, showViolations, watchOrder,
} from "./api.js";

const WORDS = {
  ACCEPTED: "Order accepted",
  BREWING_STARTED: "Brewing started",
  PAYMENT_AUTHORIZED: "Payment authorized",
  PAYMENT_DECLINED: "Payment declined",
  ESPRESSO_STARTED: "Espresso started",
  ESPRESSO_DONE: "Espresso done",
  MILK_STARTED: "Milk steaming started",
  MILK_DONE: "Milk done",
  BREWING_FAILED: "Brewing failed",
  PAYMENT_CAPTURED: "Payment captured",
  PAYMENT_CAPTURE_REFUSED: "Capture refused",
  PAYMENT_VOIDED: "Payment voided",
  CANCEL_REQUESTED: "Cancel requested",
  RESUMED: "Taken over by another barista",
  READY: "Ready",
  FAILED: "Failed",
  CANCELLED: "Cancelled",
};

export function startOrder(section) {
  const $ = (id) => section.querySelector(`#${id}`);
  const form = $("order-form");
  let current = null;

  getMenu().then(
    (menu) => {
      const list = $("menu");
      list.replaceChildren();
      (menu.items || []).forEach((item, i) => {
        const id = `item-${item.itemId}`;
        const input = el("input", { type: "radio", name: "item_id", id, value: item.itemId });
        if (i === 0) input.checked = true;
        list.append(
          el("div", { class: "menu-item" },
            input,
            el("label", { for: id }, el("span", { text: item.displayName }), " ", el("small", { text: item.description })),
            el("span", { class: "price", text: money(item.price) })),
        );
      });
    },
    (error) => {
      $("menu").replaceChildren(el("p", { class: "error", text: `The menu could not be loaded: ${error.words}` }));
    },
  );

  form.addEventListener("submit", async (submit) => {
    submit.preventDefault();
    clearViolations(form);
    $("order-error").textContent = "";
    const data = new FormData(form);
    const trace = newTrace();
    const request = {
      idempotency_key: idempotencyKey(),
      item_id: data.get("item_id") || "",
      customer_name: (data.get("customer_name") || "").trim(),
      card_token: data.get("card_token") || "",
    };
    $("place").disabled = true;
    try {
      const order = await call("POST", "/v1/orders", { body: request, headers: { traceparent: trace.traceparent } });
      follow(order, trace.traceId);
    } catch (error) {
      showViolations(form, error, $("order-error"));
    } finally {
      $("place").disabled = false;
    }
  });

  $("again").addEventListener("click", () => {
    if (current) current.stop();
    current = null;
    $("progress").hidden = true;
    form.hidden = false;
    $("customer_name").focus();
  });

  $("cancel").addEventListener("click", async () => {
    if (!current) return;
    $("cancel-error").textContent = "";
    $("cancel").disabled = true;
    try {
      await call("POST", `/v1/orders/${encodeURIComponent(current.orderId)}:cancel`, {
        body: { reason: "cancelled from the web page" },
      });
    } catch (error) {
      $("cancel-error").textContent = error.words;
      $("cancel").disabled = current.final;
    }
  });

  function follow(order, traceId) {
    form.hidden = true;
    $("progress").hidden = false;
    $("order-id").textContent = order.orderId;
    $("trace-id").textContent = traceId;
    $("events").replaceChildren();
    $("cancel-error").textContent = "";
    $("cancel").disabled = false;
    $("payment-state").textContent = "none yet";
    $("payment-state").className = "";
    $("payment-id").textContent = "";
    setState(order);
    getConfig().then((config) => {
      const link = $("trace-link");
      link.hidden = !config.jaegerUrl;
      if (config.jaegerUrl) link.href = `${config.jaegerUrl}/trace/${traceId}`;
    });

    const events = [];
    const run = { orderId: order.orderId, final: FINAL.has(order.state), stop: () => {} };
    current = run;
    const timer = setInterval(() => draw(events, run.final), 200);
    const watch = watchOrder(order.orderId, {
      onEvent(event) {
        if (current !== run) return;
        events.push(event);
        const type = short(event.type, "ORDER_EVENT_TYPE_");
        const at = (Date.parse(event.time) - Date.parse(events[0].time)) / 1000;
        $("events").append(
          el("li", {}, el("time", { datetime: event.time, text: `+${at.toFixed(2)} s` }), " ",
            WORDS[type] || type, event.detail ? ` — ${event.detail}` : ""),
        );
        setState({ state: event.state, failureReason: type === "FAILED" || type === "PAYMENT_DECLINED" ? event.detail : "" });
        if (FINAL.has(event.state)) run.final = true;
        if (type.startsWith("PAYMENT_") || run.final) refreshPayment(order.orderId, run);
        $("cancel").disabled = run.final || type === "CANCEL_REQUESTED";
        draw(events, run.final);
      },
      onError(error) {
        if (current === run) $("cancel-error").textContent = `Following the order stopped: ${error.words}`;
      },
    });
    run.stop = () => {
      watch.close();
      clearInterval(timer);
    };
  }

  function setState(order) {
    const state = short(order.state, "ORDER_STATE_");
    $("order-state").textContent = state;
    $("order-state").className = `state-${state}`;
    if (order.failureReason) $("order-reason").textContent = `— ${order.failureReason}`;
    else if (state !== "FAILED") $("order-reason").textContent = "";
  }

  async function refreshPayment(orderId, run) {
    try {
      const order = await call("GET", `/v1/orders/${encodeURIComponent(orderId)}`);
      if (order.failureReason) setState(order);
      if (!order.paymentId || current !== run) return;
      const payment = await call("GET", `/v1/payments/${encodeURIComponent(order.paymentId)}`);
      if (current !== run) return;
      const state = short(payment.state, "PAYMENT_STATE_");
      $("payment-state").textContent = state;
      $("payment-state").className = `state-${state}`;
      $("payment-id").textContent = payment.paymentId;
    } catch (error) {
      if (current === run) $("payment-state").textContent = `unknown (${error.words})`;
    }
  }

  function draw(events, final) {
    if (!events.length) return;
    const t = (e) => Date.parse(e.time);
    const at = (type) => events.find((e) => e.type === `ORDER_EVENT_TYPE_${type}`);
    const start = t(events[0]);
    const end = final ? t(events[events.length - 1]) : Math.max(Date.now(), t(events[events.length - 1]));
    const span = Math.max(end - start, 1);
    const stopped = at("READY") || at("FAILED") || at("CANCELLED") || at("BREWING_FAILED") || at("CANCEL_REQUESTED");
    const segments = [];
    const segment = (lane, from, to, bad) => {
      if (!from) return;
      segments.push({ lane, from: t(from), to: to ? t(to) : stopped ? t(stopped) : end, running: !to && !stopped, bad, what: to ? short(to.type, "ORDER_EVENT_TYPE_") : "running" });
    };
    const authorized = at("PAYMENT_AUTHORIZED") || at("PAYMENT_DECLINED");
    segment("payment", events[0], authorized, !!at("PAYMENT_DECLINED"));
    const brewed = [at("ESPRESSO_DONE"), at("MILK_DONE")].filter(Boolean).sort((a, b) => t(b) - t(a))[0];
    // The capture settles after the drink is handed over (READY).
    const settled = at("PAYMENT_CAPTURED") || at("PAYMENT_CAPTURE_REFUSED");
    if (settled) segment("payment", at("READY") || brewed || authorized, settled, !!at("PAYMENT_CAPTURE_REFUSED"));
    if (at("PAYMENT_VOIDED")) segment("payment", at("CANCEL_REQUESTED") || at("BREWING_FAILED") || authorized, at("PAYMENT_VOIDED"), true);
    segment("espresso", at("ESPRESSO_STARTED"), at("ESPRESSO_DONE"), false);
    segment("milk", at("MILK_STARTED"), at("MILK_DONE"), false);
    section.querySelector("#axis-end").textContent = `${(span / 1000).toFixed(2)} s`;
    for (const lane of ["payment", "espresso", "milk"]) {
      const track = section.querySelector(`#lane-${lane}`);
      track.replaceChildren();
      for (const s of segments.filter((x) => x.lane === lane)) {
        const bar = el("div", { class: `bar${s.running ? " running" : ""}${s.bad ? " bad" : ""}`, title: `${lane}: ${s.what}, ${((s.to - s.from) / 1000).toFixed(2)} s` });
        bar.style.left = `${((s.from - start) / span) * 100}%`;
        bar.style.width = `${(Math.max(s.to - s.from, 0) / span) * 100}%`;
        track.append(bar);
      }
      const last = at("READY") || at("FAILED") || at("CANCELLED");
      if (last) {
        const mark = el("div", { class: `mark${at("READY") ? "" : " bad"}` });
        mark.style.left = `calc(${((t(last) - start) / span) * 100}% - 3px)`;
        track.append(mark);
      }
    }
  }

  return {};
}
