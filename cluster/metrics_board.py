"""Where engine replicas leave their metrics snapshots for whichever replica answers `/metrics`: Ray's cluster
key-value store (GCS).

Serve's proxy sends a scrape to one replica, which cannot ask every other replica for its numbers; instead
each replica writes its snapshot under its own key every `PUBLISH_INTERVAL_S`, and readers take every key of
the application that is fresh. A replica that died stops refreshing its key and drops out after `STALE_AFTER_S`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.experimental import internal_kv

logger = logging.getLogger(__name__)

NAMESPACE = "rayinfer-metrics"
PUBLISH_INTERVAL_S = 0.5
# A replica rewrites its key at least this often even when nothing changed, so freshness means alive.
REFRESH_S = 5.0
STALE_AFTER_S = 20.0


def _key(app_name: str, replica_id: str) -> str:
    return f"{app_name}/{replica_id}"


class Publisher:
    """A daemon thread that writes `snapshot()` under the replica's key when it changes (or to refresh it)."""

    def __init__(self, app_name: str, replica_id: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.key = _key(app_name, replica_id)
        self.snapshot = snapshot
        self._stopped = threading.Event()
        self._poked = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayinfer-metrics-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_body, last_write = None, 0.0
        while not self._stopped.is_set():
            self._poked.wait(PUBLISH_INTERVAL_S)
            self._poked.clear()
            try:
                body = json.dumps(self.snapshot(), sort_keys=True)
                now = time.time()
                if body != last_body or now - last_write >= REFRESH_S:
                    payload = json.dumps({"updated_at": now, "snapshot": json.loads(body)})
                    internal_kv._internal_kv_put(self.key, payload, overwrite=True, namespace=NAMESPACE)
                    last_body, last_write = body, now
            except Exception:  # metrics must never take the replica down
                logger.exception("publishing metrics failed")

    def poke(self) -> None:
        """Publishes now rather than at the next interval (a request ended: its numbers should show at once)."""
        self._poked.set()

    def stop(self) -> None:
        self._stopped.set()
        self._poked.set()
        self._thread.join(timeout=5)
        try:
            internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)
        except Exception:
            logger.warning("could not remove metrics key %s", self.key)


def live_snapshots(app_name: str) -> list[dict[str, Any]]:
    """The fresh snapshots of the application's replicas; keys of replicas that died are removed."""
    snapshots = []
    now = time.time()
    for key in internal_kv._internal_kv_list(f"{app_name}/", namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        entry = json.loads(raw)
        if now - entry["updated_at"] > STALE_AFTER_S:
            internal_kv._internal_kv_del(key, namespace=NAMESPACE)
            continue
        snapshots.append(entry["snapshot"])
    return snapshots
