"""Schemathesis hooks for brewmesh's gateway (SCHEMATHESIS_HOOKS).

- A server stream answers with NDJSON: one JSON object per line, each of
  them the schema the document gives for application/x-ndjson. Every line
  is checked against that schema here; the last line is handed back to
  schemathesis, which checks it again as the response. A stream that ends
  with no message (a watch resumed after its last event) has nothing to
  check and is handed back as an empty object.
- PlaceOrder names a menu item: most generated ids are on no menu (404, as
  they should be), so half of the positive cases take a real id from
  GET /v1/menu, and the order path behind the 404 is tested too.
- BatchPlaceOrders likewise: half of its positive cases have every
  valid itemId swapped for a real one (one unknown drink is a 404 for the
  whole batch). WatchOrders needs orders that exist: half of its positive
  cases watch one placed just before.
- CancelOrder needs an order still being made: half of its positive cases
  cancel one placed just before (a generated id names no order, 404, and
  a listed one is mostly made already, FAILED_PRECONDITION).
- Capture and Void need an AUTHORIZED payment, Refund a CAPTURED one: half
  of their positive cases take one made just before (a generated id names
  no payment, 404, and the others are mostly settled already,
  FAILED_PRECONDITION, which schemathesis would warn of as a schema that
  does not match).
- The hooks' own calls carry the staff's token (BREWMESH_TOKEN), as
  schemathesis's do.
- The check that a schema-valid request the server refuses with 400 (only
  allowed for the state-changing operations, schemathesis.toml) was refused
  for the resource's state, FAILED_PRECONDITION, not as invalid input.
"""

import json
import os
import random
import re
import time
import urllib.error
import urllib.request

import jsonschema
import schemathesis


def _line_schema(ctx, response):
    raw = ctx.operation.schema.raw_schema
    responses = ctx.operation.definition.raw.get("responses", {})
    chosen = responses.get(str(response.status_code)) or responses.get("default") or {}
    media = chosen.get("content", {}).get("application/x-ndjson", {})
    schema = dict(media.get("schema", {}))
    # Let "#/components/..." resolve against this schema's root.
    schema["components"] = raw.get("components", {})
    return schema


@schemathesis.deserializer("application/x-ndjson")
def ndjson(ctx, response):
    text = response.content.decode(response.encoding or "utf-8")
    lines = [line for line in text.split("\n") if line.strip()]
    validator = jsonschema.Draft202012Validator(_line_schema(ctx, response))
    last = {}
    for number, line in enumerate(lines, 1):
        last = json.loads(line)
        errors = sorted(validator.iter_errors(last), key=str)
        if errors:
            raise ValueError(f"line {number} breaks the schema: {errors[0].message}")
    return last


# Hypothesis seeds the `random` module for each example; the hooks draw from
# the system instead, or every example would make the same choice.
_rng = random.SystemRandom()

_menu = []


def _menu_ids():
    if not _menu:
        base = os.environ["BREWMESH_GATEWAY_URL"]
        with urllib.request.urlopen(f"{base}/v1/menu", timeout=10) as answer:
            _menu.extend(item["itemId"] for item in json.load(answer)["items"])
    return _menu


# Only a value that is already valid is swapped for a real one: a negative
# case must stay as invalid as it was generated.
_ORDER_ID = re.compile(r"^ord_[0-9a-f]{32}$")
_PAYMENT_ID = re.compile(r"^pay_[0-9a-f]{32}$")


def _valid_item_id(value):
    return isinstance(value, str) and 0 < len(value) <= 100 and value.strip(" \t\n\r\f\v") != ""


@schemathesis.hook
def map_body(ctx, body):
    operation = ctx.operation
    if (
        operation.method.upper() == "POST"
        and operation.path == "/v1/orders"
        and isinstance(body, dict)
        and _valid_item_id(body.get("itemId"))
        and _rng.random() < 0.5
    ):
        body["itemId"] = _rng.choice(_menu_ids())
    entries = body.get("requests") if isinstance(body, dict) else None
    if (
        operation.method.upper() == "POST"
        and operation.path == "/v1/orders:batchCreate"
        and isinstance(entries, list)
        and 0 < len(entries) <= 1000
        and all(isinstance(e, dict) and _valid_item_id(e.get("itemId")) for e in entries)
        and _rng.random() < 0.5
    ):
        for entry in entries:
            entry["itemId"] = _rng.choice(_menu_ids())
    ids = body.get("orderIds") if isinstance(body, dict) else None
    if (
        operation.method.upper() == "POST"
        and operation.path == "/v1/orders:watch"
        and isinstance(ids, list)
        and 0 < len(ids) <= 1000
        and all(_ORDER_ID.match(str(i)) for i in ids)
        and _rng.random() < 0.5
    ):
        body["orderIds"] = [_fresh_order()]
    return body


def _post(path, body):
    base = os.environ["BREWMESH_GATEWAY_URL"]
    request = urllib.request.Request(
        f"{base}{path}",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {os.environ['BREWMESH_TOKEN']}",
        },
    )
    # The gateway limits each client's rate: a 429 is its right answer to
    # the hooks' own set-up calls too, so wait as it says and send again
    # (the body carries its idempotency key: a repeat makes nothing twice).
    for attempt in range(8):
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as error:
            if error.code != 429 or attempt == 7:
                raise
            time.sleep(float(error.headers.get("Retry-After") or 1))


def _key():
    return f"schemathesis-{_rng.getrandbits(64)}"


def _fresh_order():
    return _post("/v1/orders", {
        "idempotencyKey": _key(),
        "itemId": _rng.choice(_menu_ids()),
        "customerName": "schemathesis",
        "cardToken": "tok_visa",
    })["orderId"]


def _fresh_payment(captured):
    payment = _post("/v1/payments:authorize", {
        "idempotencyKey": _key(),
        "orderId": f"schemathesis-{_rng.getrandbits(64)}",
        "amount": {"currencyCode": "USD", "amountMinor": 450},
        "cardToken": "tok_visa",
    })["paymentId"]
    if captured:
        _post(f"/v1/payments/{payment}:capture", {"idempotencyKey": _key()})
    return payment


@schemathesis.hook
def map_path_parameters(ctx, path_parameters):
    operation = ctx.operation
    if (
        operation.path == "/v1/orders/{order_id}:cancel"
        and isinstance(path_parameters, dict)
        and _ORDER_ID.match(str(path_parameters.get("order_id")))
        and _rng.random() < 0.5
    ):
        path_parameters["order_id"] = _fresh_order()
    settling = re.match(r"^/v1/payments/\{payment_id\}:(capture|void|refund)$", operation.path)
    if (
        settling
        and isinstance(path_parameters, dict)
        and _PAYMENT_ID.match(str(path_parameters.get("payment_id")))
        and _rng.random() < 0.5
    ):
        path_parameters["payment_id"] = _fresh_payment(settling.group(1) == "refund")
    return path_parameters


@schemathesis.check
def a_valid_request_refused_is_a_state_conflict(ctx, response, case):
    if response.status_code != 400 or case.meta is None:
        return None
    mode = str(getattr(case.meta.generation, "mode", "")).lower()
    if "positive" not in mode:
        return None
    try:
        code = json.loads(response.content).get("code")
    except ValueError:
        code = None
    if code != 9:  # FAILED_PRECONDITION
        raise AssertionError(
            f"a schema-valid request was refused as invalid (gRPC code {code}): "
            "the document does not state a rule the server enforces"
        )
    return None
