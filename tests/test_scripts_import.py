"""Every benchmark script imports: a broken import in a script no test runs would otherwise
reach CI unnoticed (an import sort once turned ``# noqa: E402`` into imported names)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name: str) -> None:
    module = importlib.import_module(f"scripts.{name}")
    assert callable(getattr(module, "main", None)), f"scripts/{name}.py has no main()"
