"""The torch-free edge daemon: watch folders, score, decide, publish over MQTT, learn.

Modules, one concern each:

- ``config``: the YAML config (pydantic v2, ``extra="forbid"``) with file:line errors.
- ``store``: the SQLite (WAL) state database: verdicts, outbox, commands, audit, alarms.
- ``intake``: watchdog observers, size-stable polling, reconciliation scans, the queue.
- ``scoring``: image -> preprocessed tensor or ERROR, batched scoring, commit.
- ``decision``: ``decide()``, the OK/NG/ERROR rule of one scored image.
- ``link``: the one long-lived paho-mqtt client (MQTT v5, callback API v2), typed events.
- ``relay``: publishes the outbox QoS 1 and deletes rows on a successful PUBACK.
- ``commands``: ``cmd/confirm``, ``cmd/recalibrate``, ``cmd/rollback``, idempotent; poison
  messages are answered ``rejected``, never retried forever.
- ``recalibration``: the current threshold, recalibration through ``ngcal.calibration``.
- ``clock``: the time seam (tests drive a fake clock instead of sleeping).
- ``notify``: systemd ``sd_notify`` over ``$NOTIFY_SOCKET`` (no libsystemd needed).
- ``service``: wires the parts, runs until SIGTERM/SIGINT and drains.

Nothing here imports torch; onnxruntime and paho are imported where they are used.

Where this goes beyond ``architecture.md`` (and why):

- Commands are subscribed topic by topic (``cmd/confirm|recalibrate|rollback``), not as
  ``cmd/+``: the wildcard also matches the daemon's own ``cmd/ack`` and made it answer its
  own answers.
- The policy state is stored in the state database in the same transaction as its audit
  entry and ``recalibration`` event; ``policy_state.json``/``thresholds.json`` are atomic
  exports written after the commit (a crash between the two cannot make them disagree).
- The relay keeps at most min(``max_inflight``, the broker's MQTT v5 Receive Maximum)
  publishes in flight: paho does not enforce the broker's limit, stricter brokers than
  Mosquitto disconnect a client that exceeds it.
- sd_notify datagrams are sent non-blocking: a notify socket nobody reads (a supervisor
  that only waits for READY) would otherwise block the main thread and the stop.
- SQLite runs with ``synchronous=NORMAL``: a commit lost to a power cut also leaves its
  file unmarked, and the reconciliation scan scores it again under the same msg_id.
"""
