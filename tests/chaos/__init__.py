"""The chaos run: real load on a real broker and 2-3 `dp serve` processes while they are killed,
frozen, wiped and cut off from a broker that is itself killed; then a verdict read back from Kafka.

`scripts/chaos --help` (or `python -m tests.chaos --help`) lists the options; docs/reliability.md
explains what is checked and records a full run. The modules:

- `cluster`: the broker and the processors as OS processes (start, kill -9, SIGSTOP, restart).
- `workload`: concurrent clients with retries, and the ledger of every send they attempted.
- `hostile`: malformed, oversized, wrongly typed and misrouted records.
- `faults`: the fault schedule.
- `verify`: the verdict, from the topics (read_committed), the stores and a fresh restore.
- `run`: options, orchestration, figures and the summary line.
"""
