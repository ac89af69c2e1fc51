"""The import rule of docs/architecture.md ("Layers"), checked on the source: every import,
lazy ones inside functions included, goes to the same layer or one below, and no service
imports another service's package. Plus: what must stay light (the SDK, the wire types, the
scheduler) imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("admission_scheduler", "edge_drafter", "gpu_verifier", "metrics", "predictor")
TRANSPORT_LIBS = ("nats", "redis", "aiohttp")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("common", "services") for p in (ROOT / top).rglob("*.py")}


MODULES = project_modules()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a.b when that
    is a module of the project)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if f"{node.module}.{a.name}" in MODULES)
    return out


def layer(module: str) -> str:
    if module.startswith("common.engine"):
        return "engine"
    if module.startswith("common.transport") or module == "common.client":
        return "transport"
    if module.startswith("common"):
        return "base"
    for svc in SERVICES:
        if module == f"services.{svc}" or module.startswith(f"services.{svc}."):
            return f"service:{svc}"
    return "tool"  # services.cli, the launcher: `wisp` itself


# What each layer may import from the project (besides itself).
ALLOWED = {
    "base": {"base"},
    "engine": {"base", "engine"},
    "transport": {"base", "engine", "transport"},
    "tool": {"base", "engine", "transport", "tool"},
}


def violations() -> list[str]:
    found = []
    for module, path in sorted(MODULES.items()):
        mine = layer(module)
        for target in sorted(imports_of(path)):
            top = target.split(".")[0]
            if mine == "engine" and top in TRANSPORT_LIBS:
                found.append(f"{module} (engine: no transport) imports {target}")
            if top not in ("common", "services") or target in ("common", "services"):
                continue
            theirs = layer(target)
            if mine.startswith("service:"):
                ok = theirs in ("base", "engine", "transport") or theirs == mine
            else:
                ok = theirs in ALLOWED[mine]
            if not ok:
                found.append(f"{module} ({mine}) imports {target} ({theirs})")
    return found


def test_imports_run_downward_only():
    assert violations() == []


def test_the_rule_catches_a_break():
    """The check can fail: an upward import planted in a copy of a base module is found."""
    planted = MODULES["common.protocol"].read_text() + "\nfrom services.cli import main\n"
    fake = ROOT / "common" / "_planted_for_test.py"
    try:
        fake.write_text(planted)
        MODULES["common._planted_for_test"] = fake
        assert any("common._planted_for_test (base) imports services.cli" in v
                   for v in violations())
    finally:
        fake.unlink()
        MODULES.pop("common._planted_for_test", None)


def test_nothing_in_common_imports_services():
    offenders = [m for m, p in MODULES.items() if m.startswith("common")
                 and any(t.startswith("services") for t in imports_of(p))]
    assert offenders == []


@pytest.mark.parametrize("module", [
    "common.client",  # the SDK: clients are light
    "common.protocol",
    "common.limits",
    "common.models.vocab",
    "services.admission_scheduler.service",  # centralized serving needs no torch
    "services.metrics.service",
])
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, \
        f"importing {module} imports torch"
