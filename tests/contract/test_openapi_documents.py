"""The OpenAPI documents of the ledger (/ledger/v1) and of the gateway (/v1/me) are what a
bank generates its clients from: they must be valid, complete, and tell the truth. Read from
GET /openapi.json, as a client generator reads them; the answers of a running bank are
checked against the schemas they declare."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from gateway.service import GatewaySettings
from gateway.service import build as build_gateway
from kabinet_chassis.settings import ServiceSettings
from ledger.service import build as build_ledger
from tests.support.tokens import bearer, ledger_poster

UNREACHED = {"database_url": "postgresql://nobody@127.0.0.1:1/none", "kafka_bootstrap_servers": "127.0.0.1:1"}
LEDGER_POSTS = {"open_account", "freeze_account", "unfreeze_account", "close_account", "set_credit_limit",
                "post_transfer", "reverse_transfer", "place_hold", "capture_hold", "void_hold"}
LEDGER_READS = {"get_account", "list_accounts", "get_balance", "get_history", "get_statement", "get_transfer",
                "get_hold", "get_pending_holds", "find_transfers", "find_holds"}
CUSTOMER_READS = {"my_accounts", "my_account", "my_balance", "my_history", "my_statement", "my_pending_holds"}
KEYED = {"open_account", "freeze_account", "unfreeze_account", "close_account", "set_credit_limit"}


def ledger_app(settings: ServiceSettings):
    return build_ledger(settings)[0].http_app()


def client(app, base_url: str = "http://service") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


@pytest.fixture
async def documents(tmp_path) -> dict[str, dict]:
    """The served documents; serving them needs no database or broker."""
    apps = {"ledger": ledger_app(ServiceSettings(service_name="ledger", data_dir=tmp_path, **UNREACHED)),
            "gateway": build_gateway(GatewaySettings(data_dir=tmp_path, **UNREACHED)).http_app()}
    served = {}
    for name, app in apps.items():
        async with client(app) as http:
            served[name] = (await http.get("/openapi.json")).json()
    return served


def operations(document: dict, prefix: str = "/") -> dict[str, tuple[str, str, dict]]:
    return {operation["operationId"]: (method, path, operation) for path, methods in document["paths"].items()
            if path.startswith(prefix) for method, operation in methods.items()}


def check(document: dict, operation_id: str, status: int, response: httpx.Response) -> None:
    """The answer has the status and media type the document declares for it, and its body fits the schema."""
    _, _, operation = operations(document)[operation_id]
    declared = operation["responses"][str(status)]["content"]
    assert response.status_code == status, response.text
    media_type = response.headers["content-type"]
    assert media_type in declared, (operation_id, media_type)
    # The schema's references point into the document's components.
    schema = {**declared[media_type]["schema"], "components": document["components"]}
    OAS31Validator(schema, format_checker=OAS31Validator.FORMAT_CHECKER).validate(response.json())


def test_both_documents_are_valid_openapi(documents):
    for document in documents.values():
        validate(document)
        assert document["openapi"].startswith("3.1") and document["info"]["version"]


def test_every_operation_has_its_own_stable_id_and_a_summary(documents):
    assert set(operations(documents["ledger"], "/ledger/v1")) == LEDGER_POSTS | LEDGER_READS
    assert set(operations(documents["gateway"], "/v1/me")) == CUSTOMER_READS
    for document in documents.values():
        ids = [operation["operationId"] for path in document["paths"].values() for operation in path.values()]
        assert len(ids) == len(set(ids))
        assert all(operation["summary"] for _, _, operation in operations(document).values())


def test_every_api_operation_needs_a_bearer_token_declared_as_a_security_scheme(documents):
    for document, prefix in ((documents["ledger"], "/ledger/v1"), (documents["gateway"], "/v1/me")):
        schemes = document["components"]["securitySchemes"]
        assert schemes == {"accessToken": {**schemes["accessToken"], "type": "http", "scheme": "bearer"}}
        for operation_id, (_, _, operation) in operations(document, prefix).items():
            assert operation["security"] == [{"accessToken": []}], operation_id
            assert "authorization" not in {p["name"].lower() for p in operation.get("parameters", ())}, operation_id
        assert all("security" not in operation for _, _, operation in operations(document, "/health").values())


def test_every_api_operation_documents_its_problems_as_problem_json(documents):
    problem = documents["ledger"]["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "code", "detail", "instance", "errors"} <= set(problem["properties"])
    assert set(problem["required"]) == {"type", "title", "status", "code", "detail"}
    for document, prefix in ((documents["ledger"], "/ledger/v1"), (documents["gateway"], "/v1/me")):
        assert document["components"]["schemas"]["Problem"] == problem
        assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's 422, which we never send
        for operation_id, (_, path, operation) in operations(document, prefix).items():
            statuses = {401, 403, 422, 503} | ({404} if "{" in path else set())
            for status in statuses:
                answer = operation["responses"][str(status)]
                assert answer["content"] == {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}, (operation_id, status)
                assert answer["description"].startswith(("`", "No valid", "Try again")), (operation_id, status)
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_the_ledger_states_the_role_each_operation_needs(documents):
    for operation_id, (_, _, operation) in operations(documents["ledger"], "/ledger/v1").items():
        needs = "`ledger:post`" if operation_id in LEDGER_POSTS else "`ledger:read` or `ledger:post`"
        assert needs in " ".join(operation["description"].split()), operation_id


def test_the_idempotency_key_is_a_required_header_where_it_is_required(documents):
    for operation_id, (_, _, operation) in operations(documents["ledger"], "/ledger/v1").items():
        keys = [p for p in operation.get("parameters", ()) if p["name"] == "Idempotency-Key"]
        if operation_id in KEYED:
            assert keys and keys[0]["in"] == "header" and keys[0]["required"], operation_id
            assert "400" in operation["responses"], operation_id  # idempotency_key_required
        else:
            assert not keys, operation_id


def test_every_success_has_a_schema_and_money_is_integers_of_minor_units_with_a_currency(documents):
    for document in documents.values():
        schemas = document["components"]["schemas"]
        assert schemas["Money"]["properties"]["amount_minor"]["type"] == "integer"
        assert schemas["Money"]["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
        assert set(schemas["Money"]["required"]) == {"amount_minor", "currency"}
        for name, schema in schemas.items():
            for field, declared in schema.get("properties", {}).items():
                if field.endswith("_minor") and not name.endswith(("Body", "Query")):
                    assert "integer" in {declared.get("type"), *(s.get("type") for s in declared.get("anyOf", ()))}
        for operation_id, (_, _, operation) in operations(document, "/").items():
            if operation_id in LEDGER_POSTS | LEDGER_READS | CUSTOMER_READS:
                success = next(answer for status, answer in operation["responses"].items() if status.startswith("2"))
                schema = success["content"]["application/json"]["schema"]
                assert "$ref" in schema or all("$ref" in s for s in schema["anyOf"]), operation_id


def test_the_customer_api_documents_the_query_the_ledger_checks_for_it(documents):
    # The gateway passes a read's query on to the ledger, which checks it: documented alike,
    # down to what each parameter means (the bank's services read the ledger's document).
    ledger = operations(documents["ledger"], "/ledger/v1")
    pairs = {"my_accounts": "list_accounts", "my_balance": "get_balance", "my_history": "get_history",
             "my_statement": "get_statement", "my_pending_holds": "get_pending_holds"}

    def query(operation: dict) -> dict[str, tuple]:  # what each parameter is, and what it means
        return {p["name"]: (p["required"], p.get("description"),
                            {k: v for k, v in p["schema"].items() if k not in ("title", "description")})
                for p in operation.get("parameters", ()) if p["in"] == "query" and p["name"] != "owner_id"}

    for mine, theirs in pairs.items():
        assert query(operations(documents["gateway"])[mine][2]) == query(ledger[theirs][2]), mine


async def test_a_refused_token_and_a_bad_request_answer_as_documented(documents, tmp_path):
    # No database needed: each is answered before the ledger reads anything.
    app = ledger_app(ServiceSettings(service_name="ledger", data_dir=tmp_path, **UNREACHED))
    async with client(app, "http://ledger/ledger/v1") as ledger:
        check(documents["ledger"], "get_account", 401, await ledger.get(f"/accounts/{uuid.uuid4()}"))
        check(documents["ledger"], "get_account", 422, await ledger.get("/accounts/not-a-uuid",
                                                                        headers=ledger_poster(tmp_path)))
        check(documents["ledger"], "post_transfer", 403, await ledger.post("/transfers", json={},
                                                                           headers=bearer(tmp_path, "alice")))


@pytest.fixture
async def bank(stack, unique_name, tmp_path):
    ledger_service, parts = build_ledger(stack.service_settings(f"ledger_{unique_name}", data_dir=tmp_path))
    async with ledger_service.running():
        transport = httpx.ASGITransport(app=ledger_service.http_app())
        gateway = build_gateway(GatewaySettings(database_url=stack.database_url, data_dir=tmp_path,
                                                kafka_bootstrap_servers=stack.bootstrap_servers,
                                                ledger_url="http://ledger"), ledger_transport=transport)
        async with (
            gateway.running(),
            httpx.AsyncClient(transport=transport, base_url="http://ledger/ledger/v1",
                              headers=ledger_poster(tmp_path)) as ledger,
            client(gateway.http_app(), "http://gw/v1/me") as customer,
        ):
            yield ledger, customer


@pytest.mark.integration
async def test_the_answers_of_a_running_bank_fit_the_documented_schemas(bank, documents, tmp_path):
    ledger, customer = bank
    customer.headers.update(bearer(tmp_path, "alice"))
    doc, gw = documents["ledger"], documents["gateway"]

    async def opened(body: dict) -> str:
        response = await ledger.post("/accounts", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
        check(doc, "open_account", 201, response)
        return response.json()["account_id"]

    settlement = await opened({"owner_id": "bank", "kind": "settlement", "currency": "RUB"})
    card = await opened({"owner_id": "alice", "kind": "card", "currency": "RUB"})
    other = await opened({"owner_id": "alice", "kind": "savings", "currency": "RUB"})
    legs = [{"account_id": settlement, "amount_minor": -5_000, "currency": "RUB"},
            {"account_id": card, "amount_minor": 5_000, "currency": "RUB"}]
    check(doc, "post_transfer", 201, await ledger.post("/transfers", json={
        "transfer_id": f"fund-{card}", "code": "top_up", "legs": legs, "external_ref": "top-up-1"}))
    hold = {"hold_id": f"hold-{card}", "debit_account_id": card, "credit_account_id": other, "amount_minor": 300,
            "currency": "RUB", "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(), "code": "card_payment",
            "external_ref": "auth-1"}
    check(doc, "place_hold", 201, await ledger.post("/holds", json=hold))
    check(doc, "capture_hold", 201, await ledger.post(f"/holds/{hold['hold_id']}/captures",
                                                      json={"capture_id": "c1", "amount_minor": 100}))
    pending = {**hold, "hold_id": f"pending-{card}"}
    check(doc, "place_hold", 201, await ledger.post("/holds", json=pending))
    check(doc, "get_hold", 200, await ledger.get(f"/holds/{hold['hold_id']}"))
    check(doc, "void_hold", 200, await ledger.post(f"/holds/{hold['hold_id']}/void"))
    check(doc, "get_hold", 200, await ledger.get(f"/holds/{hold['hold_id']}"))
    check(doc, "get_hold", 404, await ledger.get("/holds/never-placed"))
    check(doc, "get_hold", 403, await ledger.get(f"/holds/{hold['hold_id']}", headers=bearer(tmp_path, "alice")))
    check(doc, "find_holds", 200, await ledger.get("/holds", params={"external_ref": "auth-1", "limit": 1}))
    check(doc, "find_holds", 403, await ledger.get("/holds", params={"external_ref": "auth-1"},
                                                   headers=bearer(tmp_path, "alice")))
    check(doc, "find_holds", 422, await ledger.get("/holds", params={"external_ref": "auth-1", "cursor": "x"}))
    check(doc, "post_transfer", 409, await ledger.post("/transfers", json={
        "transfer_id": "too-much", "code": "top_up", "legs": [{**legs[0], "account_id": card, "amount_minor": -10**9},
                                                              {**legs[1], "account_id": other, "amount_minor": 10**9}]}))
    keyed = {"headers": {"Idempotency-Key": str(uuid.uuid4())}}
    check(doc, "set_credit_limit", 200, await ledger.put(f"/accounts/{other}/credit-limit",
                                                          json={"credit_limit_minor": 1_000}, **keyed))
    check(doc, "freeze_account", 200, await ledger.post(f"/accounts/{other}/freeze", json={"reason": "court_order"}, **keyed))

    now = datetime.now(UTC)
    period = {"since": (now - timedelta(hours=1)).isoformat(), "until": (now + timedelta(hours=1)).isoformat()}
    reads = [("get_account", "my_account", f"/accounts/{card}", {}),
             ("get_balance", "my_balance", f"/accounts/{card}/balance", {}),
             ("get_balance", "my_balance", f"/accounts/{card}/balance", {"at": now.isoformat()}),
             ("get_history", "my_history", f"/accounts/{card}/history", {}),
             ("get_statement", "my_statement", f"/accounts/{card}/statement", period),
             ("get_pending_holds", "my_pending_holds", f"/accounts/{card}/holds", {"limit": 1})]
    for ledger_read, customer_read, path, params in reads:
        check(doc, ledger_read, 200, await ledger.get(path, params=params))
        check(gw, customer_read, 200, await customer.get(path, params=params))
    check(doc, "list_accounts", 200, await ledger.get("/accounts", params={"owner_id": "alice", "limit": 1}))
    check(doc, "get_transfer", 200, await ledger.get(f"/transfers/fund-{card}"))
    check(doc, "reverse_transfer", 409, await ledger.post(f"/transfers/fund-{card}/reversal",  # 300 is spent
                                                          json={"reason": "posted_in_error"}))
    check(doc, "post_transfer", 201, await ledger.post("/transfers", json={
        "transfer_id": f"twice-{card}", "code": "top_up", "legs": [{**legs[0], "amount_minor": -100},
                                                                   {**legs[1], "amount_minor": 100}]}))
    check(doc, "reverse_transfer", 201, await ledger.post(f"/transfers/twice-{card}/reversal",
                                                          json={"reason": "duplicate"}))
    check(doc, "reverse_transfer", 404, await ledger.post("/transfers/never-posted/reversal",
                                                          json={"reason": "posted_in_error"}))
    check(doc, "get_transfer", 200, await ledger.get(f"/transfers/twice-{card}:reversal"))
    check(doc, "find_transfers", 200, await ledger.get("/transfers", params={"external_ref": "top-up-1", "limit": 1}))
    check(doc, "find_transfers", 422, await ledger.get("/transfers", params={"external_ref": "top-up-1",
                                                                             "cursor": "not-one-of-them"}))
    check(doc, "get_transfer", 404, await ledger.get("/transfers/never-posted"))
    check(doc, "get_transfer", 403, await ledger.get(f"/transfers/fund-{card}", headers=bearer(tmp_path, "alice")))
    check(gw, "my_accounts", 200, await customer.get("/accounts", params={"limit": 1}))
    check(gw, "my_account", 404, await customer.get(f"/accounts/{settlement}"))
    empty_period = {**period, "until": period["since"]}
    check(gw, "my_statement", 422, await customer.get(f"/accounts/{card}/statement", params=empty_period))
