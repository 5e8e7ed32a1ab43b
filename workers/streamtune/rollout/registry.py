"""Versioned, immutable adapter registry.

On-disk shape, one directory per version::

    <root>/<task>/<version>/
        manifest.json              task, version, parent, base model name + sha256, metrics, file sha256s
        adapter_config.json        peft LoRA config
        adapter_model.safetensors  LoRA weights (safetensors only, never pickle)
        head.safetensors           task head (text tasks)  | base_model.safetensors (click model)
        linear.safetensors         the linear stage (text tasks, when the version has one:
        linear.json                streamtune.model.linear; checksummed like every other file)
        artifacts/<backend>/       derived inference artifacts, added later (see below)
            artifact.json          backend, the version's manifest sha256, label agreement with fp32,
                                   what stayed fp32, the file's sha256, passed
            model.onnx             adapter merged into the base, graph-optimized (and quantized)
        artifacts/.lock            advisory lock (flock) of the artifact publishers; never removed
        artifacts/.<backend>.*/    an export being staged (hidden names are never artifacts)

A version may *share* files with an older version of its task (``manifest.shared``: file name
-> that version): the trainer's fast path changes only the linear stage, so its versions hard-link
their parent's transformer files and ONNX artifacts instead of copying them (one inode: nothing
that can diverge, nothing to re-export). Shared files are checksummed like every other file.

A version's own files never change. Derived artifacts (ONNX Runtime graphs) are exported after
publishing, each under its backend's name and immutable once it passed its agreement gate; a
refused export leaves only its record (``passed: false``), which a later export may replace.
Several processes may export the same artifact at once (scorers starting on a fresh registry,
the trainer): the immutability check and the move into place run under the version's
``artifacts/.lock``, so a passed artifact is never replaced and a record never goes missing.

Publishing writes into a hidden temporary directory and renames it into place, so a reader
never sees half a version; an existing version is never overwritten. Storage sits behind
:class:`AdapterStore` so an object store can be added without touching the workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import structlog
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError

from streamtune.core.errors import AdapterError, FileMismatch
from streamtune.core.events import TaskName

MANIFEST = "manifest.json"
ARTIFACTS = "artifacts"
ARTIFACT_MANIFEST = "artifact.json"
ARTIFACTS_LOCK = ".lock"  # in a version's artifacts/ directory; never removed
STALE_AFTER_S = 3600.0  # a staging directory untouched this long belongs to a killed publisher
ModelKind = Literal["text-lora", "click-mlp-lora"]
# A text version's files no ONNX artifact is derived from (the graph is the transformer and head)
_NOT_IN_ARTIFACTS = frozenset({"linear.safetensors", "linear.json"})
log = structlog.get_logger(__name__)


def _undefined_as_nan(v: Any) -> Any:
    return float("nan") if v is None else v


# A metric value; NaN where it is undefined (e.g. ROC-AUC on a holdout with one class only).
# JSON has no NaN: it is written as ``null`` and read back as NaN, so a manifest recording an
# undefined metric stays readable (and its signature, over the same JSON, still matches).
Metric = Annotated[float, BeforeValidator(_undefined_as_nan)]


class BaseModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_inf_nan="null")

    task: TaskName
    version: int = Field(ge=1)
    parent_version: int | None = None
    kind: ModelKind
    base_model: BaseModelRef
    labels: list[str]
    created_at: datetime
    training: dict[str, Any] = {}
    metrics: dict[str, Metric] = Field(default_factory=dict, description="NaN (null in JSON): undefined")
    baselines: dict[str, dict[str, Metric]] = Field(default_factory=dict, description="as metrics, per model")
    gate: dict[str, Any] = Field(
        default_factory=dict, description="The release gate's comparison (online versions); passed: bool"
    )
    cascade: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Text versions with a linear stage (linear.safetensors, linear.json): the cascade's"
            " rule (threshold, weight, min_coverage) and the validation report it was chosen on"
        ),
    )
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    shared: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Files unchanged from an older version of the task (file name -> that version), hard-linked"
            " rather than copied; every other file is this version's own (what changed)"
        ),
    )
    signature: str = Field("", description="HMAC-SHA256 of the manifest without this field (optional)")

    def signing_bytes(self) -> bytes:
        """What the signature covers: the manifest (file checksums included) minus the signature.
        An empty ``cascade`` or ``shared`` is left out, so manifests signed before those fields
        existed still verify."""
        unsigned = self.model_copy(update={"signature": ""})
        empty = {name for name in ("cascade", "shared") if not getattr(self, name)}
        return unsigned.model_dump_json(exclude=empty or None).encode()

    @property
    def changed(self) -> list[str]:
        """The files this version brought (not shared with an older one)."""
        return sorted(set(self.files) - set(self.shared))

    @property
    def releasable(self) -> bool:
        """Bootstrap versions (no gate) and candidates that passed their gate."""
        return not self.gate or bool(self.gate.get("passed"))


class Artifact(BaseModel):
    """An inference artifact derived from one adapter version for one backend."""

    model_config = ConfigDict(frozen=True)

    task: TaskName
    version: int = Field(ge=1)
    backend: str
    manifest_sha256: str = Field(description="sha256 of the version's manifest it was derived from")
    created_at: datetime
    agreement: float = Field(description="share of the evaluation slice where its label equals fp32's")
    eval_rows: int
    min_agreement: float
    passed: bool
    fp32_nodes: list[str] = Field(default_factory=list, description="graph nodes left unquantized")
    details: dict[str, Any] = {}
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    signature: str = ""

    def signing_bytes(self) -> bytes:
        return self.model_copy(update={"signature": ""}).model_dump_json().encode()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _link(source: Path, target: Path) -> None:
    """A hard link of ``source`` at ``target``: one inode, so the two cannot diverge (the
    registry's versions and artifacts live on one filesystem). Where links are refused (some
    network or FUSE mounts) the file is copied, with a warning; its checksum is checked either way."""
    try:
        os.link(source, target)
    except OSError as e:
        log.warning("registry_hard_link_refused_copying", source=str(source), error=str(e))
        shutil.copy2(source, target)


def _stage(
    tmp: Path,
    build_dir: Path,
    files: dict[str, str],
    record: str,
    final: BaseModel,
    links: Mapping[str, Path] | None = None,
) -> None:
    """Copy ``files`` (hard-link those in ``links`` from where it says) and write the record into
    ``tmp``, all fsynced, ready to be renamed into place."""
    tmp.chmod(0o755)  # readable by workers running as another user (mkdtemp makes it 0700)
    links = links or {}
    for name in files:
        if name in links:
            _link(links[name], tmp / name)
        else:
            shutil.copy2(build_dir / name, tmp / name)
    (tmp / record).write_text(final.model_dump_json(indent=2) + "\n", encoding="utf-8")
    for p in tmp.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())


def _swap_in(staged: Path, target: Path, files: dict[str, str]) -> None:
    """Replace the record in the existing directory ``target`` by the one staged in ``staged``.

    The model files move in first (a reader still sees the old record, which lists none of
    them, being refused), then the record itself by one ``os.replace``: a reader sees the old
    record or the new one, never none, whether it takes the lock or not. Whatever the new
    record does not list (left by an earlier, killed swap) goes last."""
    for name in files:
        os.replace(staged / name, target / name)
    os.replace(staged / ARTIFACT_MANIFEST, target / ARTIFACT_MANIFEST)
    for p in target.iterdir():
        if p.name != ARTIFACT_MANIFEST and p.name not in files:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _last_change(path: Path) -> float:
    """The newest mtime of a directory and its entries (a publisher still staging touches them)."""
    times = [path.stat().st_mtime]
    for p in path.iterdir():
        try:
            times.append(p.lstat().st_mtime)
        except FileNotFoundError:
            continue
    return max(times)


class AdapterStore(Protocol):
    """What the scorer, the trainer, training, export and the adapters CLI need from a registry.

    Every one of them is typed against this protocol; :class:`LocalRegistry` (a local or mounted
    directory) is the implementation :func:`registry_for` builds. A remote store would implement
    the same methods, downloading a version before ``fetch`` returns its local directory."""

    root: Path  # where it lives, for error messages and start-up checks

    def versions(self, task: str) -> list[int]: ...

    def latest(self, task: str) -> int | None: ...

    def next_version(self, task: str) -> int: ...

    def default_version(self, task: str, backend: str | None = None) -> int | None: ...

    def manifest(self, task: str, version: int) -> Manifest: ...

    def manifest_sha256(self, task: str, version: int) -> str: ...

    def fetch(self, task: str, version: int) -> Path:
        """A local directory holding the version's files (downloaded first for remote stores)."""
        ...

    def verify(self, task: str, version: int, base_sha256: str | None = None) -> Manifest: ...

    def publish(
        self, build_dir: Path, manifest: Manifest, shared: Mapping[str, int] | None = None
    ) -> Manifest: ...

    def publish_next(
        self, build_dir: Path, manifest: Manifest, shared: Mapping[str, int] | None = None
    ) -> Manifest: ...

    def inherit_artifacts(self, task: str, version: int, parent: int) -> list[Artifact]: ...

    def sign_existing(self, task: str, version: int) -> bool: ...

    def artifact_dir(self, task: str, version: int, backend: str) -> Path: ...

    def artifact(self, task: str, version: int, backend: str) -> Artifact | None: ...

    def verify_artifact(self, task: str, version: int, backend: str) -> tuple[Artifact, Path]: ...

    def artifact_lock(
        self, task: str, version: int, shared: bool = False
    ) -> contextlib.AbstractContextManager[None]: ...

    def publish_artifact(
        self, build_dir: Path, art: Artifact, links: Mapping[str, Path] | None = None
    ) -> Artifact: ...

    def clean_stale(self, max_age_s: float = ..., now: float | None = None) -> list[Path]: ...


class LocalRegistry:
    """The registry as a local (or mounted) directory."""

    def __init__(self, root: Path, hmac_key: bytes | None = None) -> None:
        self.root = Path(root)
        self._key = hmac_key  # set: publish signs manifests, verify refuses unsigned or tampered ones
        self._numbering = threading.Lock()  # publish_next: one number per version across threads

    def _sign(self, m: Manifest | Artifact) -> str:
        assert self._key is not None
        return hmac.new(self._key, m.signing_bytes(), hashlib.sha256).hexdigest()

    def _dir(self, task: str, version: int) -> Path:
        return self.root / task / str(version)

    def versions(self, task: str) -> list[int]:
        d = self.root / task
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())

    def latest(self, task: str) -> int | None:
        v = self.versions(task)
        return v[-1] if v else None

    def manifest(self, task: str, version: int) -> Manifest:
        path = self._dir(task, version) / MANIFEST
        if not path.is_file():
            raise AdapterError(f"{task} v{version}: manifest missing at {path}")
        try:
            m = Manifest.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise AdapterError(f"{task} v{version}: manifest invalid: {e.errors()[0]['msg']}") from e
        if m.task != task or m.version != version:
            raise AdapterError(f"{task} v{version}: manifest names {m.task} v{m.version}")
        return m

    def fetch(self, task: str, version: int) -> Path:
        return self._dir(task, version)

    def verify(self, task: str, version: int, base_sha256: str | None = None) -> Manifest:
        """Check the manifest, every file's checksum and (optionally) the base model.

        Raises :class:`AdapterError` saying exactly what is wrong.
        """
        m = self.manifest(task, version)
        d = self._dir(task, version)
        if self._key is not None:
            if not m.signature:
                raise AdapterError(
                    f"{task} v{version}: manifest is not signed (STREAMTUNE_MANIFEST_HMAC_KEY is set)"
                )
            if not hmac.compare_digest(m.signature, self._sign(m)):
                raise AdapterError(
                    f"{task} v{version}: manifest signature does not match (tampered or another key)"
                )
        if not m.files:
            raise AdapterError(f"{task} v{version}: manifest lists no files")
        for name, digest in m.files.items():
            path = d / name
            if not path.is_file():
                raise FileMismatch(f"{task} v{version}: file {name} missing")
            actual = sha256_file(path)
            if actual != digest:
                raise FileMismatch(f"{task} v{version}: checksum mismatch for {name}")
        if base_sha256 is not None and m.kind == "text-lora" and m.base_model.sha256 != base_sha256:
            raise AdapterError(
                f"{task} v{version}: trained for base model {m.base_model.name} "
                f"({m.base_model.sha256[:12]}), the scorer runs {base_sha256[:12]}"
            )
        return m

    def publish(
        self, build_dir: Path, manifest: Manifest, shared: Mapping[str, int] | None = None
    ) -> Manifest:
        """Publish the files in ``build_dir`` as ``manifest.version`` of ``manifest.task``.

        ``shared``: files to take unchanged from an older version of the task (file name -> that
        version), hard-linked from it after checking them against its manifest; they are not in
        ``build_dir``. Checksums are computed here; the version directory appears atomically
        (rename).
        """
        task, version = manifest.task, manifest.version
        target = self._dir(task, version)
        if target.exists():
            raise AdapterError(f"{task} v{version} already exists; versions are immutable")
        files = {
            p.name: sha256_file(p) for p in sorted(build_dir.iterdir()) if p.is_file() and p.name != MANIFEST
        }
        links: dict[str, Path] = {}
        verified: dict[int, Manifest] = {}
        for name, origin in sorted((shared or {}).items()):
            if name in files or name == MANIFEST:
                raise AdapterError(f"{task} v{version}: {name} is both built and shared from v{origin}")
            if origin >= version:
                why = f"can share an older version's files only, not v{origin}'s"
                raise AdapterError(f"{task} v{version}: {why}")
            # verified (every checksum, the signature): this version vouches for its digests again
            if origin not in verified:
                verified[origin] = self.verify(task, origin)
            recorded = verified[origin].files.get(name)
            source = self._dir(task, origin) / name
            if recorded is None or not source.is_file():
                raise AdapterError(f"{task} v{version}: v{origin} has no file {name} to share")
            files[name] = recorded
            links[name] = source
        files = dict(sorted(files.items()))
        final = manifest.model_copy(update={"files": files, "shared": dict(sorted((shared or {}).items())),
                                            "signature": ""})  # fmt: skip
        if self._key is not None:
            final = final.model_copy(update={"signature": self._sign(final)})
        tmp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
            _stage(tmp, build_dir, files, MANIFEST, final, links)
            os.rename(tmp, target)  # fails if target appeared meanwhile: never overwrite
        except OSError as e:  # disk full, read-only, permissions: nothing partial is left behind
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterError(f"publishing {task} v{version} failed: {e}") from e
        return final

    def publish_next(
        self, build_dir: Path, manifest: Manifest, shared: Mapping[str, int] | None = None
    ) -> Manifest:
        """:meth:`publish` as the task's next version, whatever number ``manifest`` holds: the
        trainer's fast and slow paths publish from two threads, each after a run that took a
        while, and must not both take the number that was next when they started."""
        with self._numbering:
            version = self.next_version(manifest.task)
            return self.publish(build_dir, manifest.model_copy(update={"version": version}), shared)

    def inherit_artifacts(self, task: str, version: int, parent: int) -> list[Artifact]:
        """Give ``version`` every passed artifact of ``parent`` whose model files it shares: the
        same files, hard-linked (no re-export), under a record derived from ``version``'s own
        manifest, with the parent's agreement (the graph is the same) and ``inherited_from``.

        Only for a version that shares every file an artifact is derived from: a text version
        whose transformer (adapter and head) is its parent's. Returns the artifacts published;
        a backend the version already has is left alone."""
        m = self.manifest(task, version)
        parent_files = self.manifest(task, parent).files
        transformer = {n for n in parent_files if n not in _NOT_IN_ARTIFACTS}
        if not transformer or any(
            m.shared.get(n) is None or m.files.get(n) != parent_files[n] for n in transformer
        ):
            raise AdapterError(
                f"{task} v{version}: does not share v{parent}'s transformer files, its artifacts differ"
            )
        root = self._dir(task, parent) / ARTIFACTS
        out: list[Artifact] = []
        for backend_dir in sorted(root.iterdir()) if root.is_dir() else []:
            if backend_dir.name.startswith(".") or not backend_dir.is_dir():
                continue
            backend = backend_dir.name
            art = self.artifact(task, parent, backend)
            if art is None or not art.passed or self.artifact(task, version, backend) is not None:
                continue
            self.verify_artifact(task, parent, backend)  # its files, before vouching for them again
            child = art.model_copy(update={
                "version": version,
                "manifest_sha256": self.manifest_sha256(task, version),
                "created_at": datetime.now(UTC),
                "details": {**art.details, "inherited_from": parent},
                "signature": "",
            })  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="streamtune-inherit-") as empty:  # nothing built
                links = {n: backend_dir / n for n in art.files}
                out.append(self.publish_artifact(Path(empty), child, links=links))
        return out

    # -- derived artifacts ------------------------------------------------------------------

    def artifact_dir(self, task: str, version: int, backend: str) -> Path:
        return self._dir(task, version) / ARTIFACTS / backend

    def artifact(self, task: str, version: int, backend: str) -> Artifact | None:
        """The artifact record of ``backend`` for a version (None when never exported)."""
        path = self.artifact_dir(task, version, backend) / ARTIFACT_MANIFEST
        if not path.is_file():
            return None
        try:
            return Artifact.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            raise AdapterError(f"{task} v{version}: {backend} artifact record invalid: {e}") from e

    def verify_artifact(self, task: str, version: int, backend: str) -> tuple[Artifact, Path]:
        """The artifact and its model file, after checking it passed its gate, was derived from
        this very manifest, is signed (when a key is set) and matches its checksums."""
        art = self.artifact(task, version, backend)
        where = f"{task} v{version}"
        if art is None:
            raise AdapterError(
                f"{where}: no {backend} artifact; run `streamtune adapters export --task {task} "
                f"--version {version} --backend {backend}`"
            )
        if not art.passed:
            raise AdapterError(
                f"{where}: the {backend} artifact was refused by its gate (label agreement with fp32 "
                f"{art.agreement:.4f} < {art.min_agreement}); use another backend for {task}"
            )
        if art.manifest_sha256 != self.manifest_sha256(task, version):
            raise AdapterError(f"{where}: the {backend} artifact was derived from another manifest")
        if self._key is not None and not (
            art.signature and hmac.compare_digest(art.signature, self._sign(art))
        ):
            raise AdapterError(f"{where}: the {backend} artifact record is unsigned or tampered")
        d = self.artifact_dir(task, version, backend)
        if not art.files:
            raise AdapterError(f"{where}: the {backend} artifact lists no files")
        for name, digest in art.files.items():
            if not (d / name).is_file():
                raise FileMismatch(f"{where}: {backend} artifact file {name} missing")
            if sha256_file(d / name) != digest:
                raise FileMismatch(f"{where}: checksum mismatch for {backend} artifact file {name}")
        return art, d / next(iter(art.files))

    @contextmanager
    def artifact_lock(self, task: str, version: int, shared: bool = False) -> Iterator[None]:
        """Hold the advisory lock (``flock``) of a version's artifacts, across processes and
        threads: exclusive for publishers, ``shared`` for a reader that wants a record and its
        files as one publisher left them. Publishing holds it only to re-check and move into
        place (the copy is staged before), so waiting for it is short.

        Readers need not take it: the record is replaced by one rename (see
        :meth:`publish_artifact`), so an unlocking reader sees the old record or the new one.
        A shared lock is skipped where it cannot be had (no artifacts yet, a read-only mount
        without a lock file): there is then no publisher to wait for."""
        d = self._dir(task, version) / ARTIFACTS
        path = d / ARTIFACTS_LOCK
        if shared:
            fd = -1
            for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
                try:
                    fd = os.open(path, flags, 0o644)
                    break
                except OSError:
                    continue
            if fd < 0:
                yield
                return
        else:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def publish_artifact(
        self, build_dir: Path, art: Artifact, links: Mapping[str, Path] | None = None
    ) -> Artifact:
        """Publish an artifact (its files in ``build_dir``; none for a refused one) atomically;
        files named in ``links`` are hard-linked from there instead of copied.

        A passed artifact is immutable (:class:`AdapterError`, also when another process
        published one while this export ran); a refused record may be replaced by a new export.
        The files are staged in a hidden directory first; then, under :meth:`artifact_lock`, the
        record is read again and the staged directory renamed into place, or, when a record is
        there (refused), its files moved into that directory and the record replaced by one
        ``os.replace``. No reader, locking or not, ever sees a missing or half record: it sees
        none (never exported), the old refused one, or the new one."""
        where = f"{art.task} v{art.version}"
        target = self.artifact_dir(art.task, art.version, art.backend)

        def refuse_passed() -> None:
            existing = self.artifact(art.task, art.version, art.backend)
            if existing is not None and existing.passed:
                raise AdapterError(f"{where}: {art.backend} artifact exists; it is immutable")

        refuse_passed()  # early, before copying; checked again under the lock
        files: dict[str, str] = {}
        if art.passed:
            files = {p.name: sha256_file(p) for p in sorted(build_dir.iterdir()) if p.is_file()}
            files.update({name: sha256_file(source) for name, source in sorted((links or {}).items())})
        final = art.model_copy(update={"files": files, "signature": ""})
        if self._key is not None:
            final = final.model_copy(update={"signature": self._sign(final)})
        tmp: Path | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{art.backend}.", dir=target.parent))
            _stage(tmp, build_dir, files, ARTIFACT_MANIFEST, final, links)
            with self.artifact_lock(art.task, art.version):
                refuse_passed()  # another exporter may have published while this one staged
                if target.is_dir():  # a refused record (or a directory without one): take its place
                    _swap_in(tmp, target, files)
                else:
                    os.rename(tmp, target)
                    tmp = None
        except OSError as e:
            raise AdapterError(f"publishing the {art.backend} artifact of {where} failed: {e}") from e
        finally:
            if tmp is not None:  # refused, failed, or the emptied staging directory of a swap
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def clean_stale(self, max_age_s: float = STALE_AFTER_S, now: float | None = None) -> list[Path]:
        """Remove temporary directories a killed publisher left behind (never a version, an
        artifact or the artifacts' lock file). Only those untouched for ``max_age_s`` (newest
        mtime of the directory and its entries) go: a younger one may be another process's
        publish in progress (a scorer exporting while the trainer starts)."""
        cutoff = (time.time() if now is None else now) - max_age_s
        removed = []
        if self.root.is_dir():
            for task_dir in self.root.iterdir():
                if task_dir.is_dir():
                    stale = [*task_dir.glob(".*.*"), *task_dir.glob(f"*/{ARTIFACTS}/.*")]
                    for p in stale:
                        if p.name == ARTIFACTS_LOCK or p.is_symlink() or not p.is_dir():
                            continue
                        if p.name[1:].isdigit():
                            continue
                        try:
                            if _last_change(p) > cutoff:
                                continue
                        except FileNotFoundError:  # published (renamed) or removed meanwhile
                            continue
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p)
        return removed

    def sign_existing(self, task: str, version: int) -> bool:
        """Add the signature to a version published before signing was on (checksums verified
        first; only the signature field changes). False when it is already signed validly."""
        if self._key is None:
            raise AdapterError("no signing key (STREAMTUNE_MANIFEST_HMAC_KEY)")
        m = self.manifest(task, version)
        if m.signature and hmac.compare_digest(m.signature, self._sign(m)):
            return False
        unsigned = LocalRegistry(self.root)
        unsigned.verify(task, version)  # every file's checksum, before vouching for them
        signed = m.model_copy(update={"signature": self._sign(m)})
        path = self._dir(task, version) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(signed.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return True

    def default_version(self, task: str, backend: str | None = None) -> int | None:
        """What serves a task when no release was announced: the newest releasable version.

        With ``backend`` (the one the task runs under), a version whose artifact for it was
        refused by its gate (or whose record is invalid) is skipped too: it could not be
        loaded. A version without that artifact still qualifies, as scorers export missing
        artifacts at start (torch backends have none)."""
        for version in reversed(self.versions(task)):
            try:
                if not self.manifest(task, version).releasable:
                    continue
                if backend is not None:
                    art = self.artifact(task, version, backend)
                    if art is not None and not art.passed:
                        continue
                return version
            except AdapterError:
                continue
        return None

    def manifest_sha256(self, task: str, version: int) -> str:
        return sha256_file(self._dir(task, version) / MANIFEST)

    def next_version(self, task: str) -> int:
        return (self.latest(task) or 0) + 1


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def registry_for(root: Path, key: SecretStr | None) -> AdapterStore:
    """The registry as the workers use it: signing and verifying when a key is configured."""
    return LocalRegistry(root, key.get_secret_value().encode() if key is not None else None)
