"""ngcal.calibration imports and calibrates without torch (the edge path)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ngcal.calibration

CODE = """
import importlib, sys

class Block:
    # meta path finder: torch (and matplotlib, imported lazily) become unimportable
    blocked = ('torch', 'torchvision', 'matplotlib')
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in self.blocked:
            raise ImportError(name + ' is blocked in this test')
        return None

sys.meta_path.insert(0, Block())
for m in list(sys.modules):
    if m.split('.')[0] in Block.blocked:
        del sys.modules[m]
for name in NAMES:
    importlib.import_module(name)
import numpy as np
from ngcal.core.scoresets import ScoreSet
from ngcal.calibration.estimate import calibrate
x = np.linspace(0, 1, 300)
sets = [ScoreSet(source='normal_loo', scores=x, item_ids=[str(i) for i in range(300)]),
        ScoreSet(source='real_ng', scores=x[-5:] + 1, item_ids=list('abcde'))]
print(calibrate(sets, mode='cost', n_boot=5).value)
assert not [m for m in sys.modules if m.split('.')[0] in Block.blocked]
"""


def test_every_calibration_module_imports_without_torch() -> None:
    """Each module of ngcal.calibration imports (and calibrate runs) with torch blocked."""
    names = ["ngcal.calibration"] + [
        f"ngcal.calibration.{m.name}" for m in pkgutil.iter_modules(ngcal.calibration.__path__)
    ]
    assert {"ngcal.calibration.policy", "ngcal.calibration.estimate"} <= set(names)
    r = subprocess.run(
        [sys.executable, "-c", CODE.replace("NAMES", repr(names))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip()) > 0
