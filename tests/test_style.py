"""The project's rules for the package's code: no function over MAX_LINES lines, unless it says why it must be long;
imports only from the same layer or the layers below (the README's layer table); no command module imported."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unet3d_dist"
MAX_LINES = 60  # from `def` to the function's last line, as ast counts them (decorators not included)

# "path/inside/unet3d_dist.py::qualified.name" -> why it must be long. At most 3 entries; the function itself says
# why in a comment too.
ALLOWED: dict[str, str] = {}


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its qualified name (Class.method, outer.inner)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from functions(node, f"{prefix}{node.name}.")


def long_functions() -> dict[str, tuple[int, ast.FunctionDef | ast.AsyncFunctionDef, list[str]]]:
    """``path::name`` -> (lines, node, the file's lines) for each function of the package over MAX_LINES."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for name, node in functions(ast.parse(source, str(path))):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found[f"{path.relative_to(PACKAGE).as_posix()}::{name}"] = (length, node, source.splitlines())
    return found


def test_no_function_is_longer_than_the_limit_unless_allowed():
    over = {key: length for key, (length, _, _) in long_functions().items() if key not in ALLOWED}
    assert not over, f"functions over {MAX_LINES} lines (split them, or allow one with its reason): " + ", ".join(
        f"unet3d_dist/{key.replace('::', ' ')} ({length} lines)" for key, length in over.items()
    )


def test_the_allowlist_is_short_current_and_says_why_in_the_code_too():
    assert len(ALLOWED) <= 3, "at most 3 functions may be long"
    found = long_functions()
    for key, reason in ALLOWED.items():
        assert reason.strip(), f"{key} is allowed without a reason"
        assert key in found, f"{key} is allowed to be long but is not (any more): remove it from ALLOWED"
        _, node, lines = found[key]
        body = lines[node.lineno - 1 : node.end_lineno]
        assert any(line.strip().startswith("#") for line in body), f"{key} does not say in a comment why it is long"


README = PACKAGE.parent / "README.md"
LABEL_WIDTH = 16  # the README's layer table: a row's label, then its modules (a blank label continues the row)


def readme_layers() -> list[list[str]]:
    """The README's layer table, top to bottom, as module names (``bench/`` -> ``bench``, ``train.py`` -> ``train``):
    a module imports only from its own layer or the layers below."""
    text = README.read_text()
    block = text[text.index("```", text.index("The import graph has layers")) + 3 :].split("```")[0]
    layers: list[list[str]] = []
    for line in block.strip("\n").splitlines():
        if line[:LABEL_WIDTH].strip():
            layers.append([])
        layers[-1] += [token.rstrip("/").removesuffix(".py") for token in line[LABEL_WIDTH:].split()]
    return layers


LAYERS = readme_layers()
COMMANDS = set(LAYERS[0]) - {"bench"}  # python -m entry points: they parse arguments and call the library


def package_imports() -> Iterator[tuple[str, str]]:
    """(importing module's top-level name, imported top-level name) for every relative import in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(parts[:-1])[: len(parts) - node.level]
                target = base + (node.module.split(".") if node.module else [])
                if target and parts[0] != "__init__":
                    yield parts[0], target[0]


def test_imports_follow_the_layer_table_and_no_module_imports_a_command():
    layer = {name: index for index, names in enumerate(LAYERS) for name in names}
    listed = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()} - {"__init__", "__pycache__"}
    assert listed <= set(layer), f"modules missing from the layer table: {sorted(listed - set(layer))}"
    upward = sorted({(a, b) for a, b in package_imports() if a != b and b in layer and layer[b] < layer[a]})
    assert not upward, f"imports from a higher layer: {upward}"
    commands = sorted({(a, b) for a, b in package_imports() if b in COMMANDS and a != b})
    assert not commands, f"command modules imported as libraries: {commands}"
