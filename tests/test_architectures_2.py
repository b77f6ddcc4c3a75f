"""The architecture sweep, second half (see tests/test_architectures.py)."""

from __future__ import annotations

import pytest

from _zoo import has_transformers

if not has_transformers():
    pytest.skip("the sweep needs transformers (pip install -e '.[dev]')", allow_module_level=True)

from _sweep_cases import NAMES, check  # noqa: E402


@pytest.mark.parametrize("name", NAMES[1::2])
def test_architecture(name, tmp_path):
    check(name, tmp_path)
