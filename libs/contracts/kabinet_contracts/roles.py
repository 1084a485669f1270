"""Roles an access token may carry, by the service that checks them.

Identity puts them in a token's `roles` claim: the services' own (client-credential)
tokens carry a service's roles; a customer's token carries none and reaches only the
customer's own resources.
"""

from __future__ import annotations

# Move money and manage accounts in the ledger (payments, cards, lending, savings, rewards),
# and read any account.
LEDGER_POST = "ledger:post"
# Read any account, its history and statements (support, reconciliation), and move nothing.
LEDGER_READ = "ledger:read"
