// The page: one view at a time, chosen by the address's #fragment, so the
// back button and links work; each view starts when first shown and is
// told when it is hidden (the mesh view stops polling then).

import { startOrder } from "./order.js";
import { startOrders } from "./orders.js";
import { startMesh } from "./mesh.js";
import { startServe } from "./serve.js";

const VIEWS = { order: startOrder, orders: startOrders, mesh: startMesh, serve: startServe };
const started = new Map();

function show() {
  const wanted = location.hash.slice(1);
  const name = wanted in VIEWS ? wanted : "order";
  for (const section of document.querySelectorAll("section.view")) {
    section.hidden = section.id !== name;
  }
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  for (const [view, handle] of started) {
    if (view !== name && handle.hide) handle.hide();
  }
  if (!started.has(name)) started.set(name, VIEWS[name](document.getElementById(name)) || {});
  const handle = started.get(name);
  if (handle.show) handle.show();
  document.title = `${document.getElementById(`${name}-title`).textContent} · brewmesh coffee`;
}

window.addEventListener("hashchange", () => {
  show();
  const heading = document.querySelector("section.view:not([hidden]) h2");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus();
  }
});
show();
