"""The package's layers: every module imports, the library never imports a command, and the
modules that promise to run without TensorFlow do.

Commands (`python -m vitvq.X`) hold flag parsing and calls; the logic they call lives in
library modules, which therefore must not reach back up into a command.
"""

import ast
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import vitvq

PACKAGE = pathlib.Path(vitvq.__file__).resolve().parent
COMMANDS = {
    "vitvq.main",
    "vitvq.export",
    "vitvq.sample",
    "vitvq.reconstruct",
    "vitvq.evaluate",
    "vitvq.aot",
    "vitvq.probe",
}
# Loadable without TensorFlow (and so without clu): what a user of a bundle imports, and the
# stage builders (models, optimizers, steps) that the trainers, reports and benchmarks share.
TENSORFLOW_FREE = (
    "vitvq",
    "vitvq.bundle",
    "vitvq.tokenizer",
    "vitvq.sampler",
    "vitvq.train.stage1_step",
    "vitvq.train.stage2_step",
    "vitvq.train.stage1_build",
    "vitvq.train.stage2_build",
    "vitvq.memory",
)


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(vitvq.__path__, "vitvq."))


def _module_name(path: pathlib.Path) -> str:
    parts = ("vitvq", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST) -> set[str]:
    """Every module name an import statement of `tree` names (and `from M import x` as M.x,
    since x may be a submodule)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_module_imports():
    names = _modules()
    assert set(COMMANDS) <= set(names)
    assert len(names) > 40
    for name in names:
        importlib.import_module(name)


def test_the_library_never_imports_a_command():
    reached_up = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        targets = _imported(ast.parse(path.read_text())) & COMMANDS
        targets.discard(module)
        if targets:
            reached_up[module] = sorted(targets)
    assert reached_up == {}, reached_up


def test_bundle_users_and_stage_builders_never_load_tensorflow():
    code = (
        "import sys\n"
        f"for name in {TENSORFLOW_FREE!r}:\n"
        "    __import__(name)\n"
        "print(sorted(m for m in ('tensorflow', 'clu', 'tensorflow_datasets') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def _deferred_without_reason(path: pathlib.Path) -> list[int]:
    """Lines of the imports inside functions of `path` that no `# deferred:` comment covers
    (on the import's line, or above it with only imports and comments in between)."""
    lines = path.read_text().splitlines()
    missing = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if not isinstance(sub, (ast.Import, ast.ImportFrom)):
                continue
            i = sub.lineno - 1
            covered = "# deferred:" in lines[i]
            while not covered and i > 0:
                i -= 1
                text = lines[i].strip()
                if "# deferred:" in text:
                    covered = True
                elif not (text.startswith(("import ", "from ", "#", ")")) or text == ""):
                    if not text.endswith(",") and not text.endswith("("):
                        break
            if not covered:
                missing.append(sub.lineno)
    return missing


def test_stage_builders_load_no_input_writer_or_loop_code():
    code = (
        "import sys\n"
        "import vitvq.train.stage1_build, vitvq.train.stage2_build\n"
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'vitvq.data', 'vitvq.train.writers', 'vitvq.train.loop', 'vitvq.train.runner', "
        "'vitvq.checkpoint', 'ml_collections', 'clu', 'tensorflow'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_imports_inside_functions_say_why_they_are_deferred():
    missing = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if lines := _deferred_without_reason(path):
            missing[str(path.relative_to(PACKAGE))] = lines
    assert missing == {}, missing


def _package_imports_at_load(module: str) -> set[str]:
    """The vitvq modules that loading `module` loads, by its module-level imports and theirs
    (imports inside functions, which run later, are not followed)."""
    known = set(_modules()) | {"vitvq"}
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in known:
            continue
        seen.add(name)
        path = PACKAGE.joinpath(*name.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for target in _imported(ast.Module(body=top_level, type_ignores=[])):
            parts = target.split(".")
            # a package's __init__ runs before any of its submodules
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return seen


def test_the_config_checker_imports_nothing_of_the_trainers():
    """The rule book sits below the code it rules: the value sets it checks against live in
    vitvq.settings (or with the models and data that own them), never in vitvq/train."""
    loaded = _package_imports_at_load("vitvq.config_check")
    assert "vitvq.settings" in loaded and "vitvq.models.vitvqgan" in loaded  # it does follow
    assert sorted(m for m in loaded if m.startswith("vitvq.train")) == []


MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 200


def test_modules_and_classes_stay_small():
    """One job per module and per class: no module of the package over 600 lines, no class
    over 200 (split by job when one grows past them)."""
    long_modules, long_classes = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = _module_name(path)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            long_modules[name] = lines
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                if (lines := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                    long_classes[f"{name}.{node.name}"] = lines
    assert long_modules == {} and long_classes == {}, (long_modules, long_classes)
