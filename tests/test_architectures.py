"""The architecture sweep, first half (tests/_sweep_cases.py says what is checked; the sweep is split in
two files so that the suite's two pytest-xdist workers share it)."""

from __future__ import annotations

import pytest

from _zoo import has_transformers

if not has_transformers():
    pytest.skip("the sweep needs transformers (pip install -e '.[dev]')", allow_module_level=True)

from _sweep_cases import ARCHITECTURES, KNOWN_GAPS, NAMES, check  # noqa: E402


def test_the_architectures_of_transformers_are_found():
    assert len(ARCHITECTURES) >= 19
    assert {"deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "kimi_linear", "mistral4"} <= set(ARCHITECTURES)
    assert set(KNOWN_GAPS) <= set(ARCHITECTURES), "a known gap names an architecture transformers no longer has"


@pytest.mark.parametrize("name", NAMES[::2])
def test_architecture(name, tmp_path):
    check(name, tmp_path)
