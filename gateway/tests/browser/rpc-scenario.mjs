// One customer's calls through the gateway with Connect's own clients
// (@connectrpc/connect over any transport: connect-web's Connect and
// gRPC-Web in a browser, connect-node's Connect, gRPC and gRPC-Web in
// Node), typed at run time from the descriptor set `buf build` writes of
// proto/ — no generated code. Used by rpc.test.mjs in Node and, through
// an import map, by the page it serves to Chromium. Returns what it saw,
// for the test to assert.

import { createClient, ConnectError, Code } from "@connectrpc/connect";
import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

export function registryOf(bytes) {
  return createFileRegistry(fromBinary(FileDescriptorSetSchema, bytes));
}

export async function scenario(transport, registry, name) {
  const client = createClient(registry.getService("brewmesh.barista.v1.Barista"), transport);
  const states = registry.getEnum("brewmesh.barista.v1.OrderState");
  const stateName = (n) => states.values.find((v) => v.number === n)?.name;
  const seen = {};

  const menu = await client.getMenu({});
  seen.menu = menu.items.map((i) => i.itemId);

  const order = await client.placeOrder({
    idempotencyKey: `${name}-${Date.now()}-${Math.random()}`,
    customerName: name,
    cardToken: "tok_visa",
    itemId: "latte",
  });
  seen.placed = stateName(order.state);
  seen.states = [];
  for await (const event of client.watchOrder({ orderId: order.orderId })) {
    seen.states.push(stateName(event.state));
    if (stateName(event.state) === "ORDER_STATE_READY") break;
  }

  try {
    await client.placeOrder({ idempotencyKey: `${name}-bad`, itemId: "latte" });
    seen.invalid = "accepted";
  } catch (error) {
    const e = ConnectError.from(error);
    const badRequest = registry.getMessage("google.rpc.BadRequest");
    seen.invalid = Code[e.code];
    seen.violations = e.findDetails(badRequest).flatMap((d) => d.fieldViolations.map((v) => v.field));
  }

  // A stream that would last a few seconds, with a deadline of 300 ms.
  const slow = await client.placeOrder({
    idempotencyKey: `${name}-slow-${Date.now()}-${Math.random()}`,
    customerName: name,
    cardToken: "tok_visa",
    itemId: "latte",
  });
  try {
    for await (const event of client.watchOrder({ orderId: slow.orderId }, { timeoutMs: 300 })) {
      if (stateName(event.state) === "ORDER_STATE_READY") break;
    }
    seen.deadline = "no deadline";
  } catch (error) {
    seen.deadline = Code[ConnectError.from(error).code];
  }
  return seen;
}
