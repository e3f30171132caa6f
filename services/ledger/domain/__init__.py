"""The ledger's pure event-sourced domain model: no I/O, no clock reads, times always passed in."""
