"""The published contract: every registered event appears in the AsyncAPI document."""

import json
import subprocess
import sys
from pathlib import Path


def test_kabinet_docs_asyncapi_lists_every_ledger_event():
    kabinet = Path(sys.executable).with_name("kabinet")
    output = subprocess.run([str(kabinet), "docs", "asyncapi"], check=True, capture_output=True, text=True).stdout
    document = json.loads(output)
    assert document["asyncapi"] == "3.0.0"
    channel = document["channels"]["ledger_events_v1"]
    assert channel["address"] == "ledger.events.v1"
    names = {document["components"]["messages"][m]["name"] for m in channel["messages"]}
    assert names == {
        "ledger.account_opened", "ledger.account_frozen", "ledger.account_unfrozen", "ledger.account_closed",
        "ledger.transfer_posted", "ledger.hold_placed", "ledger.hold_captured", "ledger.hold_voided", "ledger.hold_expired",
    }
    payload = document["components"]["schemas"]["ledger_transfer_posted_v1_payload"]
    assert "legs" in payload["properties"] and "transfer_id" in payload["required"]
