// The orders view: newest first, a page at a time with the API's page
// tokens (older pages by token; back to the newest from the start), each
// order with its state and its payment's.

import { call, el, getMenu, money, short } from "./api.js";

const PAGE_SIZE = 20;

export function startOrders(section) {
  const $ = (id) => section.querySelector(`#${id}`);
  let next = "";
  let page = 1;
  let loading = null;

  async function load(token) {
    if (loading) loading.abort();
    const controller = new AbortController();
    loading = controller;
    $("orders-error").textContent = "";
    try {
      const query = new URLSearchParams({ page_size: String(PAGE_SIZE) });
      if (token) query.set("page_token", token);
      const [answer, menu] = await Promise.all([
        call("GET", `/v1/orders?${query}`, { signal: controller.signal }),
        getMenu().catch(() => ({ items: [] })),
      ]);
      const names = new Map((menu.items || []).map((i) => [i.itemId, i.displayName]));
      const orders = answer.orders || [];
      next = answer.nextPageToken || "";
      $("orders-next").disabled = !next;
      $("orders-where").textContent = orders.length ? `Page ${page}` : "No orders yet.";
      $("orders-rows").replaceChildren(
        ...orders.map((order) => {
          const state = short(order.state, "ORDER_STATE_");
          const payment = el("td", { text: order.paymentId ? "…" : "none" });
          if (order.paymentId) paymentState(order.paymentId, payment, controller.signal);
          return el("tr", {},
            el("td", {}, el("time", { datetime: order.createTime, text: new Date(order.createTime).toLocaleString() })),
            el("td", {}, el("code", { text: order.orderId })),
            el("td", { text: order.customerName }),
            el("td", { text: names.get(order.itemId) || order.itemId }),
            el("td", { class: "num", text: money(order.price) }),
            el("td", { class: `state-${state}`, text: order.failureReason ? `${state} — ${order.failureReason}` : state }),
            payment);
        }),
      );
    } catch (error) {
      if (error.name !== "AbortError") $("orders-error").textContent = `The orders could not be loaded: ${error.words}`;
    }
  }

  async function paymentState(paymentId, cell, signal) {
    try {
      const payment = await call("GET", `/v1/payments/${encodeURIComponent(paymentId)}`, { signal });
      const state = short(payment.state, "PAYMENT_STATE_");
      cell.textContent = state;
      cell.className = `state-${state}`;
    } catch (error) {
      if (error.name !== "AbortError") cell.textContent = `unknown (${error.words})`;
    }
  }

  $("orders-first").addEventListener("click", () => {
    page = 1;
    load("");
  });
  $("orders-next").addEventListener("click", () => {
    if (!next) return;
    page += 1;
    load(next);
  });

  return {
    show() {
      page = 1;
      load("");
    },
  };
}
