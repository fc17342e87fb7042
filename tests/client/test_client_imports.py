"""The client distribution needs numpy and tritonclient only: it must import with torch unavailable."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import genrec.client, genrec.client.aio, genrec.client.cli\n"
        "assert not any(name == 'torch' or name.startswith('torch.') for name in sys.modules if sys.modules[name])\n"
        "assert not [name for name in sys.modules if name.startswith('genrec.') and not name.startswith('genrec.client')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
