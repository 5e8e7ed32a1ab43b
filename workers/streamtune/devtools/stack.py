"""Embedded local stack: a single-node KRaft Kafka broker and a Redis server.

Used by ``streamtune demo`` and by the pytest session (same code), so that a newcomer needs no
Docker: the broker runs from the Apache Kafka jars (fetched once with Maven into the cache
directory) on a JVM, Redis is Debian's ``redis-server``. Everything listens on 127.0.0.1 only,
on free ports, and logs into the caller's work directory, never onto our stdout.

Every wait in here is bounded: a deadline loop around a condition, never a bare sleep.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from streamtune.core.errors import StackError
from streamtune.core.settings import cache_root
from streamtune.kafka.security import redact_url

log = structlog.get_logger(__name__)

KAFKA_VERSION = "3.9.1"
REPO_ROOT = Path(__file__).resolve().parents[3]

KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

JAVA_HINT = (
    "java not found on PATH: install it with `apt-get install -y openjdk-17-jre-headless` "
    "or use the compose stack (`docker compose up`)"
)
MVN_HINT = (
    "mvn not found on PATH (needed once to fetch the Kafka jars): install it with "
    "`apt-get install -y maven` or use the compose stack (`docker compose up`)"
)
REDIS_HINT = (
    "redis-server not found on PATH: install it with `apt-get install -y redis-server` "
    "or use the compose stack (`docker compose up`)"
)

_JAR_MARKER = ".jars-complete"
_MVN_TIMEOUT_S = 1800.0  # a fresh machine downloads ~60 jars from Maven Central
_FORMAT_TIMEOUT_S = 60.0
_POLL_S = 0.2
_LOG_TAIL_LINES = 40


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_ports(1)[0]


def _free_cluster_port(taken: set[int]) -> int:
    """A free port for a Redis Cluster node: its cluster bus listens 10000 above it, so the port
    must be at most 55535 and that one free too."""
    for port in random.sample(range(20000, 55535), 2000):
        if port in taken or port + 10000 in taken:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise StackError("no free port pair (p, p + 10000) for a Redis Cluster node")


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (the sockets stay bound until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _endpoint_open(host_port: str, timeout_s: float = 0.5) -> bool:
    host, _, port = host_port.strip().rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _require(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise StackError(hint)
    return path


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} is empty)"


def _wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = _POLL_S) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(poll_s, remaining))


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to the child's process group (it was started in its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - group gone and pid reused
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns True if it exited on SIGTERM."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        _kill(proc)
        return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - SIGKILL cannot be ignored
        raise StackError(f"process {proc.pid} survived SIGKILL") from exc


# Servers still running when the interpreter exits (a test run aborted half-way, an uncaught
# exception in the demo) are stopped, so no broker JVM outlives us.
_LIVE: set[LocalServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for service in list(_LIVE):
        with contextlib.suppress(Exception):
            service.stop()


class LocalServer:
    """A local server process in its own session: start/stop/kill/restart, context manager.

    ``start()`` returns once the server answers (bounded by ``startup_timeout_s``); ``restart()``
    reuses the same port(s) and data. Subclasses: :class:`EmbeddedKafka`, :class:`EmbeddedRedis`.
    """

    name = "service"

    def __init__(self, work_dir: Path, startup_timeout_s: float, stop_timeout_s: float) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    # -- to implement -------------------------------------------------------------------------------
    def _launch(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _answers(self) -> bool:
        raise NotImplementedError

    def _diagnostics(self) -> str:
        raise NotImplementedError

    def _address(self) -> str:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Self:
        """Start the server and return once it answers (bounded by ``startup_timeout_s``)."""
        if self.running:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        log.info(f"{self.name}.starting", address=self._address(), work_dir=str(self.work_dir))
        proc = self._launch()
        self._proc = proc
        _LIVE.add(self)
        deadline = started + self.startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                _LIVE.discard(self)
                raise StackError(
                    f"{self.name} exited with code {code} during startup ({self._address()}).\n"
                    f"{self._diagnostics()}"
                )
            if self._answers():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(proc)
                self._proc = None
                _LIVE.discard(self)
                raise StackError(
                    f"{self.name} did not answer on {self._address()} "
                    f"within {self.startup_timeout_s:.0f} s.\n{self._diagnostics()}"
                )
            time.sleep(min(_POLL_S, remaining))
        log.info(
            f"{self.name}.ready",
            address=self._address(),
            pid=proc.pid,
            seconds=round(time.monotonic() - started, 2),
        )
        return self

    def stop(self) -> None:
        """SIGTERM, wait up to ``stop_timeout_s``, then SIGKILL. No-op when not running."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is not None:
            return
        graceful = _terminate(proc, self.stop_timeout_s)
        log.info(f"{self.name}.stopped", address=self._address(), graceful=graceful)

    def kill(self) -> None:
        """SIGKILL right away (crash simulation). No-op when not running."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        _kill(proc)
        log.info(f"{self.name}.killed", address=self._address())

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port(s) and data."""
        self.stop()
        # The old listener may linger for a moment after the process is gone.
        _wait_until(lambda: not self._answers(), timeout_s=5.0)
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------
# Kafka
# ------------------------------------------------------------------------------------------------------


def kafka_libs_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root()) / f"kafka-{KAFKA_VERSION}" / "libs"


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def ensure_kafka_jars(cache_dir: Path | None = None, pom: Path = KAFKA_POM) -> Path:
    """Fetch the Kafka broker jars into ``<cache_dir>/kafka-3.9.1/libs`` unless already there.

    Maven runs once; afterwards a marker file (holding the pom's hash) says the copy is complete.
    The copy goes to a temporary directory that is renamed into place, so an interrupted fetch is
    redone from scratch. A file lock serialises concurrent callers (demo and tests at once).
    Returns the libs directory.
    """
    libs = kafka_libs_dir(cache_dir)
    marker = libs.parent / _JAR_MARKER
    if not pom.is_file():
        raise StackError(
            f"Kafka pom not found at {pom}: the embedded broker needs a source checkout of streamtune "
            "(pip install -e .) or use the compose stack (`docker compose up`)"
        )
    digest = _pom_digest(pom)

    def complete() -> bool:
        try:
            return marker.read_text().strip() == digest and any(libs.glob("kafka_2.13-*.jar"))
        except OSError:
            return False

    if complete():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete():  # another process finished the fetch while we waited for the lock
            return libs
        mvn = _require("mvn", MVN_HINT)
        partial = libs.parent / f"libs.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
        ]  # fmt: skip
        log.info("kafka.fetching_jars", libs=str(libs), command=" ".join(cmd))
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_MVN_TIMEOUT_S, check=False, cwd=pom.parent
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise StackError(
                f"mvn did not finish fetching the Kafka jars within {_MVN_TIMEOUT_S:.0f} s"
            ) from exc
        if result.returncode != 0 or not any(partial.glob("kafka_2.13-*.jar")):
            shutil.rmtree(partial, ignore_errors=True)
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(f"mvn failed to fetch the Kafka jars (exit {result.returncode}):\n{output}")
        marker.unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        marker.write_text(digest + "\n")
        log.info("kafka.jars_ready", libs=str(libs), jars=sum(1 for _ in libs.glob("*.jar")))
    return libs


def _new_cluster_id() -> str:
    """A Kafka cluster id (base64url UUID, 22 chars) that does not start with '-' (CLI-safe)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _quiet_admin(bootstrap_servers: str, timeout_s: float) -> Any:
    from kafka import KafkaAdminClient  # imported lazily: kafka-python spins up threads on use

    ms = max(int(timeout_s * 1000), 500)
    return KafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="streamtune-stack-probe",
        bootstrap_timeout_ms=ms,
        request_timeout_ms=ms,
        reconnect_backoff_max_ms=500,
    )


def kafka_answers(bootstrap_servers: str, timeout_s: float = 2.0) -> bool:
    """True when a broker at ``bootstrap_servers`` serves metadata and has an unfenced broker."""
    if not any(_endpoint_open(server, timeout_s) for server in bootstrap_servers.split(",")):
        return False  # cheap TCP probe first: kafka-python logs loudly about refused connections
    try:
        admin = _quiet_admin(bootstrap_servers, timeout_s)
    except Exception:
        return False
    try:
        admin.list_topics()
        brokers = admin.describe_cluster().get("brokers") or []
        return any(not broker.get("is_fenced", False) for broker in brokers)
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            admin.close()


class EmbeddedKafka(LocalServer):
    """Single-node KRaft Kafka (broker + controller in one JVM) on 127.0.0.1.

    ``work_dir`` receives ``server.properties``, ``log4j.properties``, the data dir (``data/``),
    the broker log (``kafka.log``) and the JVM's own stdout/stderr (``kafka.out``).
    """

    name = "kafka"

    def __init__(
        self,
        work_dir: Path,
        *,
        cache_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        startup_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        heap: tuple[str, ...] = ("-Xmx512m", "-Xms256m"),
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        replication: int = 1,
        sasl_users: dict[str, str] | None = None,
    ) -> None:
        super().__init__(work_dir, startup_timeout_s, stop_timeout_s)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        # Users of a second listener, SASL_PLAINTEXT with the PLAIN mechanism (security tests).
        self.sasl_users = dict(sasl_users or {})
        self.sasl_port = find_free_port() if self.sasl_users else None
        self.node_id = node_id
        self._voters = voters  # None: a single node that is its own quorum
        self.cluster_id = cluster_id
        self.replication = replication
        if port is None or controller_port is None:
            free = iter(p for p in _free_ports(3) if p not in (port, controller_port))
            port = port if port is not None else next(free)
            controller_port = controller_port if controller_port is not None else next(free)
        if port == controller_port:
            raise StackError(f"broker and controller port must differ (both {port})")
        self.port = port
        self.controller_port = controller_port
        self.heap = heap

    # -- paths --------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "kafka.log"

    @property
    def out_file(self) -> Path:
        return self.work_dir / "kafka.out"

    @property
    def server_properties(self) -> Path:
        return self.work_dir / "server.properties"

    @property
    def log4j_properties(self) -> Path:
        return self.work_dir / "log4j.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL_PLAINTEXT listener (only with ``sasl_users``)."""
        if self.sasl_port is None:
            raise StackError("this broker has no SASL listener (pass sasl_users)")
        return f"127.0.0.1:{self.sasl_port}"

    def _address(self) -> str:
        return self.bootstrap_servers

    # -- jars ---------------------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Fetch the jars into ``cache_dir`` if missing (Maven, once). Returns the libs directory."""
        return ensure_kafka_jars(self.cache_dir)

    @classmethod
    def ensure_jars_default(cls, cache_dir: Path | None = None) -> Path:
        """Same as :meth:`ensure_jars` without an instance (``scripts/bootstrap.sh`` pre-fetch)."""
        return ensure_kafka_jars(cache_dir)

    # -- config -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rf = str(self.replication)
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        sasl: dict[str, str] = {}
        if self.sasl_users:
            listeners += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            advertised += f",SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            users = " ".join(f'user_{u}="{p}"' for u, p in self.sasl_users.items())
            sasl = {
                "sasl.enabled.mechanisms": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                    f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
                ),
            }
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self._voters or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "listener.security.protocol.map": protocols,
            **sasl,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": rf,
            "min.insync.replicas": "2" if self.replication >= 3 else "1",
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": "2" if self.replication >= 3 else "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the restarted broker cannot register until the old registration's
            # session expires (default 9 s, plus retry backoff): keep crash restarts quick.
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        self.server_properties.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.log4j_properties.write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.log_file}\n"
            "log4j.appender.file.Append=true\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
            "log4j.logger.kafka.log.LogCleaner=WARN\n"
            "log4j.logger.org.apache.kafka.clients.NetworkClient=WARN\n"
        )

    def _java_base(self, java: str, libs: Path) -> list[str]:
        return [
            java,
            *self.heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.log4j_properties}",
            f"-Dkafka.logs.dir={self.work_dir}",
            "-cp",
            f"{libs}/*",
        ]

    def _format_storage(self, java: str, libs: Path) -> None:
        if (self.data_dir / "meta.properties").is_file():
            return  # formatted before: restart keeps the cluster id, topics and offsets
        cmd = [
            *self._java_base(java, libs),
            "kafka.tools.StorageTool", "format",
            "-t", self.cluster_id or _new_cluster_id(),
            "-c", str(self.server_properties),
            "--ignore-formatted",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=_FORMAT_TIMEOUT_S, check=False, cwd=self.work_dir
            )
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"kafka storage format did not finish within {_FORMAT_TIMEOUT_S:.0f} s") from exc
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-_LOG_TAIL_LINES:])
            raise StackError(f"kafka storage format failed (exit {result.returncode}):\n{output}")

    def _launch(self) -> subprocess.Popen[bytes]:
        java = _require("java", JAVA_HINT)
        libs = self.ensure_jars()
        self._write_config()
        self._format_storage(java, libs)
        cmd = [*self._java_base(java, libs), "kafka.Kafka", str(self.server_properties)]
        with open(self.out_file, "ab") as out:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,
            )

    def _answers(self) -> bool:
        return kafka_answers(self.bootstrap_servers)

    def _diagnostics(self) -> str:
        # On a failed start the last lines are shutdown noise: the cause is in ERROR lines and exceptions.
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        errors = [
            line
            for line in lines
            if " ERROR " in line or " FATAL " in line or ("Exception: " in line and not line[:1].isspace())
        ][-10:]
        return (
            f"--- errors in {self.log_file} ---\n{chr(10).join(errors) or '(none)'}\n"
            f"--- tail of {self.log_file} ---\n{_tail(self.log_file, 20)}\n"
            f"--- tail of {self.out_file} ---\n{_tail(self.out_file, 15)}"
        )


class KafkaCluster:
    """``size`` KRaft nodes (each broker + controller) as local JVMs: replication factor ``size``,
    ``min.insync.replicas`` 2. Used by the fault-tolerance suite to kill one broker mid-stream."""

    def __init__(self, work_dir: Path, size: int = 3, cache_dir: Path | None = None) -> None:
        ports = _free_ports(2 * size)
        cluster_id = _new_cluster_id()
        voters = ",".join(f"{i + 1}@127.0.0.1:{ports[size + i]}" for i in range(size))
        self.nodes = [
            EmbeddedKafka(
                Path(work_dir) / f"node{i + 1}",
                cache_dir=cache_dir,
                port=ports[i],
                controller_port=ports[size + i],
                node_id=i + 1,
                voters=voters,
                cluster_id=cluster_id,
                replication=size,
                heap=("-Xmx384m", "-Xms128m"),
                startup_timeout_s=120.0,
            )
            for i in range(size)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes)

    def start(self) -> KafkaCluster:
        """Start every node at once (a node only answers once the controller quorum has formed)."""
        errors: list[BaseException] = []

        def run(node: EmbeddedKafka) -> None:
            try:
                node.start()
            except BaseException as e:  # reported below, after every thread ended
                errors.append(e)

        threads = [threading.Thread(target=run, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise StackError(f"kafka cluster did not start: {errors[0]}") from errors[0]
        # Each node answers once some broker is unfenced; wait for all of them (on a loaded
        # machine the controller quorum can change leader a few times right after start).
        if not _wait_until(self._all_unfenced, timeout_s=90.0, poll_s=0.5):
            self.stop()
            raise StackError(f"kafka cluster: not all {len(self.nodes)} brokers unfenced within 90 s")
        return self

    def _all_unfenced(self) -> bool:
        try:
            admin = _quiet_admin(self.bootstrap_servers, 2.0)
        except Exception:
            return False
        try:
            brokers = admin.describe_cluster().get("brokers") or []
            return sum(not b.get("is_fenced", False) for b in brokers) == len(self.nodes)
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                admin.close()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------------


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when the Redis server at ``url`` answers PING within ``timeout_s``."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            client.close()


class EmbeddedRedis(LocalServer):
    """Debian's ``redis-server`` on 127.0.0.1, logging to ``work_dir/redis.log``; no persistence
    unless ``persist`` (append-only file, fsync always: a restart keeps every acknowledged write)."""

    name = "redis"

    def __init__(
        self,
        work_dir: Path,
        *,
        port: int | None = None,
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 10.0,
        persist: bool = False,
        cluster: bool = False,
    ) -> None:
        super().__init__(work_dir, startup_timeout_s, stop_timeout_s)
        self.port = port if port is not None else find_free_port()
        self.persist = persist
        self.cluster = cluster  # a cluster node (see RedisClusterStack): one database only

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "redis.log"

    def _address(self) -> str:
        return self.url

    def _launch(self) -> subprocess.Popen[bytes]:
        server = _require("redis-server", REDIS_HINT)
        cmd = [
            server,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--dir", str(self.work_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_file),
            "--databases", "16",
        ]  # fmt: skip
        if self.cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.work_dir / "nodes.conf")]
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.work_dir,
            start_new_session=True,
        )

    def _answers(self) -> bool:
        return redis_answers(self.url)

    def _diagnostics(self) -> str:
        return f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"


class RedisClusterStack:
    """A Redis Cluster of ``size`` primaries (no replicas) from Debian's redis packages: each node
    ``redis-server --cluster-enabled yes``, joined with ``redis-cli --cluster create``."""

    def __init__(self, work_dir: Path, size: int = 3) -> None:
        taken: set[int] = set()
        self.nodes = []
        for i in range(size):
            port = _free_cluster_port(taken)
            taken |= {port, port + 10000}
            self.nodes.append(EmbeddedRedis(Path(work_dir) / f"node{i + 1}", port=port, cluster=True))

    @property
    def url(self) -> str:
        """One node's URL: cluster clients discover the others from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def _state_ok(self) -> bool:
        import redis

        for node in self.nodes:
            try:
                with redis.Redis(port=node.port, socket_timeout=1, decode_responses=True) as c:
                    if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                        return False
            except (redis.RedisError, OSError):
                return False
        return True

    def start(self) -> RedisClusterStack:
        for node in self.nodes:
            node.start()
        cli = _require("redis-cli", REDIS_HINT)
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            self.stop()
            output = (done.stdout + done.stderr)[-3000:]
            raise StackError(f"redis-cli --cluster create failed:\n{output}")
        if not _wait_until(self._state_ok, timeout_s=30.0):
            self.stop()
            raise StackError("redis cluster did not reach cluster_state:ok within 30 s")
        log.info("redis_cluster.ready", nodes=addresses)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_redis(url: str | None, work_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """Use ``url`` if a Redis answers there, else start an embedded one in ``work_dir``.

    Returns ``(url, embedded)``; ``embedded`` is None when the given server was used, otherwise
    the started :class:`EmbeddedRedis`, which the caller must ``stop()``.
    """
    if url and redis_answers(url):
        log.info("redis.external", url=redact_url(url))
        return url, None
    if url:
        log.warning("redis.unreachable_starting_embedded", url=redact_url(url))
    embedded = EmbeddedRedis(work_dir).start()
    return embedded.url, embedded
