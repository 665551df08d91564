"""Runs last in tests/thin (file order): after everything above, PyTorch was never imported (torch-free install)."""

from __future__ import annotations

import sys

import pytest

from cvvae.extras import is_installed


@pytest.mark.skipif(is_installed("torch"), reason="torch is installed and other tests import it; "
                    "test_runtime_path_never_imports_torch checks the runtime in a fresh interpreter instead")
def test_torch_never_imported():
    assert "torch" not in sys.modules
    assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "matplotlib", "skimage")]
