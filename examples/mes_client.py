"""A minimal MES client for the ngcal daemon (paho-mqtt 2, MQTT v5, QoS 1).

It subscribes to every camera's verdicts and to the command acks, prints them, and pushes
an operator's decisions typed on stdin:

    confirm <msg_id> NG|OK      label a verdict (a real NG, or a false alarm OK)
    recalibrate [dry]           ask the daemon to recalibrate now (or a dry run)
    rollback <version>          restore an earlier threshold version

Run:  python examples/mes_client.py --host 127.0.0.1 --port 1883 --device line1-box1
The topics and payloads are in docs/mqtt.md; their JSON Schemas in schemas/.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class MesClient:
    """Verdicts and acks in (``on_message(topic, body)``), commands out, QoS 1."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        prefix: str = "ngcal",
        device: str,
        on_message: Callable[[str, dict[str, Any]], None],
        operator: str = "mes",
    ) -> None:
        self.base = f"{prefix}/{device}"
        self.operator = operator
        self._on_message = on_message
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"mes-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._subscribe
        self.client.on_message = self._receive
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _subscribe(self, client: Any, _userdata: Any, _flags: Any, _rc: Any, _props: Any) -> None:
        # on every (re)connect: verdicts of every camera, command answers, recalibrations
        for topic in ("+/verdict", "cmd/ack", "recalibration", "threshold", "status"):
            client.subscribe(f"{self.base}/{topic}", qos=1)

    def _receive(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict):
            self._on_message(msg.topic, body)

    def send(self, kind: str, **fields: Any) -> str:
        """Publish ``cmd/<kind>`` with a fresh request_id (the daemon acks it on cmd/ack)."""
        request_id = f"mes-{uuid.uuid4().hex}"
        body = {"request_id": request_id, "operator": self.operator, **fields}
        self.client.publish(f"{self.base}/cmd/{kind}", json.dumps(body), qos=1).wait_for_publish(10)
        return request_id

    def confirm(self, msg_id: str, label: str) -> str:
        return self.send("confirm", msg_id=msg_id, label=label)

    def recalibrate(self, *, dry_run: bool = False) -> str:
        return self.send("recalibrate", dry_run=dry_run)

    def rollback(self, version: int) -> str:
        return self.send("rollback", version=version)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def show(topic: str, body: dict[str, Any]) -> None:
    """One line per message."""
    if topic.endswith("/verdict"):
        print(
            f"verdict {body['verdict']} {body['image']} score {body['score']} id {body['msg_id']}"
        )
    elif topic.endswith("/cmd/ack"):
        print(f"ack {body['request_id']}: {body['status']} {body.get('reason') or ''}")
    elif topic.endswith("/recalibration"):
        print(f"recalibration applied={body['applied']}: {body['reason']}")
    elif topic.endswith("/threshold"):
        print(f"threshold v{body['version']} {body['value']}")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--prefix", default="ngcal")
    p.add_argument("--device", required=True)
    p.add_argument("--operator", default="mes")
    a = p.parse_args()
    mes = MesClient(
        a.host, a.port, prefix=a.prefix, device=a.device, on_message=show, operator=a.operator
    )
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["confirm"] and len(words) == 3:
                print("sent", mes.confirm(words[1], words[2].upper()))
            elif words[:1] == ["recalibrate"]:
                print("sent", mes.recalibrate(dry_run=words[1:] == ["dry"]))
            elif words[:1] == ["rollback"] and len(words) == 2:
                print("sent", mes.rollback(int(words[1])))
            elif words:
                print("commands: confirm <msg_id> NG|OK | recalibrate [dry] | rollback <version>")
    except KeyboardInterrupt:
        pass
    finally:
        mes.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
