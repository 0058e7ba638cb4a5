"""Triton's model repository API over HTTP: list, load, unload and wait for model versions.

A small client of the server ``hps serve`` runs (explicit model control, docs/deployment.md
"Model versions and runtime loading"); no Triton package is imported. Every call of the
repository API (``/v2/repository/...``) carries the header ``hps-api-token`` that ``hps serve``
requires (:func:`api_token`: ``--api-token-file`` or ``$HPS_API_TOKEN``); the model's config
and readiness (``/v2/models/...``) need none. Every failure is a
:class:`~hps_core.errors.ServingError` naming the server, the model, the version where there
is one, and Triton's own message.

What Triton 2.51 does with versions (measured; docs/deployment.md, "What Triton 2.51 does on a
load"), with ``version_policy: { all {} }``:

* a new version folder, then :meth:`ModelControl.load`: only that version is created, the
  others keep serving (their stubs untouched), no request fails. The first load of a model
  after the server started re-creates its loaded versions once, seamlessly;
* a version folder removed, then ``load``: only that version is unloaded;
* ``load`` of an ensemble with a config override pinning its steps' versions switches
  atomically, but if a pinned version is not loaded the load fails *and the ensemble is
  unloaded*: check with :meth:`ModelControl.wait_ready` first.

On a machine without GPU ``hps serve`` serves a staged mirror of the repository that follows
the original every 0.2 s; ``load(name, versions=...)`` therefore loads again until the
versions it expects are there.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hps_core.errors import ConfigError, ServingError
from hps_core.serving import API_TOKEN_ENV, API_TOKEN_HEADER

__all__ = ["ModelControl", "ModelVersionState", "api_token"]

_POLL_S = 0.1  # how often the wait loops ask the index
_ALIVE = frozenset({"READY", "LOADING", "UNLOADING"})  # states in which a version still holds resources
# No proxies: an http_proxy in the environment must not intercept a loopback call.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def api_token(path: str | os.PathLike[str] | None = None) -> str | None:
    """The token from the file ``path`` (whitespace around it stripped), else ``$HPS_API_TOKEN``, else None."""
    if path is None:
        return os.environ.get(API_TOKEN_ENV) or None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--api-token-file {path}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"--api-token-file {path} is empty")
    return token


@dataclass(frozen=True)
class ModelVersionState:
    """One entry of Triton's repository index."""

    name: str
    version: int | None  # None: a model Triton knows of but has no version of (never loaded)
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE, or "" when Triton gives none
    reason: str  # why UNAVAILABLE ("unloaded", or the load's error); often empty


class ModelControl:
    """Client of one Triton's repository API.

    ``url`` is ``host:port`` (or ``http://host:port``) of its HTTP endpoint; ``token`` the
    value of the ``hps-api-token`` header (None: sent without; ``hps serve`` then refuses
    every repository call). ``timeout`` bounds each HTTP call in seconds; a load waits for
    the model to be created, so give it what the slowest model needs.
    """

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0) -> None:
        self.base = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ModelControl({self.base!r})"

    # ---- repository API (token)
    def index(self, *, ready_only: bool = False) -> list[ModelVersionState]:
        """Every model version Triton knows of (its repository index), sorted by name and version."""
        body = self._call("POST", "/v2/repository/index", {"ready": ready_only}, what="the repository index")
        entries = []
        for entry in json.loads(body or b"[]"):
            version = entry.get("version")
            entries.append(ModelVersionState(
                name=str(entry["name"]),
                version=int(version) if version not in (None, "") else None,
                state=str(entry.get("state", "")),
                reason=str(entry.get("reason", "")),
            ))
        return sorted(entries, key=lambda e: (e.name, e.version if e.version is not None else -1))

    def versions(self, name: str) -> dict[int, ModelVersionState]:
        """The versions of ``name`` in the index, by number (empty: unknown or never loaded)."""
        return {e.version: e for e in self.index() if e.name == name and e.version is not None}

    def ready_versions(self, name: str) -> list[int]:
        """The versions of ``name`` that are READY now, ascending."""
        return [v for v, e in self.versions(name).items() if e.state == "READY"]

    def load(
        self,
        name: str,
        *,
        config: Mapping[str, Any] | str | None = None,
        files: Mapping[str, bytes] | None = None,
        versions: Collection[int] = (),
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) ``name`` and wait until Triton answered.

        ``config``: a config override (a dict, or its JSON text) used instead of the model's
        config.pbtxt (Triton's ``parameters.config``), for instance an ensemble whose steps are
        pinned to one version. ``files``: ``{"<version>/<path>": bytes}`` served instead of the
        model folder's files (needs ``config``). ``versions``: versions that must be READY
        afterwards; while one is missing from the index (a staged mirror not yet in step with
        the repository) the load is sent again, until ``timeout`` (default: the client's).
        A version that failed to load, or never appeared, is an error naming it.
        """
        parameters: dict[str, str] = {}
        if config is not None:
            parameters["config"] = config if isinstance(config, str) else json.dumps(config)
        if files:
            if config is None:
                raise ServingError(f"load of model '{name}': files need a config override (Triton's rule)")
            for path, data in files.items():
                parameters[f"file:{path}"] = base64.b64encode(data).decode()
        body = {"parameters": parameters} if parameters else {}
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self._call("POST", f"/v2/repository/models/{_quote(name)}/load", body, what=f"load of model '{name}'")
            present = self.versions(name)
            # A model loaded from files is not in the index (no folder): ask its readiness.
            missing = sorted(v for v in versions if v not in present and not self.is_ready(name, v))
            if not missing:
                break
            if time.monotonic() > deadline:
                ready = [v for v, e in present.items() if e.state == "READY"]
                raise ServingError(
                    f"{self.base}: load of model '{name}' did not bring version(s) {_list(missing)} "
                    f"(Triton serves {_list(ready) or 'none'}): is each a folder "
                    f"<repository>/{name}/<version>/ and does the version policy serve it?"
                )
            time.sleep(0.2)
        if versions:
            self.wait_ready(name, versions, timeout=max(deadline - time.monotonic(), 1.0))

    def unload(self, name: str, *, unload_dependents: bool = False) -> None:
        """Ask Triton to unload every version of ``name`` (returns before they are gone: see
        :meth:`wait_gone`). ``unload_dependents``: ensembles using it go too."""
        body = {"parameters": {"unload_dependents": True}} if unload_dependents else {}
        self._call("POST", f"/v2/repository/models/{_quote(name)}/unload", body, what=f"unload of model '{name}'")

    # ---- model API (no token)
    def config(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The config Triton serves ``name`` (version ``version``) with, as JSON."""
        body = self._call("GET", f"{_model_path(name, version)}/config", None, what=_what("config", name, version))
        config: dict[str, Any] = json.loads(body)
        return config

    def is_ready(self, name: str, version: int | None = None) -> bool:
        """Whether ``name`` (version ``version``; None: Triton's choice) answers requests now."""
        request = self._request("GET", f"{_model_path(name, version)}/ready", None)
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False
        except OSError as exc:
            raise ServingError(f"{self.base}: {_what('readiness', name, version)}: {_reason(exc)}") from exc

    # ---- waiting
    def wait_ready(self, name: str, versions: Collection[int], *, timeout: float = 600.0) -> None:
        """Block until every one of ``versions`` of ``name`` is READY.

        A version that ends UNAVAILABLE with a reason other than ``unloaded`` failed to load:
        raised at once with Triton's reason; past ``timeout`` the states seen are raised.
        """
        deadline = time.monotonic() + timeout
        while True:
            present = self.versions(name)
            if all(present[v].state == "READY" if v in present else self.is_ready(name, v) for v in versions):
                return
            failed = [present[v] for v in versions if v in present and present[v].state == "UNAVAILABLE"
                      and present[v].reason not in ("", "unloaded")]
            if failed:
                raise ServingError(
                    f"{self.base}: model '{name}' version {failed[0].version} failed to load: {failed[0].reason}"
                )
            if time.monotonic() > deadline:
                raise ServingError(
                    f"{self.base}: model '{name}' version(s) {_list(sorted(versions))} not READY after "
                    f"{timeout:.0f} s; Triton reports {_states(present, versions)}"
                )
            time.sleep(_POLL_S)

    def wait_gone(self, name: str, versions: Collection[int] | None = None, *, timeout: float = 600.0) -> None:
        """Block until ``versions`` of ``name`` (None: all) are unloaded: not READY, LOADING or
        UNLOADING (their ``finalize`` has returned; a model loaded from files, absent from the
        index: not ready)."""
        deadline = time.monotonic() + timeout
        while True:
            present = self.versions(name)
            alive = [v for v, e in present.items() if e.state in _ALIVE and (versions is None or v in versions)]
            alive += [v for v in versions or () if v not in present and self.is_ready(name, v)]
            if not alive:
                return
            if time.monotonic() > deadline:
                raise ServingError(
                    f"{self.base}: model '{name}' version(s) {_list(sorted(alive))} still loaded after "
                    f"{timeout:.0f} s; Triton reports {_states(present, alive)}"
                )
            time.sleep(_POLL_S)

    # ---- HTTP
    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"}
        if self.token is not None and path.startswith("/v2/repository"):
            headers[API_TOKEN_HEADER] = self.token
        data = json.dumps(body).encode() if body is not None else None
        return urllib.request.Request(self.base + path, data=data, method=method, headers=headers)

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None, *, what: str) -> bytes:
        try:
            with _OPENER.open(self._request(method, path, body), timeout=self.timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            message = _triton_message(exc)
            if exc.code == 403 or "restricted" in message.lower():
                hint = (" (the repository API needs the header hps-api-token: give --api-token-file or "
                        f"${API_TOKEN_ENV}, the token hps serve was started with)")
            else:
                hint = ""
            raise ServingError(f"{self.base}: {what} failed: HTTP {exc.code}: {message}{hint}") from exc
        except OSError as exc:  # URLError, connection refused or reset, timeout
            raise ServingError(f"{self.base}: {what} failed: {_reason(exc)} (is the server running?)") from exc


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _model_path(name: str, version: int | None) -> str:
    return f"/v2/models/{_quote(name)}" + (f"/versions/{version}" if version is not None else "")


def _what(kind: str, name: str, version: int | None) -> str:
    return f"{kind} of model '{name}'" + (f" version {version}" if version is not None else "")


def _list(versions: Collection[int]) -> str:
    return ", ".join(str(v) for v in versions)


def _states(present: Mapping[int, ModelVersionState], versions: Collection[int]) -> str:
    parts = []
    for v in sorted(versions):
        entry = present.get(v)
        parts.append(f"{v}: " + ("absent" if entry is None else entry.state + (f" ({entry.reason})" if entry.reason else "")))
    return "; ".join(parts)


def _triton_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
    except OSError:
        return str(exc.reason)
    try:
        return str(json.loads(raw)["error"]).strip()
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip() or str(exc.reason)


def _reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc)
