"""The differential conformance suite (docs/CONFORMANCE.md)."""
