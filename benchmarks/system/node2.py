"""A second node for the store scenario: ``python -m benchmarks.system.node2 URL POLL``.

Opens the store with its in-memory index, then does what a dsbc worker's refresh task
does (dsbc/runner.py Worker._refresh): apply changes every POLL seconds, and at once when
the store says it has some (the Redis store's pub/sub thread).  Prints ``ready`` once
loaded, then ``seen <unix time> <customer id>`` for every change applied."""

from __future__ import annotations

import sys
import threading
import time

from dsbc.store import open_store


def main() -> None:
    url, poll = sys.argv[1], float(sys.argv[2])
    store = open_store(url)
    wake = threading.Event()
    set_notify = getattr(store, "set_notify", None)
    if set_notify is not None:
        set_notify(wake.set)
    print("ready", flush=True)
    while True:
        wake.wait(poll)
        wake.clear()
        changed = store.refresh()
        now = time.time()
        if changed:
            sys.stdout.write("".join(f"seen {now:.6f} {cid}\n" for cid in changed))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
