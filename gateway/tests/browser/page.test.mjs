// The shop's web page in headless Chromium (Debian's, driven by
// playwright-core) against a real `brewmesh up` on port-0 addresses: the
// customer's paths (a latte to READY and CAPTURED, a declined card, a
// cancel while brewing, a field left empty), the orders list, the mesh
// view seeing an instance die, and "serve N customers". The mesh checks
// tokens, as `up` does by default: each page is opened with the staff's
// token in its address (`/#token=…`, as `up` prints the link). Every
// request the page makes must go to the gateway. A screenshot of each view goes to
// $SCREENSHOTS. Run by scripts/browser.sh.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { WAIT, launchChromium, startMesh, until } from "./support.mjs";

const SHOTS = process.env.SCREENSHOTS || "target/browser";

let scratch;
let stop;
let gateway;
let browser;
let token;
const foreign = [];

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  ({ gateway, scratch, stop } = await startMesh("browser", [
    "--auth",
    "--barista-replicas", "2",
    // Brewing long enough to cancel during it, a card network fast enough
    // that the authorization comes first.
    "--payment-arg=--processing-delay=150ms",
    "--barista-arg=--espresso-time=1500ms", "--barista-arg=--milk-time=1s",
    // A small queue, so that serving N customers finds the shop full.
    "--barista-arg=--queue-depth=1",
  ]));
  token = readFileSync(join(scratch, "data", "auth", "staff.jwt"), "utf8").trim();
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (stop) await stop();
  assert.deepEqual(foreign, [], "the page asked a host other than the gateway");
});

// A fresh page at `hash`, every request it makes checked against the
// gateway's origin, and any script error failing the test.
async function open(hash = "") {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const origin = new URL(gateway).origin;
  page.on("request", (request) => {
    if (new URL(request.url()).origin !== origin) foreign.push(request.url());
  });
  const errors = [];
  page.on("pageerror", (error) => errors.push(error.message));
  page.on("console", (message) => {
    if (message.type() === "error" && !/Failed to load resource/.test(message.text())) errors.push(message.text());
  });
  page.errors = errors;
  await page.goto(`${gateway}/#token=${token}`);
  // Taken, and out of the address bar.
  await until("the token off the address", async () => !page.url().includes("token="));
  if (hash) await page.evaluate((h) => { location.hash = h; }, hash);
  return page;
}

async function text(page, selector) {
  return (await page.locator(selector).textContent()).trim();
}

async function placeOrder(page, { name, card = "tok_visa", item = "latte" }) {
  await page.locator(`#item-${item}`).check();
  await page.getByLabel("Your name").fill(name);
  await page.getByLabel("Card").selectOption(card);
  await page.getByRole("button", { name: "Place the order" }).click();
  await page.locator("#progress").waitFor({ state: "visible", timeout: WAIT });
}

test("a latte ordered with the keyboard alone ends READY with its payment CAPTURED", async () => {
  const page = await open();
  await page.locator("#item-latte").waitFor({ timeout: WAIT });
  // Keyboard only: the radio group, then Tab through the form.
  await page.locator("#item-latte").focus();
  await page.keyboard.press("Space");
  await page.keyboard.press("Tab");
  await page.keyboard.type("Ada");
  await page.keyboard.press("Tab");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement.id), "place");
  await page.keyboard.press("Enter");
  await page.locator("#order-state", { hasText: "READY" }).waitFor({ timeout: WAIT });
  await page.locator("#payment-state", { hasText: "CAPTURED" }).waitFor({ timeout: WAIT });
  assert.match(await text(page, "#order-id"), /^ord_[0-9a-f]{32}$/);
  assert.match(await text(page, "#trace-id"), /^[0-9a-f]{32}$/);
  const events = await page.locator("#events li").allTextContents();
  for (const step of ["Order accepted", "Payment authorized", "Espresso started", "Milk steaming started", "Espresso done", "Milk done", "Payment captured", "Ready"]) {
    assert.ok(events.some((e) => e.includes(step)), `${step} in ${events.join(" | ")}`);
  }
  // Espresso and milk side by side: both lanes have a bar, and they overlap.
  // The timeline is drawn again with each event: a bar read as it is
  // replaced has no box, so read until one has.
  const box = (lane) => until(`a bar in the ${lane} lane`, () => page.locator(`#lane-${lane} .bar`).first().boundingBox());
  const [espresso, milk] = [await box("espresso"), await box("milk")];
  assert.ok(espresso.x < milk.x + milk.width && milk.x < espresso.x + espresso.width, "the two overlap in time");
  await page.screenshot({ path: join(SHOTS, "order-ready.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("the declined test card ends FAILED with the reason shown", async () => {
  const page = await open();
  await placeOrder(page, { name: "Bea", card: "tok_declined", item: "espresso" });
  await page.locator("#order-state", { hasText: "FAILED" }).waitFor({ timeout: WAIT });
  await page.locator("#order-reason", { hasText: "declined" }).waitFor({ timeout: WAIT });
  assert.ok((await page.locator("#events li").allTextContents()).some((e) => e.includes("Payment declined")));
  assert.ok(await page.locator("#cancel").isDisabled());
  await page.screenshot({ path: join(SHOTS, "order-declined.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("cancel while brewing ends CANCELLED with the payment VOIDED", async () => {
  const page = await open();
  await placeOrder(page, { name: "Cy", item: "cappuccino" });
  await page.locator("#events li", { hasText: "Payment authorized" }).waitFor({ timeout: WAIT });
  assert.equal(await text(page, "#order-state"), "BREWING");
  await page.getByRole("button", { name: "Cancel the order" }).click();
  await page.locator("#order-state", { hasText: "CANCELLED" }).waitFor({ timeout: WAIT });
  await page.locator("#payment-state", { hasText: "VOIDED" }).waitFor({ timeout: WAIT });
  await page.screenshot({ path: join(SHOTS, "order-cancelled.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("a name left empty shows the API's violation next to the field", async () => {
  const page = await open();
  await page.locator("#item-latte").waitFor({ timeout: WAIT });
  await page.getByRole("button", { name: "Place the order" }).click();
  const violation = page.locator("#customer_name-error");
  await violation.filter({ hasText: "required" }).waitFor({ timeout: WAIT });
  assert.equal(await text(page, "#customer_name-error"), "customer name is required");
  assert.equal(await page.getByLabel("Your name").getAttribute("aria-invalid"), "true");
  assert.equal(await page.evaluate(() => document.activeElement.id), "customer_name");
  assert.ok(await page.locator("#progress").isHidden());
  await page.screenshot({ path: join(SHOTS, "order-violation.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("the orders list shows the orders, newest first, with their payments", async () => {
  const page = await open("#orders");
  await page.locator("#orders-rows tr").first().waitFor({ timeout: WAIT });
  // Each row's payment cell says "…" until its GetPayment answers.
  const rows = await until("every row's payment read", async () => {
    const payments = await page.locator("#orders-rows tr td:last-child").allTextContents();
    return payments.length && !payments.includes("…") && page.locator("#orders-rows tr").allTextContents();
  });
  assert.ok(rows[0].includes("Cy") && rows[0].includes("CANCELLED") && rows[0].includes("VOIDED"), rows[0]);
  assert.ok(rows.some((r) => r.includes("Ada") && r.includes("READY") && r.includes("CAPTURED")), rows.join("\n"));
  assert.ok(rows.some((r) => r.includes("Bea") && r.includes("FAILED")), rows.join("\n"));
  await page.locator("#orders-rows td", { hasText: "CAPTURED" }).first().waitFor({ timeout: WAIT });
  await page.screenshot({ path: join(SHOTS, "orders.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("serve N customers finishes with the seed's sentence, a full shop said in words", async () => {
  const page = await open("#serve");
  await page.getByLabel("Customers", { exact: true }).fill("20");
  await page.getByRole("button", { name: "Serve them" }).click();
  const result = page.locator("#serve-result", { hasText: "customers" });
  await result.waitFor({ timeout: 120_000 });
  assert.match(await text(page, "#serve-result"), /^Took \d+\.\d\ds to serve coffee to 20 customers$/);
  assert.equal(await text(page, "#serve-served"), "20");
  assert.equal(await text(page, "#serve-failed"), "0");
  // The shop was full at times: each refusal is said in words, and that
  // customer asked again (the same idempotency key: never twice).
  assert.ok(Number(await text(page, "#serve-busy")) > 0, "some customers found the shop full");
  assert.match(await text(page, "#serve-busy-note"), /^The shop was busy \d+ times \(429: the shop is full/);
  await page.screenshot({ path: join(SHOTS, "serve.png"), fullPage: true });
  // Out of range: said in words next to the field, nothing placed.
  await page.getByLabel("Customers", { exact: true }).fill("5000");
  await page.getByRole("button", { name: "Serve them" }).click();
  assert.match(await text(page, "#serve-count-error"), /from 1 to 1000/);
  assert.deepEqual(page.errors, []);
  await page.close();
});

test("the mesh view lists every instance and shows one going away when it is killed", async () => {
  const page = await open("#mesh");
  const ready = (label) => JSON.parse(readFileSync(join(scratch, "data", "ready", `${label}.json`), "utf8"));
  const victim = ready("barista-2");
  const rowOf = (address) => page.locator("#mesh-rows tr", { has: page.locator("code", { hasText: address }) });
  for (const label of ["registry-1", "payment-1", "barista-1", "barista-2"]) {
    await rowOf(ready(label).addr).first().waitFor({ timeout: WAIT });
  }
  await page.locator("#mesh-rows tr[data-key='gateway/gateway']").waitFor({ timeout: WAIT });
  await until("every instance SERVING", async () =>
    (await page.locator("#mesh-rows tr").evaluateAll((rows) => rows.every((r) => r.dataset.health === "SERVING"))));
  // The rates come from two refreshes: the second shows numbers.
  await until("a request rate", async () => /\d/.test(await rowOf(victim.addr).locator("td.num").first().textContent()));
  await page.screenshot({ path: join(SHOTS, "mesh.png"), fullPage: true });
  // Its row by instance id: `up` restarts it, maybe on the same address,
  // under a new id.
  const key = await rowOf(victim.addr).first().getAttribute("data-key");
  process.kill(victim.pid, "SIGKILL");
  await until("the killed barista's row to leave SERVING", async () => {
    const row = page.locator(`#mesh-rows tr[data-key="${key}"]`);
    const health = (await row.count()) ? await row.getAttribute("data-health") : "absent";
    return health !== "SERVING";
  });
  await page.screenshot({ path: join(SHOTS, "mesh-killed.png"), fullPage: true });
  assert.deepEqual(page.errors, []);
  await page.close();
});
