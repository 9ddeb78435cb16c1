"""Fixtures for the daemon tests (helpers live in ``daemon_kit.py`` beside this file)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_kit import (  # noqa: E402
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    Broker,
    DaemonProcess,
    make_tiny_bundle,
    missing,
)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    if not os.path.exists(MOSQUITTO):
        missing(f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    made: list[Broker] = []

    def make(**kw: Any) -> Broker:
        if kw.get("users") and MOSQUITTO_PASSWD is None:
            missing("mosquitto_passwd not installed (it ships with the mosquitto package)")
        b = Broker(tmp_path / f"broker{len(made)}", **kw)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., Broker]) -> Broker:
    return broker_factory()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # threshold 0.5: a uniform image of grey level g scores |2g/255 - 1|; NG beyond ~64 from 128
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle", threshold=0.5)


@pytest.fixture
def daemon_process(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(config: Path, **kw: Any) -> DaemonProcess:
        d = DaemonProcess(config, tmp_path, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
