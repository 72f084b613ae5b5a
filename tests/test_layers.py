"""The package's layers (.importlinter): entry points > benchmarks > evaluation > runtime and planner > config >
test fixtures > units (algorithms, models, rewards, data) > the toy's parts > core, and core imports no model library.
An upward import fails here with import-linter's report, which names the importing module, the imported one and the
line."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under `root` with the repository's contract file."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(REPO / '.importlinter')!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_contract_holds():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_at_the_package_root():
    """Every module lives in a layer's package; the root holds only the package marker."""
    assert sorted(p.name for p in (REPO / "branchgrpo").glob("*.py")) == ["__init__.py"]


@pytest.mark.parametrize("importer, imported", [
    ("core/sde.py", "branchgrpo.runtime.trainer"),  # core -> runtime
    ("models/flux.py", "branchgrpo.cli.train"),  # a unit -> an entry point
    ("rewards/hps.py", "branchgrpo.algorithms.branchgrpo"),  # one unit -> a sibling unit
    ("core/losses.py", "diffusers"),  # core -> a model library
])
def test_an_upward_import_is_reported_by_name(tmp_path, importer, imported):
    shutil.copytree(REPO / "branchgrpo", tmp_path / "branchgrpo", ignore=shutil.ignore_patterns("assets", "*.pt"))
    target = tmp_path / "branchgrpo" / importer
    target.write_text(target.read_text() + f"\nimport {imported}  # noqa\n")
    result = lint(tmp_path)
    module = "branchgrpo." + importer[:-3].replace("/", ".")
    assert result.returncode != 0
    assert f"{module} -> {imported}" in result.stdout, result.stdout


def test_no_import_cycle():
    """No module imports (through any chain) a module that imports it: entry points are not aliased back into the
    layers they call (two such cycles existed: bench.compare <-> cli.compare, toy.pretrain <-> cli.pretrain_toy)."""
    import grimp

    graph = grimp.build_graph("branchgrpo")
    cycles = sorted((m, imp) for m in graph.modules for imp in graph.find_modules_directly_imported_by(m)
                    if graph.chain_exists(imp, m))
    assert cycles == []
