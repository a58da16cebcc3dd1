// The gateway's gRPC, gRPC-Web and Connect, spoken by clients nobody here
// wrote, against a real `brewmesh up` on port-0 addresses:
// @connectrpc/connect-web (its Connect and gRPC-Web transports) in
// headless Chromium from a page on another origin, so CORS is exercised;
// @connectrpc/connect-node (Connect, gRPC, gRPC-Web) in Node; `buf curl`
// with each protocol and grpcurl, both learning the services from the
// gateway's reflection. Each client: GetMenu, PlaceOrder, WatchOrder to
// READY, an INVALID_ARGUMENT with its BadRequest decoded, a deadline.
// Run by scripts/browser.sh, which builds $DESCRIPTORS with `buf build`.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { readFileSync, existsSync } from "node:fs";
import { join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { createConnectTransport, createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { registryOf, scenario } from "./rpc-scenario.mjs";
import { WAIT, launchChromium, startMesh } from "./support.mjs";

const DESCRIPTORS = process.env.DESCRIPTORS;
const HERE = fileURLToPath(new URL(".", import.meta.url));

let stop;
let gateway;
let browser;
let pages;
let allowed;
const registry = registryOf(readFileSync(DESCRIPTORS));

// The browser's modules, as an import map over node_modules: every export
// of the packages the scenario and connect-web import.
function importMap() {
  const imports = {};
  for (const name of ["@bufbuild/protobuf", "@connectrpc/connect", "@connectrpc/connect-web"]) {
    const pkg = JSON.parse(readFileSync(join(HERE, "node_modules", name, "package.json"), "utf8"));
    for (const [sub, target] of Object.entries(pkg.exports)) {
      if (typeof target === "object" && typeof target.import === "string") {
        imports[name + sub.slice(1)] = `/node_modules/${name}/${target.import.slice(2)}`;
      }
    }
  }
  return { imports };
}

const PAGE = `<!doctype html><meta charset="utf-8"><title>another origin</title>
<script type="importmap">${JSON.stringify(importMap())}</script>
<script type="module">
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { registryOf, scenario } from "/rpc-scenario.mjs";
window.run = async (baseUrl, kind) => {
  const bytes = new Uint8Array(await (await fetch("/descriptors.binpb")).arrayBuffer());
  const transport = kind === "grpc-web"
    ? createGrpcWebTransport({ baseUrl })
    : createConnectTransport({ baseUrl, useHttpGet: true });
  return scenario(transport, registryOf(bytes), "browser-" + kind);
};
window.ready = true;
</script>`;

// The page's own origin: the page, the scenario, node_modules, the
// descriptors; nothing else.
function pageServer() {
  const server = createServer((request, response) => {
    const path = decodeURIComponent(new URL(request.url, "http://x").pathname);
    const send = (type, body) => {
      response.writeHead(200, { "content-type": type });
      response.end(body);
    };
    if (path === "/") return send("text/html", PAGE);
    if (path === "/rpc-scenario.mjs") return send("text/javascript", readFileSync(join(HERE, "rpc-scenario.mjs")));
    if (path === "/descriptors.binpb") return send("application/octet-stream", readFileSync(DESCRIPTORS));
    const file = normalize(join(HERE, path));
    if (path.startsWith("/node_modules/") && file.startsWith(join(HERE, "node_modules")) && file.endsWith(".js") && existsSync(file)) {
      return send("text/javascript", readFileSync(file));
    }
    response.writeHead(404);
    response.end();
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

before(async () => {
  pages = await pageServer();
  allowed = `http://127.0.0.1:${pages.address().port}`;
  ({ gateway, stop } = await startMesh("rpc", [
    // Brewing long enough for a 300 ms deadline to end a watch first.
    "--payment-arg=--processing-delay=50ms",
    "--barista-arg=--espresso-time=1500ms", "--barista-arg=--milk-time=500ms",
    `--gateway-arg=--cors-origin=${allowed}`,
  ]));
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (pages) pages.close();
  if (stop) await stop();
});

function assertCustomer(seen) {
  assert.ok(seen.menu.includes("latte"), `menu: ${seen.menu}`);
  assert.equal(seen.placed, "ORDER_STATE_ACCEPTED");
  assert.equal(seen.states.at(-1), "ORDER_STATE_READY", `states: ${seen.states}`);
  assert.equal(seen.invalid, "InvalidArgument");
  assert.ok(seen.violations.includes("customer_name"), `violations: ${seen.violations}`);
  assert.equal(seen.deadline, "DeadlineExceeded");
}

for (const [name, make] of [
  ["Connect over HTTP/1.1", () => createConnectTransport({ baseUrl: gateway, httpVersion: "1.1" })],
  ["Connect over HTTP/2, GETs for reads", () => createConnectTransport({ baseUrl: gateway, httpVersion: "2", useHttpGet: true })],
  ["Connect with protobuf bodies", () => createConnectTransport({ baseUrl: gateway, httpVersion: "1.1", useBinaryFormat: true })],
  ["gRPC over HTTP/2", () => createGrpcTransport({ baseUrl: gateway })],
  ["gRPC-Web over HTTP/1.1", () => createGrpcWebTransport({ baseUrl: gateway, httpVersion: "1.1" })],
]) {
  test(`connect-node, ${name}: a customer's calls`, async () => {
    assertCustomer(await scenario(make(), registry, `node-${name}`));
  });
}

async function openPage(origin) {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(error.message));
  page.errors = errors;
  await page.goto(`${origin}/`);
  await page.waitForFunction(() => window.ready === true, null, { timeout: WAIT });
  return page;
}

for (const kind of ["connect", "grpc-web"]) {
  test(`connect-web in Chromium, ${kind}, from another origin: a customer's calls`, async () => {
    const page = await openPage(allowed);
    const requests = [];
    page.on("request", (r) => requests.push(`${r.method()} ${r.url()}`));
    const seen = await page.evaluate(([baseUrl, kind]) => window.run(baseUrl, kind), [gateway, kind]);
    assertCustomer(seen);
    assert.deepEqual(page.errors, []);
    const rpcs = requests.filter((r) => r.includes(new URL(gateway).host));
    assert.ok(rpcs.some((r) => r.includes("/brewmesh.barista.v1.Barista/WatchOrder")), rpcs.join("\n"));
    if (kind === "connect") {
      // GetMenu is NO_SIDE_EFFECTS: connect-web sends it as a cacheable GET.
      assert.ok(rpcs.some((r) => r.startsWith("GET ") && r.includes("/GetMenu?")), rpcs.join("\n"));
    }
    await page.close();
  });
}

test("a page on an origin that is not allowed cannot call the gateway", async () => {
  // Same server, other name: http://localhost:port is another origin.
  const page = await openPage(`http://localhost:${pages.address().port}`);
  const outcome = await page.evaluate(async (baseUrl) => {
    try {
      await window.run(baseUrl, "connect");
      return "called";
    } catch (error) {
      return `refused: ${error.message}`;
    }
  }, gateway);
  assert.match(outcome, /^refused/);
  // And without a browser in the way, the refusal is the protocol's own.
  const answer = await fetch(`${gateway}/brewmesh.barista.v1.Barista/GetMenu`, {
    method: "POST",
    headers: { "content-type": "application/json", origin: "http://localhost:1" },
    body: "{}",
  });
  assert.equal(answer.status, 403);
  assert.equal((await answer.json()).code, "permission_denied");
  await page.close();
});

function run(command, args) {
  return execFileSync(command, args, { encoding: "utf8", timeout: WAIT, stdio: ["ignore", "pipe", "pipe"] });
}

for (const protocol of ["connect", "grpcweb", "grpc"]) {
  test(`buf curl --protocol ${protocol}, by the gateway's reflection`, () => {
    const base = `${gateway}/brewmesh.barista.v1.Barista`;
    const flags = ["curl", "--protocol", protocol, "--http2-prior-knowledge"];
    const menu = JSON.parse(run("buf", [...flags, `${base}/GetMenu`, "-d", "{}"]));
    assert.ok(menu.items.some((i) => i.itemId === "latte"));
    const order = JSON.parse(run("buf", [...flags, `${base}/PlaceOrder`, "-d", JSON.stringify({
      idempotency_key: `buf-${protocol}-${Date.now()}`, customer_name: "buf", card_token: "tok_visa", item_id: "latte",
    })]));
    assert.equal(order.state, "ORDER_STATE_ACCEPTED");
    const watched = run("buf", [...flags, `${base}/WatchOrder`, "-d", JSON.stringify({ order_id: order.orderId })]);
    assert.match(watched, /ORDER_STATE_READY/);
    let refused;
    try {
      run("buf", [...flags, `${base}/PlaceOrder`, "-d", "{}"]);
    } catch (error) {
      refused = error.stdout + error.stderr;
    }
    assert.match(refused, /invalid_argument/);
    assert.match(refused, /google\.rpc\.BadRequest/);
  });
}

test("grpcurl through the gateway's port, by its reflection (v1alpha)", () => {
  const host = new URL(gateway).host;
  const services = run("grpcurl", ["-plaintext", host, "list"]);
  for (const s of ["brewmesh.barista.v1.Barista", "brewmesh.payment.v1.Payments", "grpc.health.v1.Health"]) {
    assert.match(services, new RegExp(s.replaceAll(".", "\\.")));
  }
  const menu = JSON.parse(run("grpcurl", ["-plaintext", host, "brewmesh.barista.v1.Barista/GetMenu"]));
  assert.ok(menu.items.some((i) => i.itemId === "latte"));
  const health = JSON.parse(run("grpcurl", ["-plaintext", host, "grpc.health.v1.Health/Check"]));
  assert.equal(health.status, "SERVING");
});
