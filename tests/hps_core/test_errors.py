"""The exception tree drawn in hps_core/errors.py's docstring is the module's classes."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import hps_core
from hps_core import errors

_BRANCH = re.compile(r"^(?P<indent>[ │]*)[├└]── (?P<name>\w+)")


def _drawn_tree() -> dict[str, str | None]:
    """class name → the parent the docstring draws it under (None for the root)."""
    doc = errors.__doc__ or ""
    lines = doc[doc.index("    HPSError\n"):].splitlines()
    parents: dict[str, str | None] = {"HPSError": None}
    stack = ["HPSError"]  # stack[d]: the last class drawn at depth d
    for line in lines[1:]:
        if not line.strip():
            break
        match = _BRANCH.match(line[4:])
        if match is None:
            continue  # a description's second line
        depth = len(match["indent"]) // 5 + 1  # " ├── " then "│    " per level
        del stack[depth:]
        assert len(stack) == depth, f"{line!r} is drawn under nothing"
        parents[match["name"]] = stack[-1]
        stack.append(match["name"])
    return parents


def _module_classes() -> dict[str, type[BaseException]]:
    return {name: cls for name, cls in vars(errors).items()
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__}


def test_the_docstring_tree_is_the_module() -> None:
    drawn, classes = _drawn_tree(), _module_classes()
    assert sorted(drawn) == sorted(classes), "every class of errors.py drawn once, and nothing else"
    for name, parent in drawn.items():
        ours = [base.__name__ for base in classes[name].__bases__ if issubclass(base, errors.HPSError)]
        assert ours == ([parent] if parent else []), f"{name} is drawn under {parent}, derives from {ours}"
    assert sorted(errors.__all__) == sorted(classes)


def test_no_exception_class_outside_errors_py() -> None:
    """Every exception class of the library lives in errors.py (private sentinels of a
    third-party hierarchy excepted: they never leave their module)."""
    root = Path(hps_core.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "errors.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                if any(b.endswith(("Error", "Exception", "Message")) for b in bases):
                    found.append(f"{path.relative_to(root)}: {node.name}")
    assert found == []
