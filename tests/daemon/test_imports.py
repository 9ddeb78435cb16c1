"""The edge path imports without torch."""

from __future__ import annotations

import subprocess
import sys

# A meta-path finder that refuses torch. (``sys.modules['torch'] = None`` is not usable:
# scipy's array-API helpers look up ``sys.modules['torch'].Tensor`` when the key exists.)
CODE = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch is blocked in this test')
        return None

sys.meta_path.insert(0, _NoTorch())
import ngcal.daemon.service, ngcal.daemon.commands, ngcal.daemon.scoring
import ngcal.cli.serve, ngcal.cli.status, ngcal.cli.main
from ngcal.daemon.config import load_config
assert 'torch' not in sys.modules
print('ok')
"""


def test_daemon_imports_without_torch():
    """`ngcal.daemon` and the serve/status commands import with torch made unimportable."""
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
