import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow
def test_backend_registered_through_entry_point_without_import():
    # A fresh interpreter that never imports effopt: torch finds the backend through the entry point.
    code = textwrap.dedent("""
        import sys, torch
        assert "effopt" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()
        x = torch.randn(3, 4)
        with torch.no_grad():
            y = torch.compile(m, backend="effopt", options={"target": "llvm", "cache": False})(x)
        torch.testing.assert_close(y, m(x))
        assert "effopt" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
