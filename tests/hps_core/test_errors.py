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


def test_cupy_errors_out_of_memory_are_the_retryable_device_error() -> None:
    """translate_cupy's classification (CuPy itself needs a GPU): CuPy's OutOfMemoryError and
    CUDA's out-of-memory status (2, runtime and driver) pass; the rest fail for good."""
    from hps_core.cache.gpu import device_error_type

    assert device_error_type("OutOfMemoryError", None) is errors.DeviceMemoryError
    assert device_error_type("CUDARuntimeError", 2) is errors.DeviceMemoryError  # cudaErrorMemoryAllocation
    assert device_error_type("CUDADriverError", 2) is errors.DeviceMemoryError  # CUDA_ERROR_OUT_OF_MEMORY
    assert device_error_type("CUDARuntimeError", 700) is errors.DeviceError  # cudaErrorIllegalAddress
    assert device_error_type("CUDADriverError", 700) is errors.DeviceError
    assert device_error_type("CompileException", None) is errors.DeviceError


def test_third_party_errors_enter_as_ours() -> None:
    """One helper per library turns its errors into ours (translate_cupy needs a GPU: its
    DeviceError is covered where CuPy is installed, by the GPU cache tests)."""
    import redis
    from confluent_kafka import KafkaError, KafkaException

    from hps_core.db.redis_cluster import translate_redis
    from hps_core.db.rocksdb import translate_rocksdb
    from hps_core.updates.sink import kafka_error_of, translate_kafka

    down = translate_redis(redis.ConnectionError("refused"), "Redis at h:1", "cannot connect")
    assert type(down) is errors.TierError and str(down) == "Redis at h:1: cannot connect (ConnectionError: refused)"
    auth = translate_redis(redis.ResponseError("WRONGPASS invalid username-password pair"), "Redis", "insert failed")
    assert "authentication failed" in str(auth) and "volatile_db.password" in str(auth)

    locked = translate_rocksdb(Exception("IO error: lock hold by current process"), "/db", "open")
    assert type(locked) is errors.TierBusyError and "read_only: true" in str(locked)
    failed = translate_rocksdb(Exception("Corruption: bad block"), "/db", "fetch", "t")
    assert type(failed) is errors.TierError and str(failed) == "RocksDB fetch on table 't' at '/db' failed: Corruption: bad block"

    exc = KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))
    assert kafka_error_of(exc) is exc.args[0] and kafka_error_of(KafkaException("text")) is None
    assert type(translate_kafka(exc, "cannot publish")) is errors.UpdateError
