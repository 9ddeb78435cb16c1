"""Continual recalibration on a product's held-out split: does it learn, does it oscillate?

Usage::

    python benchmarks/continual.py --product NAME:DATA:MODEL:GLASS [--product ...]
        [--seeds 3] [--long 1500] [--cache runs/threshold_quality] [--audit-share 0.1]

Prints one JSON object (per product and seed: ``regret_initial``, ``regret_final``,
``threshold_moves``, ``reversals``) on stdout; progress on stderr. Test-split scores come
from ``threshold_quality.py``'s cache (scored once with torch).

Protocol per product and seed: the test split is halved at random (stratified); the
evaluation half judges every threshold (expected cost regret per part at prevalence 0.02
and cost ratio 10 against the half's own oracle threshold). The other half is the line:
the first threshold is ``calibrate`` (cost mode, defaults) on the model's normal score sets
and the GLASS sets (what ``ngcal export --thresholds`` ships), then images arrive in the
daemon's order: score -> verdict (NG when score >= current threshold) -> a simulated
operator confirms every NG verdict (NG or OK, the truth) and half of the missed defects
are found downstream and confirmed NG; ``--audit-share`` of the OK verdicts are drawn at
random for audit and truthfully confirmed (``audited``, the daemon's
``recalibration.audit_share``; 0 turns audits off) -> every 20 images the daemon's evidence
(``daemon.recalibration.assemble_evidence``: bundle sets, confirmations, the verdict
stream as the line's good parts, the audit tally) goes to
``calibration.policy.recalibrate`` with the daemon's default policy and the audit's
anchor (``daemon.evidence.audit_anchor`` at the threshold in force, decision 0304). Two
streams per seed: ``split`` (the line half once, shuffled)
and ``long`` (``--long`` draws with replacement at 5% defects: many confirmed false
alarms). ``reversals`` counts applied moves whose direction is opposite to the previous
applied move's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from threshold_quality import test_scores  # noqa: E402

from ngcal.calibration.estimate import calibrate  # noqa: E402
from ngcal.calibration.policy import PolicyConfig, PolicyState, recalibrate  # noqa: E402
from ngcal.core.manifest import manifest_sha256  # noqa: E402
from ngcal.core.metrics import min_expected_cost, rates_at  # noqa: E402
from ngcal.core.scoresets import NORMAL_SOURCES, SYNTHETIC_SOURCES, load_scoresets  # noqa: E402
from ngcal.core.thresholds import DEFAULT_COST_RATIO, DEFAULT_PREVALENCE  # noqa: E402
from ngcal.daemon.evidence import audit_anchor  # noqa: E402
from ngcal.daemon.recalibration import assemble_evidence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVERY = 20
FOUND_DOWNSTREAM = 0.5
LONG_PREVALENCE = 0.05


def say(msg: str) -> None:
    """Progress on stderr."""
    print(f"[continual] {msg}", file=sys.stderr, flush=True)


def regret(y: np.ndarray, s: np.ndarray, t: float) -> float:
    """Expected cost per part of ``t`` minus the oracle's, at the default operating point."""
    p, c = DEFAULT_PREVALENCE, DEFAULT_COST_RATIO
    r = rates_at(y, s, t)
    best, _ = min_expected_cost(y, s, prevalence=p, cost_ratio=c)
    return float((1 - p) * r.fpr + p * c * r.fnr - best)


def stream_once(
    order: np.ndarray,
    y: np.ndarray,
    s: np.ndarray,
    bundle_sets: list[Any],
    y_eval: np.ndarray,
    s_eval: np.ndarray,
    rng: np.random.Generator,
    audit_share: float = 0.0,
    audit_seed: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """One stream through the daemon's functions; the trajectory's figures."""
    first = calibrate(bundle_sets, mode="cost", n_boot=0)
    state = PolicyState.initial(first)
    cfg = PolicyConfig(n_boot=0)
    rows: list[dict[str, Any]] = []
    seen: list[tuple[str, float]] = []
    values = [first.value]
    outcomes: dict[str, int] = {}
    drawn = passed = caught = 0
    anchors: list[dict[str, Any]] = []
    # its own generator: the other draws stay those of audit share 0
    audit_rng = np.random.default_rng([*audit_seed, 11])
    for n, i in enumerate(order, start=1):
        sha = f"img{n}"
        score = float(s[i])
        seen.append((sha, score))
        ng_verdict = score >= state.current.value
        label = "NG" if y[i] else "OK"
        audited = not ng_verdict and audit_rng.random() < audit_share
        found = not ng_verdict and bool(y[i]) and rng.random() < FOUND_DOWNSTREAM
        if ng_verdict:
            rows.append({"sha256": sha, "label": label, "score": score})
            caught += int(bool(y[i]))
        else:
            passed += 1
            drawn += int(audited)
            if audited:
                rows.append({"sha256": sha, "label": label, "score": score, "audited": 1})
            elif found:
                rows.append({"sha256": sha, "label": "NG", "score": score})
        if n % EVERY == 0:
            ev = assemble_evidence(
                bundle_sets,
                rows,
                seen,
                model_sha256="",
                contamination_bound=DEFAULT_PREVALENCE,
                audit_drawn=drawn,
                tally=(passed, caught),
            )
            anchor = audit_anchor(ev.audit, state.current.value)
            d = recalibrate(state, list(ev.sets), cfg, actor="benchmark", audit=anchor)
            if d.applied and anchor is not None:
                anchors.append(
                    {
                        "image": n,
                        "old": d.old.value,
                        "new": d.new_state.current.value,
                        "audit_miss": anchor.miss.value,
                        "audit_low": anchor.miss.low,
                        "audit_high": anchor.miss.high,
                        "escaped": anchor.escaped,
                        "checked": ev.audit.checked,
                        "anchor": (d.proposed.notes.get("audit_anchor") if d.proposed else None),
                    }
                )
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
            if d.applied:
                state = d.new_state
                values.append(state.current.value)
    steps = np.diff(values)
    signs = np.sign(steps[steps != 0])
    return {
        "regret_initial": regret(y_eval, s_eval, values[0]),
        "regret_final": regret(y_eval, s_eval, values[-1]),
        "threshold_initial": values[0],
        "threshold_final": values[-1],
        "threshold_moves": int(signs.size),
        "reversals": int(np.sum(signs[1:] != signs[:-1])),
        "confirmed_ok": sum(r["label"] == "OK" for r in rows),
        "confirmed_ng": sum(r["label"] == "NG" for r in rows),
        "images": len(order),
        "audited": drawn,
        "audited_escapes": sum(r["label"] == "NG" for r in rows if r.get("audited")),
        "outcomes": outcomes,
        "moves_with_audit": anchors,
    }


def product(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every seed and stream of one product ``NAME:DATA:MODEL:GLASS``."""
    name, data, model, glass = spec.split(":")
    sha = manifest_sha256(Path(model))
    ts = test_scores(Path(model), Path(data), args.cache / f"test_scores_{sha[:12]}.json")
    y_all = np.asarray(ts["labels"], dtype=np.int64)
    s_all = np.asarray(ts["scores"], dtype=np.float64)
    sets = [s for s in load_scoresets([Path(model) / "scores"]) if s.source in NORMAL_SOURCES]
    sets += [s for s in load_scoresets([Path(glass)]) if s.source in SYNTHETIC_SOURCES]
    out: dict[str, Any] = {}
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, 7])
        line, held = [], []
        for label in (0, 1):
            idx = rng.permutation(np.flatnonzero(y_all == label))
            line.append(idx[: idx.size // 2])
            held.append(idx[idx.size // 2 :])
        line_idx, eval_idx = np.concatenate(line), np.concatenate(held)
        y_eval, s_eval = y_all[eval_idx], s_all[eval_idx]
        split_order = rng.permutation(line_idx)
        good, bad = line[0], line[1]
        n_bad = int(round(args.long * LONG_PREVALENCE))
        long_order = rng.permutation(
            np.r_[rng.choice(good, args.long - n_bad), rng.choice(bad, n_bad)]
        )
        for j, (stream, order) in enumerate((("split", split_order), ("long", long_order))):
            r = stream_once(
                order, y_all, s_all, sets, y_eval, s_eval, rng, args.audit_share, (seed, j)
            )
            out[f"seed{seed}_{stream}"] = r
            say(f"{name} seed {seed} {stream}: {json.dumps(r)}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every product and print the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--product", action="append", required=True, help="NAME:DATA:MODEL:GLASS")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--long", type=int, default=1500, help="images in the long stream")
    p.add_argument("--cache", type=Path, default=REPO / "runs" / "threshold_quality")
    p.add_argument(
        "--audit-share", type=float, default=0.1, help="share of OK verdicts audited (0: none)"
    )
    args = p.parse_args(argv)
    result: dict[str, Any] = {}
    for spec in args.product:
        result[spec.split(":")[0]] = product(spec, args)
    runs = [r for prod in result.values() for r in prod.values()]
    result["goals"] = {
        "final_regret_le_initial_everywhere": int(
            all(r["regret_final"] <= r["regret_initial"] + 1e-12 for r in runs)
        ),
        "at_most_one_reversal_everywhere": int(all(r["reversals"] <= 1 for r in runs)),
    }
    result["protocol"] = {
        "seeds": args.seeds,
        "long": args.long,
        "every": EVERY,
        "found_downstream": FOUND_DOWNSTREAM,
        "long_prevalence": LONG_PREVALENCE,
        "audit_share": args.audit_share,
        "operating_point": {"prevalence": DEFAULT_PREVALENCE, "cost_ratio": DEFAULT_COST_RATIO},
        "policy": "calibration.policy.PolicyConfig defaults (n_boot 0)",
        "products": [s.split(":")[0] for s in args.product],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
