"""One module per scenario: a client/server program pair (docs/CONFORMANCE.md)."""
