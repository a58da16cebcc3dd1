// The gateway's REST API, as the page uses it: JSON in and out, every
// failure an ApiError carrying the google.rpc.Status the gateway answered.

const BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest";

// The bearer token the page was opened with (`brewmesh up` prints the
// link, /#token=…), kept for the tab's session and taken out of the
// address bar at once; every call sends it.
const TOKEN_KEY = "brewmesh.token";
{
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function bearer() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { authorization: `Bearer ${token}` } : {};
}

// A failed call: the HTTP status, the Status's code and message, its
// field violations, and the Retry-After the gateway sent (seconds).
export class ApiError extends Error {
  constructor(httpStatus, status, retryAfter) {
    super(status.message || `HTTP ${httpStatus}`);
    this.httpStatus = httpStatus;
    this.code = status.code ?? 2;
    this.details = Array.isArray(status.details) ? status.details : [];
    this.retryAfter = retryAfter;
  }

  // [{field, description}] from a BadRequest detail.
  get violations() {
    return this.details
      .filter((d) => d["@type"] === BAD_REQUEST)
      .flatMap((d) => d.fieldViolations || []);
  }

  // The error in words, for a person.
  get words() {
    if (this.httpStatus === 429) {
      return `The shop is busy right now (429): ${this.message}. Try again in a moment.`;
    }
    if (this.httpStatus === 0) {
      return `The gateway could not be reached: ${this.message}`;
    }
    if (this.httpStatus === 401) {
      return `Sign in first (401): ${this.message}. Open the link \`brewmesh up\` printed, with its #token=.`;
    }
    return this.message;
  }
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A fresh W3C trace context, sampled: the page starts the trace, so it
// knows the trace id before the gateway answers.
export function newTrace() {
  const traceId = hex(crypto.getRandomValues(new Uint8Array(16)));
  const spanId = hex(crypto.getRandomValues(new Uint8Array(8)));
  return { traceId, traceparent: `00-${traceId}-${spanId}-01` };
}

// A key for PlaceOrder: the same key again returns the same order, so a
// retried request never orders twice.
export function idempotencyKey() {
  return `web-${hex(crypto.getRandomValues(new Uint8Array(12)))}`;
}

// One call; resolves to the JSON body, rejects with an ApiError.
export async function call(method, path, { body, headers = {}, signal } = {}) {
  const init = { method, headers: { accept: "application/json", ...bearer(), ...headers }, signal };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { code: 14, message: error.message });
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : {};
  } catch {
    json = null;
  }
  if (!response.ok) {
    const retry = Number.parseFloat(response.headers.get("retry-after") || "");
    const status = json && typeof json === "object" ? json : { message: text.slice(0, 200) };
    throw new ApiError(response.status, status, Number.isFinite(retry) ? retry : undefined);
  }
  if (json === null) throw new ApiError(response.status, { message: "the gateway answered something that is not JSON" });
  return json;
}

// Follows an order over Server-Sent Events: onEvent(event) for each
// OrderEvent, in order and once each; resumes after the last one when
// the stream breaks or ends early; stops after the order's last event (a
// READY order's capture comes after READY) or on close().
export function watchOrder(orderId, { onEvent, onError }) {
  const ending = lastEvent();
  let last = 0;
  let source = null;
  let closed = false;
  let retries = 0;
  const open = () => {
    if (closed) return;
    const url = `/v1/orders/${encodeURIComponent(orderId)}:watch?after_sequence=${last}`;
    source = eventSource(url);
    source.onmessage = (message) => {
      retries = 0;
      const event = JSON.parse(message.data);
      const sequence = Number(event.sequence);
      if (sequence <= last) return;
      last = sequence;
      onEvent(event);
      // The order's last event: the stream's end is expected now.
      if (ending.last(event.type)) close();
    };
    // The gateway's `event: error` carries a google.rpc.Status.
    source.addEventListener("error", (message) => {
      source.close();
      if (closed) return;
      let status = null;
      if (message.data) {
        try {
          status = JSON.parse(message.data);
        } catch {
          status = null;
        }
      }
      // UNAVAILABLE and DEADLINE_EXCEEDED say: watch again from here.
      const resumable = !status || status.code === 14 || status.code === 4;
      if (resumable && retries < 20) {
        retries += 1;
        setTimeout(open, Math.min(200 * 2 ** retries, 3000));
      } else if (onError) {
        onError(new ApiError(status ? 400 : 0, status || { message: "the order's stream broke" }));
      }
    });
  };
  const close = () => {
    closed = true;
    if (source) source.close();
  };
  open();
  return { close };
}

// An EventSource, which sends no headers; with a token, the same stream
// read over fetch: `onmessage` for each event, an `error` event (with the
// google.rpc.Status as its data, if the gateway sent one) when it fails
// or ends, as an EventSource does.
function eventSource(url) {
  const auth = bearer();
  if (!auth.authorization) return new EventSource(url);
  const controller = new AbortController();
  const listeners = [];
  const source = {
    onmessage: null,
    addEventListener(type, listener) {
      if (type === "error") listeners.push(listener);
    },
    close: () => controller.abort(),
  };
  const emit = (type, data) => {
    if (controller.signal.aborted) return;
    if (type === "error") for (const listener of listeners) listener({ data });
    else if (source.onmessage) source.onmessage({ data });
  };
  (async () => {
    const response = await fetch(url, { headers: { accept: "text/event-stream", ...auth }, signal: controller.signal });
    if (!response.ok) return emit("error", await response.text());
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) emit(type, data.join("\n"));
      }
    }
    emit("error", "");
  })().catch(() => emit("error", ""));
  return source;
}

// An order's last event, as WatchOrder ends: FAILED or CANCELLED, or for a
// READY order its settlement, which follows READY.
function lastEvent() {
  let ready = false;
  let settled = false;
  return {
    last(type) {
      if (type === "ORDER_EVENT_TYPE_FAILED" || type === "ORDER_EVENT_TYPE_CANCELLED") return true;
      if (type === "ORDER_EVENT_TYPE_READY") ready = true;
      if (type === "ORDER_EVENT_TYPE_PAYMENT_CAPTURED" || type === "ORDER_EVENT_TYPE_PAYMENT_CAPTURE_REFUSED") settled = true;
      return ready && settled;
    },
  };
}

export const FINAL = new Set(["ORDER_STATE_READY", "ORDER_STATE_FAILED", "ORDER_STATE_CANCELLED"]);

// "ORDER_STATE_READY" → "READY".
export function short(name, prefix) {
  return typeof name === "string" && name.startsWith(prefix) ? name.slice(prefix.length) : String(name ?? "");
}

// Money as the API has it ({currencyCode, amountMinor}) → "$4.75".
export function money(price) {
  if (!price) return "";
  const minor = Number(price.amountMinor || 0);
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: price.currencyCode || "USD" }).format(minor / 100);
  } catch {
    return `${(minor / 100).toFixed(2)} ${price.currencyCode}`;
  }
}

// Shows each violation next to its field (an element `${field}-error`,
// the control itself marked invalid); the rest in `fallback`.
export function showViolations(form, error, fallback) {
  clearViolations(form);
  const unplaced = [];
  for (const v of error.violations) {
    const slot = form.querySelector(`#${CSS.escape(v.field)}-error`);
    if (slot) {
      slot.textContent = `${v.field.replaceAll("_", " ")} ${v.description}`;
      const control = form.querySelector(`[name="${CSS.escape(v.field)}"]`);
      if (control) control.setAttribute("aria-invalid", "true");
    } else {
      unplaced.push(`${v.field}: ${v.description}`);
    }
  }
  fallback.textContent = error.violations.length && !unplaced.length ? "" : [error.words, ...unplaced].join(" — ");
  const first = form.querySelector("[aria-invalid=true]");
  if (first) first.focus();
}

export function clearViolations(form) {
  for (const slot of form.querySelectorAll(".violation")) slot.textContent = "";
  for (const control of form.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

// The menu, fetched once per page load.
let menu = null;
export function getMenu() {
  if (!menu) {
    menu = call("GET", "/v1/menu").catch((error) => {
      menu = null;
      throw error;
    });
  }
  return menu;
}

// The page's settings from the gateway (Jaeger's address, if any).
let config = null;
export function getConfig() {
  if (!config) config = call("GET", "/web/config.json").catch(() => ({}));
  return config;
}

// Text into an element made here (never HTML from data).
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
