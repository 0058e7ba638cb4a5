"""Models and model versions added and removed at runtime through ``hps models`` and a real ``hps serve``.

The repository is tests/hps_serve.py's (``hps_multi``: the HPS backend on a hash map and
RocksDB, KIND_GPU so that on a machine without GPU ``hps serve`` serves a staged mirror that
must follow the repository; ``echo``: a plain Python model), with ``version_policy: { all {} }``
on both. Checked:

* a third model (``hps_third``: the HPS backend, ``hps_model: "hps_multi"``, so it opens the
  RocksDB ``hps_multi`` serves from) written into the repository, loaded with
  ``hps models load``, queried, unloaded with ``hps models unload``, twice: afterwards no stub
  of it is left, and the Triton process group's RSS and open files are back near their level
  before the first load. Tolerance: RSS within 32 MiB + 5 % of the level before, open files
  within 8 — the Triton process keeps some heap (its allocator does not return every page, its
  model bookkeeping), while a leak of the model's instance (a stub that stays, RocksDB files or
  Redis sockets held, a thread keeping the stub alive) costs a whole process: 100+ MiB and
  dozens of files. The second cycle must not grow beyond the first (a leak per load);
* a version folder written beside the served one is served by ``hps models load --version``
  without touching the served version (same stub), an HPS version with its own ``hps.json``
  answers its own rows, and ``hps models unload --version`` removes one version alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hps_core.cli import main
from hps_core.serving import API_TOKEN_ENV, group_processes
from tests.e2e.models import HUGECTR_STYLE_CONFIG, MULTI_DEFAULTS, MULTI_DIMS, MULTI_ROWS, _model_entry, _random_table
from tests.hps_serve import Ready, Repository, ServeProcess, build_repository, echo_ok, hps_ok, send, trace, wait_until

pytestmark = [pytest.mark.triton, pytest.mark.slow]

TOKEN = secrets.token_urlsafe(24)
RSS_SLACK = 32 << 20  # bytes, plus RSS_SHARE of the level before (see the module docstring)
RSS_SHARE = 0.05
FILES_SLACK = 8
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Footprint:
    rss: int  # bytes, summed over the processes of Triton's group
    files: int  # open file descriptors, summed likewise
    processes: int


def footprint(pgid: int) -> Footprint:
    """What Triton's process group (the server and its stubs) holds now, from /proc."""
    rss = files = processes = 0
    for pid, (state, _) in group_processes(pgid).items():
        if state == "Z":
            continue
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            files += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # it exited while we looked
            continue
        processes += 1
    return Footprint(rss, files, processes)


def settled(pgid: int) -> Footprint:
    """The footprint once it stops moving (stubs exiting, pages returned): the last of a
    stable pair a second apart, or the last seen after 20 s."""
    previous = footprint(pgid)
    for _ in range(20):
        time.sleep(1.0)
        now = footprint(pgid)
        if now.processes == previous.processes and abs(now.rss - previous.rss) < (1 << 20):
            return now
        previous = now
    return previous


def stubs_of(pgid: int, instance: str) -> dict[int, str]:
    """Live stub processes of Triton's group ``pgid`` whose command line names ``instance``
    (e.g. ``echo_0_0``): pid -> cmdline."""
    found = {}
    for pid, (state, _) in group_processes(pgid).items():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if state != "Z" and any(a.endswith(b"triton_python_backend_stub") for a in args) and instance.encode() in args:
            found[pid] = b" ".join(args).decode(errors="replace")
    return found


def lookup(address: str, model: str, version: int | None = None) -> list[float] | None:
    """``model``'s answer to hps_multi's 2+1+3+1 keys 1..7 (None: it failed)."""
    body = json.dumps({"inputs": [
        {"name": "KEYS", "datatype": "INT64", "shape": [1, 7], "data": [1, 2, 3, 4, 5, 6, 7]},
        {"name": "NUMKEYS", "datatype": "INT32", "shape": [1, 4], "data": [2, 1, 3, 1]},
    ]})
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    status, answer = send(address, path, body)
    return [float(x) for x in json.loads(answer)["outputs"][0]["data"]] if status == 200 else None


def hps_models(ready: Ready, *args: str) -> int:
    return main(["models", "--url", ready.http, "--timeout", "180", *args])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    repository = build_repository(tmp_path_factory.mktemp("runtime"))
    for model in ("hps_multi", "echo"):
        config = repository.path / model / "config.pbtxt"
        text = config.read_text().replace("version_policy: { specific: { versions: 1 } }\n", "")
        config.write_text(text + "version_policy: { all {} }\n")
    return repository


@pytest.fixture(scope="module")
def serve(repository: Repository) -> Iterator[tuple[ServeProcess, Ready]]:
    with ServeProcess(repository, env={API_TOKEN_ENV: TOKEN}) as process:
        ready = process.wait_ready()
        yield process, ready
        assert process.stop() == 0


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_TOKEN_ENV, TOKEN)


@pytest.mark.timeout(600)
def test_a_model_added_and_removed_at_runtime_returns_memory_and_files(
    repository: Repository, serve: tuple[ServeProcess, Ready], capsys: pytest.CaptureFixture[str]
) -> None:
    _, ready = serve
    pgid = trace(ready).pgid
    assert hps_ok(ready.http) and echo_ok(ready.http)
    third = repository.path / "hps_third"
    (third / "1").mkdir(parents=True)
    config = HUGECTR_STYLE_CONFIG.replace('name: "hps_multi"', 'name: "hps_third"')
    (third / "config.pbtxt").write_text(config + 'parameters: { key: "hps_model" value: { string_value: "hps_multi" } }\n')
    expected = lookup(ready.http, "hps_multi")
    before = settled(pgid)
    levels = []
    for cycle in range(2):
        assert hps_models(ready, "load", "hps_third", "--version", "1") == 0
        assert "hps_third loaded; READY versions: 1" in capsys.readouterr().out
        assert lookup(ready.http, "hps_third") == expected  # the same tables, through the shared tiers
        loaded = footprint(pgid)
        assert len(stubs_of(pgid, "hps_third_0_0")) == 1 and loaded.processes == before.processes + 1
        assert hps_models(ready, "unload", "hps_third") == 0
        assert "hps_third unloaded all versions; READY versions: none" in capsys.readouterr().out
        assert wait_until(lambda: not stubs_of(pgid, "hps_third_0_0"), 30), stubs_of(pgid, "hps_third_0_0")
        levels.append(settled(pgid))
        with capsys.disabled():
            print(f"\ncycle {cycle}: before {before}, loaded {loaded}, after {levels[-1]}")
    assert hps_models(ready, "list") == 0
    listing = capsys.readouterr().out
    assert "hps_third  1        UNAVAILABLE  unloaded" in listing and "hps_multi  1        READY" in listing
    for after in levels:
        assert after.processes == before.processes
        assert after.rss <= before.rss * (1 + RSS_SHARE) + RSS_SLACK, (before, after)
        assert after.files <= before.files + FILES_SLACK, (before, after)
    # A leak per load would show as the second cycle ending above the first.
    assert levels[1].rss <= levels[0].rss * (1 + RSS_SHARE) + RSS_SLACK and levels[1].files <= levels[0].files + FILES_SLACK
    assert lookup(ready.http, "hps_multi") == expected and echo_ok(ready.http)
    shutil.rmtree(third)


@pytest.mark.timeout(600)
def test_versions_added_and_removed_at_runtime(repository: Repository, serve: tuple[ServeProcess, Ready],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, ready = serve
    pgid = trace(ready).pgid
    # echo: a second version beside the first; the first keeps its stub; then it is unloaded alone.
    shutil.copytree(repository.path / "echo" / "1", repository.path / "echo" / "2")
    # (the first load after start re-creates version 1 once: Findings F1)
    assert hps_models(ready, "load", "echo", "--version", "1", "--version", "2") == 0, capsys.readouterr()
    first = _stub_by_version(pgid, "echo")
    assert sorted(first) == ["1", "2"]
    assert hps_models(ready, "load", "echo", "--version", "2") == 0
    assert _stub_by_version(pgid, "echo") == first
    assert hps_models(ready, "unload", "echo", "--version", "1") == 0
    assert "echo unloaded 1; READY versions: 2" in capsys.readouterr().out
    assert wait_until(lambda: _stub_by_version(pgid, "echo") == {"2": first["2"]}, 30), _stub_by_version(pgid, "echo")
    assert echo_ok(ready.http)
    status, _ = send(ready.http, "/v2/models/echo/versions/1/infer", json.dumps({"inputs": []}))
    assert status != 200
    assert hps_models(ready, "unload", "echo", "--version", "2") == 1  # the last version: unload the model instead
    assert "would leave model 'echo' without a version" in capsys.readouterr().err

    # An HPS version with its own hps.json and rows: entry hps_multi_v2, its own tables.
    rng = np.random.default_rng(11)
    tables = tuple(_random_table(rng, MULTI_ROWS, d, v) for d, v in zip(MULTI_DIMS, MULTI_DEFAULTS))
    keys = np.array([1, 2, 3, 4, 5, 6, 7], np.int64)
    tables = tuple(type(t)(np.concatenate([t.keys, keys]), np.concatenate([t.vectors, rng.normal(
        size=(7, t.vectors.shape[1])).astype(np.float32)]), t.default) for t in tables)
    version2 = repository.path / "hps_multi" / "2"
    version2.mkdir()
    base = json.loads(repository.hps_json.read_text())
    entry = _model_entry("hps_multi_v2", repository.path.parent / "data", tables, [2, 1, 3, 1])
    (version2 / "hps.json").write_text(json.dumps({**base, "models": [entry]}))
    expected2 = np.concatenate([t.expected(k).ravel() for t, k in zip(tables, np.split(keys, [2, 3, 6]))])
    version1 = lookup(ready.http, "hps_multi", 1)
    assert hps_models(ready, "load", "hps_multi", "--version", "2") == 0
    assert "hps_multi loaded; READY versions: 1, 2" in capsys.readouterr().out
    np.testing.assert_allclose(lookup(ready.http, "hps_multi", 2), expected2, rtol=1e-6)
    assert lookup(ready.http, "hps_multi", 1) == version1 and version1 != lookup(ready.http, "hps_multi", 2)


def _stub_by_version(pgid: int, model: str) -> dict[str, int]:
    """{version: stub pid} of ``model``'s instance 0, from the stubs' command lines (<model>/<version>/model.py)."""
    found = {}
    for pid, cmdline in stubs_of(pgid, f"{model}_0_0").items():
        for part in cmdline.split():
            if part.endswith("/model.py") and f"/{model}/" in part:
                found[part.rsplit("/", 2)[-2]] = pid
    return found
