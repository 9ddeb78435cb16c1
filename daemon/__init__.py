"""The torch-free edge daemon: watch folders, score, decide, publish over MQTT, learn.

Modules, one concern each:

- ``config``: the YAML config (pydantic v2, ``extra="forbid"``) with file:line errors.
- ``store``: the SQLite (WAL) state database: verdicts, outbox, commands, audit, alarms.
- ``intake``: watchdog observers, size-stable polling, reconciliation scans, the queue.
- ``scoring``: image -> preprocessed tensor or ERROR, batched scoring, the decision.
- ``link``: the one long-lived paho-mqtt client (MQTT v5, callback API v2).
- ``relay``: publishes the outbox QoS 1 and deletes rows on a successful PUBACK.
- ``commands``: ``cmd/confirm``, ``cmd/recalibrate``, ``cmd/rollback``, idempotent.
- ``thresholds``: the current threshold, recalibration through ``ngcal.calibration``.
- ``notify``: systemd ``sd_notify`` over ``$NOTIFY_SOCKET`` (no libsystemd needed).
- ``service``: wires the parts, runs until SIGTERM/SIGINT and drains.

Nothing here imports torch; onnxruntime and paho are imported where they are used.
"""
