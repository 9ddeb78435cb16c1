"""GAS: truncated projection bands, gradient ascent direction, determinism, training."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ngcal.core.errors import ConfigError  # noqa: E402
from ngcal.generation.gas import (  # noqa: E402
    GasConfig,
    TrainConfig,
    gas,
    severity_band,
    train_discriminator,
    truncated_projection,
)

pytestmark = pytest.mark.torch
RTOL = 1e-5


@pytest.fixture(scope="module")
def toy() -> tuple[torch.Tensor, object]:
    """Normal features near a 4-D subspace of 16-D, and a small discriminator trained on them."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 16, generator=g)
    normal = torch.randn(2048, 4, generator=g) @ basis + 0.05 * torch.randn(2048, 16, generator=g)
    bands = [severity_band(s, 0.5) for s in (0.5, 1.0, 2.0)]
    disc = train_discriminator(
        normal, bands, train=TrainConfig(epochs=30, batch_rows=256, hidden=64), generator=g
    )
    return normal, disc


@settings(max_examples=30, deadline=None)
@given(
    lo=st.floats(0.01, 5.0),
    width=st.floats(0.0, 5.0),
    scale=st.floats(1e-3, 50.0),
    seed=st.integers(0, 2**16),
)
def test_truncated_projection_lands_in_band(
    lo: float, width: float, scale: float, seed: int
) -> None:
    """Every projected offset has a norm in [lo, hi], whatever its size before."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(64, 8, generator=g, dtype=torch.float64)
    feats = anchors + scale * torch.randn(64, 8, generator=g, dtype=torch.float64)
    feats[0] = anchors[0]  # a zero offset too
    hi = lo + width
    out = truncated_projection(feats, anchors, lo, hi)
    n = (out - anchors).norm(dim=1)
    assert (n >= lo * (1 - 1e-9)).all() and (n <= hi * (1 + 1e-9)).all()


@pytest.mark.parametrize("variant", ["manifold", "hypersphere"])
@pytest.mark.parametrize("severity", [0.25, 1.0, 3.0])
def test_gas_features_stay_in_their_band(toy, variant: str, severity: float) -> None:  # type: ignore[no-untyped-def]
    """After GAS every synthetic feature is s*r0..2*s*r0 from its source (or the centre shell)."""
    normal, disc = toy
    x = normal[:300]
    centre = torch.zeros_like(x)
    radius = float(torch.quantile(x.norm(dim=1), 0.75))
    band = severity_band(severity, 0.7, variant=variant, centre_radius=radius)  # type: ignore[arg-type]
    out = gas(x, disc, band, centre=centre, generator=torch.Generator().manual_seed(1))
    anchor = x if variant == "manifold" else centre
    n = (out - anchor).norm(dim=1)
    assert band.hi - band.lo == pytest.approx(severity * 0.7)
    assert (n >= band.lo * (1 - RTOL)).all() and (n <= band.hi * (1 + RTOL)).all()


def test_gradient_ascent_moves_towards_normal_side(toy) -> None:  # type: ignore[no-untyped-def]
    """From the same noise, ascent steps raise the discriminator's loss on the synthetic rows."""
    normal, disc = toy
    x = normal[:512]
    band = severity_band(1.0, 0.5)
    loss = []
    for steps in (0, 20):
        out = gas(
            x,
            disc,
            band,
            config=GasConfig(steps=steps),
            generator=torch.Generator().manual_seed(5),
        )
        with torch.no_grad():
            logits = disc(out)
            loss.append(
                float(
                    torch.nn.functional.binary_cross_entropy_with_logits(
                        logits, torch.ones_like(logits)
                    )
                )
            )
    assert loss[1] > loss[0] + 0.01


def test_gas_is_deterministic_for_a_seed(toy) -> None:  # type: ignore[no-untyped-def]
    """Same generator seed -> identical synthetic features; another seed differs."""
    normal, disc = toy
    band = severity_band(1.0, 1.0)
    a = gas(normal[:64], disc, band, generator=torch.Generator().manual_seed(3))
    b = gas(normal[:64], disc, band, generator=torch.Generator().manual_seed(3))
    c = gas(normal[:64], disc, band, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_discriminator_separates_normal_from_gas(toy) -> None:  # type: ignore[no-untyped-def]
    """The trained discriminator scores GAS rows higher than normal rows on average."""
    normal, disc = toy
    x = normal[-256:]
    out = gas(x, disc, severity_band(1.0, 0.5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert disc(out).mean() > disc(x).mean()


def test_bad_bands_are_refused() -> None:
    """Non-positive severities or radius units are ConfigErrors naming the value."""
    with pytest.raises(ConfigError, match="severity"):
        severity_band(0.0, 1.0)
    with pytest.raises(ConfigError, match="r0"):
        severity_band(1.0, float("nan"))


def test_implant_changes_only_masked_cells(toy) -> None:  # type: ignore[no-untyped-def]
    """GAS replaces exactly the features under the mask, each within its band; others stay."""
    from ngcal.generation.gas import implant

    normal, disc = toy
    feats = normal[: 2 * 4 * 4].reshape(2, 4, 4, 16)
    cells = torch.zeros(2, 4, 4, dtype=torch.bool)
    cells[0, 1:3, 1:3] = True
    cells[1, 0, :] = True
    band = severity_band(1.0, 0.5)
    out = implant(feats, cells, disc, band, torch.zeros(4, 4, 16),
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(out[~cells], feats[~cells])
    n = (out[cells] - feats[cells]).norm(dim=1)
    assert (n >= band.lo * (1 - RTOL)).all() and (n <= band.hi * (1 + RTOL)).all()
