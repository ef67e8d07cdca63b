"""SQLite's own limit for the Idempotency-Key layer on the embedded deployment.

Embedded `POST /cases` is bound by SQLite's single writer: each request's writes are one turn
of it, `BEGIN IMMEDIATE` to a `COMMIT` that syncs the WAL. The layer adds one statement to the
turn, the completed key row, which must commit with the handler's effects (its read of the key
runs before, outside the turn). This runs the two turns back to back on one connection, on
Seaport's own schema and settings (WAL, synchronous = FULL), with no Seaport process, and prints
turns per second of each and their ratio: the most the layered/bare ratio can be on this disk
and CPU.

    python3 benches/sqlite/writer_turn.py [rounds]
"""

import glob
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
# The library's migrations, then the reference service's (the `cases` table).
MIGRATIONS = [
    os.path.join(HERE, "..", "..", "crates", crate, "migrations", "sqlite", "*.sql")
    for crate in ("seaport", "seaport-sea")
]

CASE = """INSERT INTO cases (id, title, description, customer_id, status, correlation_id, created_at,
    customer_check, customer_name, customer_email)
    VALUES (?, 'Printer on fire', 'Third floor', 'cust-1', 'open', ?, '2026-11-26T09:00:00Z',
    'unverified', NULL, NULL)"""
EVENT = """INSERT INTO seaport_outbox (event_id, topic, ordering_key, partition, envelope, created_at,
    traceparent) VALUES (?, 'sea.cases.created', 'case-1', 3, ?, 1,
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')"""
# The layer's statement (`RECORD` in crates/seaport/src/http/idempotency.rs), with its values.
KEY = """INSERT INTO seaport_idempotency_keys AS k
    (scope, key, fingerprint, status, headers, body, created_at, expires_at, token, locked_until)
    VALUES ('anonymous', ?, 'fingerprint-of-the-request-0123456789abcdef', 201,
    '[["content-type","application/json"],["location","/cases/x"]]', ?, 1, 86400001, ?, 0)
    ON CONFLICT (scope, key) DO UPDATE SET status = excluded.status
    WHERE k.expires_at <= 1 OR (k.status = 0 AND k.locked_until <= 1 AND k.fingerprint = excluded.fingerprint)
    RETURNING 1"""


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(os.path.join(tmp, "seaport.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        for pattern in MIGRATIONS:
            for m in sorted(glob.glob(pattern)):
                db.executescript(open(m).read())

        def bare():
            db.execute("BEGIN IMMEDIATE")
            db.execute(CASE, (str(uuid.uuid4()), str(uuid.uuid4())))
            db.execute(EVENT, (str(uuid.uuid4()), b"x" * 600))

        def layered():
            bare()
            db.execute(KEY, ("key-" + str(uuid.uuid4()), b"y" * 400, "token")).fetchall()

        rates = {"bare": [], "layered": []}
        for _ in range(rounds):
            for name, turn in (("bare", bare), ("layered", layered)):
                n, started = 1500, time.perf_counter()
                for _ in range(n):
                    turn()
                    db.execute("COMMIT")
                rates[name].append(n / (time.perf_counter() - started))
        for name, r in rates.items():
            print(f"{name:8} turns/s: {[round(x) for x in r]}")
        ratios = [l / b for l, b in zip(rates["layered"], rates["bare"])]
        print(f"layered/bare: median {statistics.median(ratios):.2f} (rounds {[round(x, 2) for x in ratios]})")


if __name__ == "__main__":
    main()
