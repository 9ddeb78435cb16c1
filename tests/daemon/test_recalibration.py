"""The device's recalibration evidence and audit sampling.

Pure: how bundle score sets, confirmations and the verdict stream become the evidence
(last label wins, no part counted twice), the escape-rate tally from audit draws, the
audit draw itself. Real SQLite: the audit flag of verdicts and confirmations, the verdict
stream, an old database upgraded in place. End to end through ThresholdKeeper + Store: a
device recalibration after k confirmed NG equals `ngcal calibrate --real-ng` offline on the
same evidence, and a threshold change logs at INFO.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from daemon_kit import TINY_MODEL_SHA, make_tiny_bundle

from ngcal.cli.main import main as ngcal_main
from ngcal.core.bundle import open_bundle
from ngcal.core.errors import ArtifactError
from ngcal.core.mqtt_schema import RecalibrationPayload, VerdictPayload
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.core.thresholds import load_thresholds
from ngcal.daemon.config import RecalibrationConfig, load_config
from ngcal.daemon.evidence import (
    assemble_evidence,
    audit_draw,
    escape_audit,
    latest_confirmations,
    with_escape_notes,
)
from ngcal.daemon.messages import Outbound, Topics, Verdict
from ngcal.daemon.recalibration import ThresholdKeeper, threshold_payload
from ngcal.daemon.store import Store, add_confirmation

SHA = TINY_MODEL_SHA


def conf(sha: str, label: str, score: float, audited: int = 0) -> dict[str, object]:
    return {"sha256": sha, "label": label, "score": score, "audited": audited}


def sset(source: str, scores: list[float]) -> ScoreSet:
    return ScoreSet(
        source=source,  # type: ignore[arg-type]
        scores=np.asarray(scores, dtype=np.float64),
        item_ids=tuple(f"{source}/{i}" for i in range(len(scores))),
        model_sha256=SHA,
    )


def test_evidence_takes_the_last_label_and_counts_no_part_twice():
    """real_ng comes from the last label of each image (a bundle's own real sets are
    replaced); real_ok is the line's good parts: confirmed OKs plus the verdicts nobody
    labelled, each image once (without a stream: the confirmed OKs alone)."""
    bundle = [sset("normal_loo", [0.1, 0.2, 0.3]), sset("glass_image", [0.9, 1.0])]
    bundle.append(sset("real_ng", [5.0]))  # shipped real NG: replaced by the device's labels
    rows = [
        conf("a", "NG", 0.8),
        conf("b", "OK", 0.7),
        conf("a", "OK", 0.8),  # relabelled: the last label wins
        conf("c", "NG", 0.95, audited=1),
    ]
    stream = [("a", 0.8), ("b", 0.7), ("c", 0.95), ("d", 0.2), ("e", 0.25)]
    ev = assemble_evidence(bundle, rows, stream, model_sha256=SHA, contamination_bound=0.02)
    by = {s.source: s for s in ev.sets}
    assert sorted(by) == ["glass_image", "normal_loo", "real_ng", "real_ok"]
    assert by["real_ng"].item_ids == ("c",) and by["real_ng"].scores.tolist() == [0.95]
    assert by["real_ok"].item_ids == ("a", "b", "d", "e")
    assert by["real_ok"].scores.tolist() == [0.8, 0.7, 0.2, 0.25]
    assert by["real_ok"].model_sha256 == SHA
    assert by["real_ok"].meta == {
        "confirmed_ok": 2,
        "unlabelled_verdicts": 2,
        "contamination_bound": 0.02,
    }
    assert sorted(ev.stream.tolist()) == [0.2, 0.25]  # labelled images left the stream
    summary = ev.summary()
    assert summary["counts"] == {"glass_image": 2, "normal_loo": 3, "real_ng": 1, "real_ok": 4}
    assert summary["stream"] == {"n": 2, "contamination_bound": 0.02}
    assert summary["escape_audit"]["checked"] == 1
    off = assemble_evidence(bundle, rows, [], model_sha256=SHA, contamination_bound=0.02)
    ok = next(s for s in off.sets if s.source == "real_ok")
    assert ok.item_ids == ("a", "b") and ok.meta == {} and off.stream.size == 0


def test_escape_rate_comes_only_from_audited_confirmations():
    """Escapes found downstream (not audited) never enter the estimate; audited checks give
    k/n with a Jeffreys interval that contains it; no checks: no estimate."""
    rows = [conf(f"x{i}", "OK", 0.1, audited=1) for i in range(38)]
    rows += [conf("y0", "NG", 0.2, audited=1), conf("y1", "NG", 0.3, audited=1)]
    rows += [conf(f"z{i}", "NG", 0.4) for i in range(10)]  # found downstream: selected
    a = escape_audit(latest_confirmations(rows), drawn=55)
    assert (a.drawn, a.checked, a.escaped) == (55, 40, 2)
    assert a.rate is not None and a.rate.value == pytest.approx(0.05)
    assert a.rate.low is not None and a.rate.high is not None
    assert 0.005 < a.rate.low < 0.05 < a.rate.high < 0.2
    assert a.rate.kind == "interval" and a.rate.n == 40
    none = escape_audit(latest_confirmations(rows[-10:]), drawn=0)
    assert none.rate is None and none.checked == 0


def test_an_applied_threshold_states_the_audited_miss_rate():
    """With audit checks, the applied threshold's stated miss rate is the audit's interval
    (escapes per passed part, times passed parts, over all defects: 2/100 x 1000 / (20 +
    40) = 1/3), basis and sentence say so; a refused decision is left as it is."""
    from ngcal.calibration.policy import PolicyState, rollback
    from ngcal.calibration.statements import sentence
    from ngcal.core.thresholds import Interval, ThresholdFile

    guess = Interval(value=0.1, low=0.0, high=0.9, kind="estimate", basis="synthetic NG")
    v1 = ThresholdFile(value=1.0, mode="cost", method="m", expected_fnr=guess)
    v2 = v1.model_copy(update={"value": 2.0, "version": 2})
    state = PolicyState(current=v2, history=(v1, v2))
    rows = [conf(f"x{i}", "OK", 0.1, audited=1) for i in range(98)]
    rows += [conf("y0", "NG", 0.2, audited=1), conf("y1", "NG", 0.3, audited=1)]
    audit = escape_audit(latest_confirmations(rows), drawn=100, passed=1000, caught=40)
    d = with_escape_notes(rollback(state, 1, actor="qa"), audit)
    t = d.new_state.current
    assert d.applied and t.notes["escape_checked"] == 100
    miss = t.miss_rate_by_source["audit"]
    assert miss.value == pytest.approx(1 / 3)
    assert miss.low is not None and miss.high is not None and miss.low < 1 / 3 < miss.high
    assert t.expected_fnr is not None and t.expected_fnr.kind == "interval"
    assert "audited" in (t.expected_fnr.basis or "")
    assert "random audits" in sentence(t)
    refused = rollback(state, 7, actor="qa")
    assert with_escape_notes(refused, audit) is refused


def test_audit_draw_is_a_uniform_share_independent_of_the_verdict():
    """Share 0 never draws; share 0.1 draws ~10% of ids; the same id and salt always draw
    the same way; another device's salt draws other ids."""
    ids = [f"{i:032x}" for i in range(20000)]
    assert not any(audit_draw(0.0, "s", m) for m in ids)
    drawn = [m for m in ids if audit_draw(0.1, "s", m)]
    assert 0.09 < len(drawn) / len(ids) < 0.11
    assert drawn == [m for m in ids if audit_draw(0.1, "s", m)]
    other = {m for m in ids if audit_draw(0.1, "t", m)}
    assert len(other & set(drawn)) < 0.2 * len(drawn)
    assert all(audit_draw(1.0, "s", m) for m in ids[:100])


def verdict(msg_id: str, sha: str, label: str, score: float, at: float, audit: bool) -> Verdict:
    return Verdict(
        msg_id=msg_id,
        camera="cam",
        path=f"{msg_id}.png",
        size=1,
        mtime_ns=1,
        sha256=sha,
        verdict=label,  # type: ignore[arg-type]
        reason=None,
        score=score,
        threshold=0.5,
        threshold_version=1,
        model_sha256=SHA,
        detected_at=at,
        decided_at=at,
        audit=audit,
    )


def test_store_keeps_audit_flags_and_the_verdict_stream(tmp_path):
    """The verdict's audit flag is stored and in its payload; a confirmation of an audited
    verdict is recorded as audited; recent_scores returns the newest scored verdicts of
    this model only."""
    store = Store(tmp_path)
    vs = [
        verdict("m1", "s1", "OK", 0.1, 1.0, True),
        verdict("m2", "s2", "OK", 0.2, 2.0, False),
        verdict("m3", "s3", "NG", 0.9, 3.0, False),
    ]
    store.record_verdicts([(v, Outbound("t", v.payload(), v.msg_id)) for v in vs])
    assert json.loads(vs[0].payload())["audit"] is True
    assert json.loads(vs[1].payload())["audit"] is False
    assert store.audited_count(SHA) == 1 and store.audited_count("other") == 0
    with store.tx() as c:
        add_confirmation(c, "r1", msg_id="m1", sha256="s1", label="NG", score=0.1, operator="o")
        add_confirmation(c, "r2", msg_id="m3", sha256="s3", label="OK", score=0.9, operator="o")
        add_confirmation(c, "r3", msg_id=None, sha256="s9", label="NG", score=2.0, operator="o")
    audited = {r["request_id"]: r["audited"] for r in store.confirmations()}
    assert audited == {"r1": 1, "r2": 0, "r3": 0}
    assert store.recent_scores(SHA, 2) == [("s3", 0.9), ("s2", 0.2)]
    assert store.recent_scores("other", 10) == []
    store.close()


def test_a_database_of_the_previous_release_gains_the_audit_columns(tmp_path):
    """A state.db without the audit columns is upgraded at open; its rows read audit 0."""
    db = tmp_path / "state.db"
    c = sqlite3.connect(db)
    c.executescript(
        f"""CREATE TABLE verdicts (
    msg_id TEXT PRIMARY KEY, camera TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT,
    score REAL, threshold REAL, threshold_version INTEGER, model_sha256 TEXT NOT NULL,
    detected_at REAL NOT NULL, decided_at REAL NOT NULL);
CREATE TABLE confirmations (
    request_id TEXT PRIMARY KEY, msg_id TEXT, sha256 TEXT NOT NULL, label TEXT NOT NULL,
    score REAL NOT NULL, operator TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO verdicts VALUES ('old','cam','p',1,1,'s','OK',NULL,0.1,0.5,1,'{SHA}',1.0,1.0);
"""
    )
    c.close()
    store = Store(tmp_path)
    assert store.verdict_by_msg_id("old")["audit"] == 0  # type: ignore[index]
    v = verdict("new", "s2", "OK", 0.2, 2.0, True)
    store.record_verdicts([(v, Outbound("t", v.payload(), v.msg_id))])
    assert store.audited_count(SHA) == 1
    store.close()


def test_device_recalibration_equals_offline_calibrate_on_the_same_evidence(tmp_path, caplog):
    """After k confirmed NG the ThresholdKeeper (bundle score sets incl. synthetic NG +
    confirmations from the Store) applies exactly the threshold `ngcal calibrate --model
    BUNDLE --real-ng DIR` writes offline on the same evidence, for k = 1, 3 and 5; the
    change is logged at INFO, not WARNING."""
    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5, n_normal=200)
    rng = np.random.default_rng(3)
    glass = sset("glass_image", rng.uniform(0.6, 1.2, 60).tolist())
    save_scoreset(bundle_dir / "scores" / "glass_image.json", glass)  # shipped evidence
    real = rng.uniform(0.5, 1.1, 5)
    for k in (1, 3, 5):
        state = tmp_path / f"state{k}"
        store = Store(state)
        cfg = RecalibrationConfig(min_real_ng=k, max_step=1e6, hysteresis=0.0, stream_window=0)
        keeper = ThresholdKeeper(store, state, open_bundle(bundle_dir), cfg, Topics("n", "d"))
        with store.tx() as c:
            for i in range(k):
                add_confirmation(
                    c, f"r{i}", msg_id=None, sha256=f"img{i}", label="NG",
                    score=float(real[i]), operator="op",
                )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="ngcal.daemon.recalibration"):
            d = keeper.recalibrate(actor="test")
        assert d.applied, d.reason
        offline_dir = tmp_path / f"real{k}"
        offline_dir.mkdir()
        save_scoreset(
            offline_dir / "real_ng.json",
            ScoreSet(
                source="real_ng",
                scores=real[:k].copy(),
                item_ids=tuple(f"img{i}" for i in range(k)),
                model_sha256=SHA,
            ),
        )
        out = tmp_path / f"t{k}.json"
        assert (
            ngcal_main(
                ["calibrate", "--model", str(bundle_dir), "--real-ng", str(offline_dir),
                 "--out", str(out)]
            )
            == 0
        )  # fmt: skip
        offline = load_thresholds(out)
        assert keeper.current.value == offline.value
        assert keeper.current.evidence == offline.evidence
        assert offline.evidence["real_ng"] == k and offline.evidence["glass_image"] == 60
        store.close()
    changes = [r for r in caplog.records if "threshold recalibrate" in r.getMessage()]
    assert len(changes) == 3 and all(r.levelno == logging.INFO for r in changes)


def test_the_keeper_draws_with_one_salt_per_device(tmp_path: Path):
    """audit_share 1 draws everything; the device's salt is made once and kept across
    starts, and the keeper's draws are exactly ``audit_draw`` with that salt."""
    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5)
    store = Store(tmp_path / "state")
    on = ThresholdKeeper(
        store,
        tmp_path / "state",
        open_bundle(bundle_dir),
        RecalibrationConfig(audit_share=1.0),
        Topics("n", "d"),
    )
    assert on.audit_draw("any") is True
    salt = store.get_meta("audit_salt")
    again = ThresholdKeeper(
        store,
        tmp_path / "state",
        open_bundle(bundle_dir),
        RecalibrationConfig(audit_share=0.5),
        Topics("n", "d"),
    )
    assert store.get_meta("audit_salt") == salt  # one salt per device, kept across starts
    ids = [f"{i:032x}" for i in range(400)]
    assert [again.audit_draw(m) for m in ids] == [audit_draw(0.5, salt, m) for m in ids]
    store.close()


@pytest.mark.mqtt
def test_audited_verdicts_and_their_checks_over_a_real_broker(
    tmp_path, broker, daemon_process, tiny_bundle
):
    """audit_share 1: the OK verdict says audit true, the NG verdict audit false; the
    operator's check of the audited part (an escape) is recorded as audited and the
    recalibration event publishes the escape tally and the verdict stream it used."""
    from daemon_kit import Subscriber, daemon_config, write_image

    extra = "recalibration:\n  audit_share: 1.0\n  min_real_ng: 1\n"
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port, extra=extra)
    sub = Subscriber(broker.port, ("ngcal/#",), client_id="operator").start()
    d = daemon_process(cfg)
    d.start()
    watch = tmp_path / "watch" / "cam1"
    write_image(watch / "ok.png", 128)
    write_image(watch / "ng.png", 0)
    sub.wait(lambda: len(sub.json_on("cam1/verdict")) == 2, 30, "two verdicts")
    by = {v["image"]: v for v in sub.json_on("cam1/verdict")}
    assert (by["ok.png"]["verdict"], by["ok.png"]["audit"]) == ("OK", True)
    assert (by["ng.png"]["verdict"], by["ng.png"]["audit"]) == ("NG", False)
    sub.publish(
        "ngcal/dev1/cmd/confirm",
        {"request_id": "c1", "msg_id": by["ok.png"]["msg_id"], "label": "NG", "operator": "qa"},
    )
    sub.publish("ngcal/dev1/cmd/recalibrate", {"request_id": "r1", "dry_run": True})
    sub.wait(lambda: len(sub.json_on("/recalibration")) == 1, 30, "the recalibration event")
    for v in by.values():
        VerdictPayload.model_validate(v)
    RecalibrationPayload.model_validate(sub.json_on("/recalibration")[0])
    ev = sub.json_on("/recalibration")[0]["audit"]["device_evidence"]
    assert ev["escape_audit"]["drawn"] == 1
    assert (ev["escape_audit"]["checked"], ev["escape_audit"]["escaped"]) == (1, 1)
    assert (ev["escape_audit"]["passed"], ev["escape_audit"]["caught"]) == (1, 0)
    assert ev["counts"]["real_ng"] == 1 and ev["stream"]["n"] == 1  # ng.png, unlabelled
    con = sqlite3.connect(tmp_path / "state" / "state.db")
    assert con.execute("SELECT audited FROM confirmations").fetchall() == [(1,)]
    con.close()


def hand_edit(bundle_dir: Path, value: float) -> None:
    """Change the threshold's value in the bundle's thresholds.json as a person would."""
    p = bundle_dir / "thresholds.json"
    body = json.loads(p.read_text())
    body["value"] = value
    p.write_text(json.dumps(body))


def test_a_hand_edited_threshold_is_refused_unless_the_override_is_set(tmp_path):
    """A thresholds.json edited after ngcal wrote it stops the daemon's bundle open with one
    line naming the override flag; check-config names it too. With
    accept_manual_thresholds the keeper starts from it, audits it, queues a
    ``manual_override`` recalibration event and flags it in the retained threshold."""
    from ngcal.daemon.preflight import bundle_problems
    from ngcal.daemon.recalibration import open_with_thresholds
    from ngcal.daemon.service import Daemon

    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5)
    hand_edit(bundle_dir, 1.0)
    strict = RecalibrationConfig()
    with pytest.raises(ArtifactError, match="accept_manual_thresholds") as ei:
        open_with_thresholds(bundle_dir, strict)
    assert "\n" not in str(ei.value)
    (tmp_path / "cam").mkdir()
    cfg_path = tmp_path / "d.yaml"
    cfg_path.write_text(
        f"device_id: d\nbundle: {bundle_dir}\nstate_dir: state\n"
        "cameras:\n  - id: c\n    watch: cam\n"
    )
    cfg = load_config(cfg_path)
    problems = bundle_problems(cfg)
    assert len(problems) == 1 and "digest" in problems[0] and "accept_manual" in problems[0]
    with pytest.raises(ArtifactError, match="accept_manual_thresholds"):
        Daemon(cfg).start()
    allowed = RecalibrationConfig(accept_manual_thresholds=True)
    assert bundle_problems(cfg.model_copy(update={"recalibration": allowed})) == []
    bundle, why = open_with_thresholds(bundle_dir, allowed)
    assert why is not None and "digest" in why
    store = Store(tmp_path / "state")
    keeper = ThresholdKeeper(
        store, tmp_path / "state", bundle, allowed, Topics("n", "d"), manual_override=why
    )
    assert keeper.current.value == 1.0
    assert keeper.current.notes["manual_override"] == why
    assert json.loads(threshold_payload(keeper.current))["notes"]["manual_override"] == why
    rows = store.audit_rows("threshold_manual_override")
    assert len(rows) == 1 and rows[0]["actor"] == "operator override"
    events = [json.loads(r.payload) for r in store.unsent(exclude=set(), limit=10)]
    assert [e["action"] for e in events] == ["manual_override"]
    assert events[0]["new"]["value"] == 1.0 and "accept_manual_thresholds" in events[0]["reason"]
    # the exported copy in the state folder is signed: ngcal wrote it
    assert load_thresholds(tmp_path / "state" / "thresholds.json").value == 1.0
    store.close()


@pytest.mark.mqtt
def test_a_manual_threshold_override_is_published_over_a_real_broker(
    tmp_path, broker, daemon_process
):
    """With accept_manual_thresholds a hand-edited threshold is used, announced as a
    ``manual_override`` recalibration event and flagged in the retained threshold."""
    from daemon_kit import Subscriber, daemon_config

    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5)
    hand_edit(bundle_dir, 0.75)
    extra = "recalibration:\n  accept_manual_thresholds: true\n"
    cfg = daemon_config(tmp_path, bundle_dir, broker.port, extra=extra)
    sub = Subscriber(broker.port, ("ngcal/#",), client_id="operator").start()
    d = daemon_process(cfg)
    d.start()
    sub.wait(lambda: len(sub.json_on("/recalibration")) == 1, 30, "the override event")
    sub.wait(lambda: len(sub.json_on("/threshold")) >= 1, 30, "the retained threshold")
    event = sub.json_on("/recalibration")[0]
    assert event["action"] == "manual_override" and event["new"]["value"] == 0.75
    RecalibrationPayload.model_validate(event)  # the documented MQTT contract
    retained = sub.json_on("/threshold")[-1]
    assert retained["value"] == 0.75 and "digest" in retained["notes"]["manual_override"]
    assert "accepted by recalibration.accept_manual_thresholds" in d.log()


def test_an_applied_threshold_states_the_audited_escape_rate(tmp_path):
    """After audited OK verdicts were checked (1 of 4 found defective), the applied
    threshold's notes carry the escape rate with its interval and the number of checks;
    escapes found downstream without an audit draw do not count."""
    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5, n_normal=200)
    store = Store(tmp_path / "state")
    cfg = RecalibrationConfig(min_real_ng=1, max_step=1e6, hysteresis=0.0, stream_window=0)
    keeper = ThresholdKeeper(
        store, tmp_path / "state", open_bundle(bundle_dir), cfg, Topics("n", "d")
    )
    vs = [verdict(f"m{i}", f"s{i}", "OK", 0.1 * i, float(i), i < 4) for i in range(6)]
    store.record_verdicts([(v, Outbound("t", v.payload(), v.msg_id)) for v in vs])
    labels = ["NG", "OK", "OK", "OK", "NG", "NG"]  # m0-m3 audited; m4, m5 found downstream
    with store.tx() as c:
        for i, lab in enumerate(labels):
            add_confirmation(
                c, f"r{i}", msg_id=f"m{i}", sha256=f"s{i}", label=lab, score=0.1 * i,
                operator="qa",
            )  # fmt: skip
    d = keeper.recalibrate(actor="test")
    assert d.applied, d.reason
    notes = keeper.current.notes
    assert notes["escape_rate"] == 0.25 and notes["escape_checked"] == 4
    low, high = notes["escape_rate_low"], notes["escape_rate_high"]
    assert isinstance(low, float) and isinstance(high, float) and low < 0.25 < high
    assert keeper.state.history[-1] == keeper.current  # the stored history holds the notes
    assert json.loads(threshold_payload(keeper.current))["notes"]["escape_rate"] == 0.25
    store.close()


def test_with_the_stream_the_device_still_equals_offline_calibrate(tmp_path):
    """Stream on (the default): the keeper's threshold equals `ngcal calibrate --real-ng
    NG --scores OK` where OK holds the confirmed OKs and the unlabelled verdicts."""
    bundle_dir = make_tiny_bundle(tmp_path / "bundle", threshold=0.5, n_normal=200)
    rng = np.random.default_rng(5)
    save_scoreset(
        bundle_dir / "scores" / "glass_image.json",
        sset("glass_image", rng.uniform(0.6, 1.2, 60).tolist()),
    )
    store = Store(tmp_path / "state")
    cfg = RecalibrationConfig(min_real_ng=3, max_step=1e6, hysteresis=0.0)
    keeper = ThresholdKeeper(
        store, tmp_path / "state", open_bundle(bundle_dir), cfg, Topics("n", "d")
    )
    scores = rng.uniform(0.0, 0.9, 60)
    vs = [verdict(f"m{i}", f"s{i}", "OK", float(x), float(i), False) for i, x in enumerate(scores)]
    store.record_verdicts([(v, Outbound("t", v.payload(), v.msg_id)) for v in vs])
    labels = {0: "NG", 1: "NG", 2: "NG", 3: "OK", 4: "OK"}
    with store.tx() as c:
        for i, lab in labels.items():
            add_confirmation(
                c, f"r{i}", msg_id=f"m{i}", sha256=f"s{i}", label=lab,
                score=float(scores[i]), operator="qa",
            )  # fmt: skip
    assert keeper.recalibrate(actor="test").applied
    ng_dir, ok_file = tmp_path / "ng", tmp_path / "ok.json"
    ng_dir.mkdir()
    ng = [0, 1, 2]
    save_scoreset(
        ng_dir / "real_ng.json",
        ScoreSet("real_ng", scores[ng], tuple(f"s{i}" for i in ng), model_sha256=SHA),
    )
    ok = [3, 4] + [i for i in reversed(range(60)) if i not in labels]  # stream: newest first
    save_scoreset(
        ok_file, ScoreSet("real_ok", scores[ok], tuple(f"s{i}" for i in ok), model_sha256=SHA)
    )
    out = tmp_path / "t.json"
    argv = ["calibrate", "--model", str(bundle_dir), "--real-ng", str(ng_dir)]
    assert ngcal_main([*argv, "--scores", str(ok_file), "--out", str(out)]) == 0
    offline = load_thresholds(out)
    assert keeper.current.value == offline.value
    assert offline.evidence["real_ok"] == 57 and keeper.current.evidence["real_ok"] == 57
    store.close()


def test_policy_config_carries_the_config_guard_rails():
    """Every guard rail of the config section reaches the policy (gain_level included);
    the daemon's defaults are the policy's."""
    from ngcal.calibration.policy import PolicyConfig
    from ngcal.daemon.recalibration import policy_config

    pc = policy_config(
        RecalibrationConfig(gain_level=0.5, min_real_ng=7, max_step=0.2, hysteresis=0.03)
    )
    assert (pc.gain_level, pc.min_real_ng, pc.max_step, pc.hysteresis) == (0.5, 7, 0.2, 0.03)
    assert policy_config(RecalibrationConfig(), dry_run=True).dry_run is True
    default, lib = policy_config(RecalibrationConfig()), PolicyConfig()
    assert (default.gain_level, default.mode, default.operating_point) == (
        lib.gain_level,
        lib.mode,
        lib.operating_point,
    )
