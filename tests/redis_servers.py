"""Real redis-server processes for tests and benchmarks: one server, or a cluster on loopback.

Nothing here is a stand-in: each server is the ``redis-server`` binary on a free loopback
port, with persistence off (``--save '' --appendonly no``) and its output redirected to a
log file in its own folder (a pipe could fill up and hang the server). A cluster is made
with ``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes``.

Cluster nodes run with ``cluster-require-full-coverage no`` and
``cluster-allow-reads-when-down yes`` so that, when one node is killed, the others keep
answering for their own slots (this is also the setting docs/tiers.md recommends for a
serving cluster), and a short ``cluster-node-timeout`` so that a restarted node is taken
back quickly.

    with RedisProcesses.cluster(tmp_path, nodes=3) as cluster:
        cluster.address            # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.servers[1].kill()  # SIGKILL by PID
        cluster.servers[1].restart()
        cluster.wait_ok()

Used by tests/hps_core/db (fixtures) and scripts/bench_tiers.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from hps_core.serving import free_port
from tests.tools import find_redis

__all__ = ["RedisProcesses", "RedisServer"]

_HOST = "127.0.0.1"
_NODE_TIMEOUT_MS = 1000


def _free_cluster_port(taken: set[int]) -> int:
    """A free port P ≤ 55535 whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = free_port(_HOST)
        if port > 55535 or port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (P, P+10000) for a cluster node")


def _ping(port: int, password: str | None, timeout: float = 0.2) -> bool:
    """True when the server on ``port`` answers PING (authenticating when a password is set)."""
    import redis

    client = redis.Redis(
        host=_HOST, port=port, password=password, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class RedisServer:
    """One ``redis-server`` process; ``restart()`` brings it back on the same port and files."""

    port: int
    folder: Path
    extra_args: list[str] = field(default_factory=list)
    password: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    def command(self) -> list[str]:
        args = [
            str(find_redis("redis-server").path),
            "--port", str(self.port),
            "--bind", _HOST,
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "no",
            *self.extra_args,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited; see {self.folder / 'server.log'}")
            if _ping(self.port, self.password):
                return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout} s")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL by PID (a crash: no shutdown, no goodbye to the cluster)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start again on the same port, folder and (for a cluster node) nodes.conf."""
        self.kill()
        return self.start(timeout)


@dataclass
class RedisProcesses:
    """A set of servers started together: one plain server, or the nodes of one cluster."""

    servers: list[RedisServer]
    clustered: bool

    @property
    def address(self) -> str:
        """The HPS JSON ``address`` form: ``host:port,host:port,...``."""
        return ",".join(s.address for s in self.servers)

    @classmethod
    def single(cls, folder: Path, *, password: str | None = None) -> RedisProcesses:
        server = RedisServer(free_port(_HOST), Path(folder) / "single", password=password)
        return cls([server.start()], clustered=False)

    @classmethod
    def cluster(cls, folder: Path, *, nodes: int = 3, password: str | None = None) -> RedisProcesses:
        servers: list[RedisServer] = []
        try:
            for _ in range(nodes):
                port = _free_cluster_port({s.port for s in servers})
                extra = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(_NODE_TIMEOUT_MS),
                    "--cluster-require-full-coverage", "no",
                    "--cluster-allow-reads-when-down", "yes",
                ]
                if password:
                    extra += ["--masterauth", password]
                servers.append(RedisServer(port, Path(folder) / f"node-{port}", extra, password).start())
            made = cls(servers, clustered=True)
            made._create(password)
            made.wait_ok()
            return made
        except BaseException:
            for server in servers:
                server.kill()
            raise

    def _create(self, password: str | None) -> None:
        args = [str(find_redis("redis-cli").path), "--cluster", "create"]
        args += [s.address for s in self.servers]
        args += ["--cluster-replicas", "0", "--cluster-yes"]
        if password:
            args += ["-a", password, "--no-auth-warning"]
        log = self.servers[0].folder / "cluster-create.log"
        with open(log, "wb") as out:
            cli = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        # redis-cli's own "Waiting for the cluster to join" loop sometimes outlives the join on a
        # loaded machine (seen in CI: every node said "Cluster state changed: ok" while it kept
        # printing dots for 60 s): what counts is the nodes' own view, so stop waiting for it then.
        deadline = time.monotonic() + 60
        while cli.poll() is None and not self._formed():
            if time.monotonic() > deadline:
                cli.kill()
                cli.wait()
                raise RuntimeError(f"redis-cli --cluster create did not form the cluster in 60 s; see {log}")
            time.sleep(0.1)
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        elif cli.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({cli.returncode}); see {log}")

    def _formed(self) -> bool:
        """Every node knows every other, all 16384 slots are assigned and the state is ok."""
        return all(
            {"cluster_state": "ok", "cluster_slots_assigned": "16384", "cluster_known_nodes": str(len(self.servers))}
            .items() <= self._cluster_info(s).items()
            for s in self.servers
        )

    def cluster_ok(self, server: RedisServer) -> bool:
        return self._cluster_info(server).get("cluster_state") == "ok"

    @staticmethod
    def _cluster_info(server: RedisServer) -> dict[str, str]:
        """``CLUSTER INFO`` of ``server`` as a dict ({} when it does not answer)."""
        import redis

        client = redis.Redis(host=_HOST, port=server.port, password=server.password, socket_timeout=0.5)
        try:
            info = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return {}
        finally:
            client.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every running node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.cluster_ok(s) for s in self.servers if s.is_running()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"cluster {self.address} not ok after {timeout} s")

    def flushall(self) -> None:
        """Empty every running server (FLUSHALL on each: a cluster has no global flush)."""
        import redis

        for server in self.servers:
            if server.is_running():
                client = redis.Redis(host=_HOST, port=server.port, password=server.password)
                try:
                    client.flushall()
                finally:
                    client.close()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> RedisProcesses:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
