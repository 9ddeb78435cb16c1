"""The daemon: wires store, model, threshold, MQTT, relay, intake, scoring and commands.

Start order: state database, bundle and scorer (a probe inference), threshold, MQTT link
and relay (connecting in the background), scoring threads, watchers and the first
reconciliation scan, command handler; then systemd READY. The main thread then pings the
systemd watchdog only while every worker's heartbeat is fresh, and updates STATUS.

Stop (SIGTERM/SIGINT set the stop event): STOPPING; stop taking files; let the scoring
threads finish what is queued; give the relay ``drain_timeout_s`` to empty the outbox;
publish availability ``offline``; disconnect. Whatever is still unsent stays in the outbox
for the next start.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from ngcal.core.errors import ConfigError
from ngcal.core.runtime import open_scorer

from .commands import CommandHandler
from .config import DaemonConfig
from .intake import Candidate, Intake
from .link import MqttLink
from .messages import STATUS_SCHEMA, Topics
from .notify import Notifier
from .preflight import environment_problems
from .recalibration import ThresholdKeeper, open_with_thresholds, threshold_payload
from .relay import Relay
from .scoring import ScoringPipeline
from .store import Store

log = logging.getLogger(__name__)


class Daemon:
    """One ``ngcal serve`` process; complete after ``start()``, finished after ``shutdown()``."""

    def __init__(
        self, cfg: DaemonConfig, *, notifier: Notifier | None = None, reconnect_max_s: int = 30
    ) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.reconnect_max_s = reconnect_max_s
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.device_id)
        self.started_at = time.time()
        self._disconnected_since: float | None = time.monotonic()

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Bring every part up in dependency order, then notify READY."""
        cfg = self.cfg
        problems = environment_problems(cfg)
        if problems:
            raise ConfigError(
                f"{len(problems)} problem(s) in the config:\n  " + "\n  ".join(problems)
            )
        self.notifier.status("opening state database")
        self.store = Store(cfg.state_dir)
        self.notifier.status("loading model")
        self.bundle, manual = open_with_thresholds(cfg.bundle, cfg.recalibration)
        self.scorer = open_scorer(
            self.bundle,
            backend=cfg.runtime.backend,
            threads=cfg.runtime.threads,
            cache_dir=cfg.runtime.cache_dir,
            max_batch=cfg.runtime.batch_size,
        )
        self.keeper = ThresholdKeeper(
            self.store,
            cfg.state_dir,
            self.bundle,
            cfg.recalibration,
            self.topics,
            manual_override=manual,
        )
        client_id = cfg.mqtt.client_id or f"ngcal-{cfg.device_id}"
        self.link = MqttLink(
            cfg.mqtt, self.topics, client_id=client_id, reconnect_max_s=self.reconnect_max_s
        )
        self.relay = Relay(
            self.store,
            self.link,
            max_inflight=cfg.mqtt.max_inflight,
            retained=self.retained_messages,
            status_interval_s=cfg.service.status_interval_s,
        )
        self.keeper.on_change = lambda _t: self.relay.republish_retained()
        self.intake = Intake(cfg.cameras, cfg.intake, self.store, on_skip=self._skipped)
        self.pipeline = ScoringPipeline(
            device=cfg.device_id,
            source=self.intake.queue,
            done=self.intake.done,
            scorer=self.scorer,
            keeper=self.keeper,
            store=self.store,
            topics=self.topics,
            model_sha256=self.bundle.model_sha256,
            batch_size=cfg.runtime.batch_size,
            max_pixels=cfg.intake.max_pixels,
            on_commit=lambda _n: self.relay.wake(),
        )
        self.commands = CommandHandler(
            store=self.store,
            link=self.link,
            keeper=self.keeper,
            topics=self.topics,
            max_bytes=cfg.mqtt.max_command_bytes,
            intake_dir=cfg.recalibration.intake_dir,
            auto_recalibrate=cfg.recalibration.auto_on_confirm,
            score_file=self.pipeline.score_file,
            on_commit=self.relay.wake,
        )
        self.notifier.status("connecting")
        self.link.start()
        self.relay.start()
        self.pipeline.start()
        self.intake.start()
        self.commands.start()
        self.store.set_meta(
            "service",
            {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "device_id": cfg.device_id,
                "model_sha256": self.bundle.model_sha256,
                "engine": self.scorer.name,
            },
        )
        t = self.keeper.current
        log.info("%s", self.startup_summary())
        self.notifier.ready(f"ready: {self.scorer.name}, threshold v{t.version} {t.value:.6g}")

    def startup_summary(self) -> str:
        """One line: bundle, model, engine, threshold, cameras, broker and TLS, audit share."""
        cfg, t = self.cfg, self.keeper.current
        cams = ", ".join(f"{c.id}={c.watch}" for c in cfg.cameras)
        return (
            f"ngcal serve {cfg.device_id}: bundle {cfg.bundle} (model "
            f"{self.bundle.model_sha256[:12]}, {self.scorer.name}); threshold v{t.version} "
            f"{t.value:.6g} ({t.mode}, by {t.created_by}); cameras {cams}; broker "
            f"{cfg.mqtt.host}:{cfg.mqtt.port} TLS {'on' if cfg.mqtt.tls else 'off'}; "
            f"audit {cfg.recalibration.audit_share:.1%} of OK verdicts"
        )

    def _skipped(self, cand: Candidate, reason: str) -> None:
        log.warning("skip %s/%s: %s", cand.camera, cand.rel, reason)

    # ------------------------------------------------------------------ running
    def heartbeats(self) -> dict[str, float]:
        """Seconds since each worker last reported."""
        now = time.monotonic()
        beats = {
            "intake": self.intake.heartbeat,
            "relay": self.relay.heartbeat,
            "commands": self.commands.heartbeat,
            **self.pipeline.heartbeat,
        }
        return {k: round(now - v, 3) for k, v in beats.items()}

    def healthy(self) -> bool:
        return max(self.heartbeats().values()) < self.cfg.service.heartbeat_timeout_s

    def run_until(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set: watchdog pings, STATUS, alarms."""
        interval = self.notifier.watchdog_interval_s() or 5.0
        tick = min(interval, 2.0)
        next_ping = 0.0
        while not stop.wait(tick):
            now = time.monotonic()
            if self.link.connected.is_set():
                self._disconnected_since = None
            elif self._disconnected_since is None:
                self._disconnected_since = now
            elif now - self._disconnected_since > 60:
                self.store.raise_alarm("mqtt_disconnected", self.relay.last_disconnect or "")
            if now >= next_ping:
                if self.healthy():
                    self.notifier.watchdog()
                else:
                    log.error("worker heartbeat stale, withholding WATCHDOG: %s", self.heartbeats())
                next_ping = now + interval
                ob = self.store.outbox_stats()
                self.notifier.status(
                    f"{self.pipeline.verdicts} verdicts, outbox {ob['backlog']}, queue "
                    f"{self.intake.queue.qsize()}, mqtt "
                    f"{'up' if self.link.connected.is_set() else 'down'}"
                )

    def shutdown(self) -> None:
        """Drain and stop (see module docstring)."""
        drain = self.cfg.service.drain_timeout_s
        deadline = time.monotonic() + drain
        self.notifier.stopping("draining")
        self.intake.stop()
        self.pipeline.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.commands.stop()
        if self.link.connected.is_set():
            self.relay.drain(max(0.0, deadline - time.monotonic()))
        self.relay.stop()
        self.link.stop()
        backlog = self.store.outbox_stats()["backlog"]
        if backlog:
            log.warning(
                "stopping with %d message(s) in the outbox; they go out on next start", backlog
            )
        self.scorer.close()
        self.store.close()
        self.notifier.close()

    # ------------------------------------------------------------------ retained state
    def status_payload(self) -> dict[str, Any]:
        t = self.keeper.current
        return {
            "schema": STATUS_SCHEMA,
            "device": self.cfg.device_id,
            "time": time.time(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "model_sha256": self.bundle.model_sha256,
            "engine": self.scorer.name,
            "threshold": {"value": t.value, "version": t.version},
            "outbox": self.store.outbox_stats(),
            "queue_depth": self.intake.queue.qsize(),
            "verdicts_since_start": self.pipeline.verdicts,
            "last_verdict_at": self.pipeline.last_verdict_at,
            "dropped_events": self.intake.dropped_events,
            "alarms": self.store.active_alarms(),
            "heartbeats_s": self.heartbeats(),
        }

    def retained_messages(self) -> list[tuple[str, bytes]]:
        """availability, threshold and status, in that order."""
        status = json.dumps(self.status_payload(), separators=(",", ":"), default=str).encode()
        return [
            (self.topics.availability, b"online"),
            (self.topics.threshold, threshold_payload(self.keeper.current)),
            (self.topics.status, status),
        ]
