"""The layering of the packages, read from every import statement (``ast``, nothing imported):

    datagrad  ←  scorenets  ←  trainlib  ←  analysis, train, benchmarks

A package imports nothing from a package to its right. And the command configs of ``train/`` that do not start a
training run (e.g. ``EvaluateConfig``: evaluate a saved model) are imported by their own module and ``train/`` only:
code elsewhere loads models through the library (``trainlib.classifiers.load_classifier``, ``load_scorenet``, ...),
not by filling in another command's options. Training configs (``EngineOptions``) are the way to start a run from code,
so analyses and benchmarks may build them."""

import ast
import importlib
from pathlib import Path

import pytest

from trainlib.session import EngineOptions

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "datagrad": {"scorenets", "trainlib", "analysis", "train", "benchmarks"},
    "scorenets": {"trainlib", "analysis", "train", "benchmarks"},
    "trainlib": {"analysis", "train", "benchmarks"},
}


def imports(path: Path, root: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every import in the file, anywhere in it (also inside functions);
    relative imports resolved against the file's package. ``from pkg import module`` also yields (pkg.module, None),
    and ``module.Name`` attribute reads of such an imported module yield (pkg.module, Name)."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(root).parent.parts
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
                bound = alias.asname or alias.name.split(".")[0]  # ``import a.b`` binds ``a``
                module_aliases[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                found.append((module, alias.name, node.lineno))
                module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
            found.append((module_aliases[node.value.id], node.attr, node.lineno))
    return found


def source_files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def layering_violations(root: Path) -> list[str]:
    """'file:line imports module' for every import of a package from a package to its right."""
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in source_files(root, package):
            for module, _, line in imports(path, root):
                if module.split(".")[0] in forbidden:
                    violations.append(f"{path.relative_to(root)}:{line} imports {module}")
    return violations


def command_configs(root: Path) -> dict[str, str]:
    """{class name: defining module} of the configs ``train/`` entry points parse (``parse_config(Cls, ...)``)."""
    configs = {}
    for path in source_files(root, "train"):
        tree = ast.parse(path.read_text(), str(path))
        origin = {name: module for module, name, _ in imports(path, root) if name is not None}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_config" and node.args
                    and isinstance(node.args[0], ast.Name)):
                configs[node.args[0].id] = origin[node.args[0].id]
    return configs


def config_violations(root: Path, non_training: dict[str, str]) -> list[str]:
    """'file:line imports Config' for every import of a non-training command config outside ``train/``, tests and
    the module that defines it."""
    violations = []
    for package in ("datagrad", "scorenets", "trainlib", "analysis", "benchmarks"):
        for path in source_files(root, package):
            own_module = ".".join(path.relative_to(root).with_suffix("").parts)
            for _, name, line in imports(path, root):
                if name in non_training and non_training[name] != own_module:
                    violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return violations


def non_training_configs(root: Path) -> dict[str, str]:
    configs = command_configs(root)
    return {name: module for name, module in configs.items()
            if not issubclass(getattr(importlib.import_module(module), name), EngineOptions)}


def test_no_package_imports_from_a_package_to_its_right():
    assert {path.name for path in source_files(ROOT, "datagrad")} >= {"__init__.py", "attacks.py"}  # files found
    assert layering_violations(ROOT) == []


def test_command_configs_are_not_imported_to_load_models():
    configs = non_training_configs(ROOT)
    assert configs["EvaluateConfig"] == "trainlib.evaluate_command" and "AdversarialConfig" not in configs
    assert config_violations(ROOT, configs) == []
    analysis_imports = {name for path in source_files(ROOT, "analysis") for _, name, _ in imports(path, ROOT)}
    assert "EvaluateConfig" not in analysis_imports


@pytest.mark.parametrize(("file", "line", "expected"), [
    ("datagrad/bad.py", "from trainlib.files import atomic_path\n", "datagrad/bad.py:1 imports trainlib.files"),
    ("scorenets/bad.py", "def f():\n    import analysis.report\n", "scorenets/bad.py:2 imports analysis.report"),
    ("trainlib/bad.py", "from benchmarks import common\n", "trainlib/bad.py:1 imports benchmarks"),
])
def test_a_violating_import_is_found(tmp_path, file, line, expected):
    """The check on a tree holding one violating file (it can fail)."""
    (tmp_path / file).parent.mkdir()
    (tmp_path / file).write_text(line)
    assert layering_violations(tmp_path) == [expected]


def test_a_command_config_imported_to_load_a_model_is_found(tmp_path):
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "bad.py").write_text("from trainlib import evaluate_command\n\n"
                                                  "cfg = evaluate_command.EvaluateConfig(checkpoint='run')\n")
    found = config_violations(tmp_path, non_training_configs(ROOT))
    assert found == ["analysis/bad.py:3 imports EvaluateConfig"]
