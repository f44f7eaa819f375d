"""Applications of a cell: manifests, packages, installation (SPEC 5.1).

* `app.yaml` is an `exocore.apps.Manifest` (same YAML conventions as the configs):
  ``name``, ``version``, ``public_key`` (the app's identity, ``pe…``), ``schemas: [{file: x.fd}]``
  (FileDescriptorSets), ``module: {file: app.wasm, multihash: <base58 SHA3-256 multihash>}``.
  Paths are relative to the manifest's folder and may not leave it.
* `load_manifest(dir)` parses and checks the fields; `AppManifest.validate()` also checks the
  files: the module's multihash must equal the manifest's, every schema must parse.
* A package is a zip of ``app.yaml`` (multihash filled) + the module + the schema files at their
  manifest paths (`package_app`).
* `install_package(node_dir, cell_id, url)`: fetch (``file://``, a plain path or ``http(s)://``),
  unpack into the cell's ``tmp/``, validate, move to ``apps/<app id>_<version>/`` (refused when
  present unless `overwrite`), then add or replace the app (by public key) in cell.yaml with its
  ``package_url``.
* `installed_apps(node_dir, cell_config)`: the cell's apps with their folder, "loaded" when the
  folder exists; `installed_schema_files` lists their schema files, which the store registers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

from exocommon.config import ConfigError, NodeDirectory, add_application, message_from_yaml, message_to_yaml
from exocommon.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from exocommon.hashing import multihash_file, multihash_to_base58
from exocommon.ids import PeerId
from exocommon.keys import PublicKey
from exocore.apps import manifest_pb2
from exocore.core import config_pb2

Manifest = manifest_pb2.Manifest

MANIFEST_YAML = "app.yaml"
# A package larger than this (compressed or not) is refused.
PACKAGE_MAX_BYTES = 256 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 60.0

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


class ManifestError(InvalidArgument):
    """An app manifest or package that is malformed or does not match its files."""


def _relative_path(text: str, field: str, source: str) -> PurePosixPath:
    """A manifest path: relative, inside the manifest's folder."""
    if not text:
        raise ManifestError(f"{source}: {field}: required field is missing")
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or "\\" in text:
        raise ManifestError(f"{source}: {field}: {text!r} must be a relative path inside the app folder")
    return path


@dataclass(frozen=True)
class AppManifest:
    """A parsed manifest and the folder its paths are relative to."""

    manifest: manifest_pb2.Manifest
    directory: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def public_key(self) -> str:
        return self.manifest.public_key

    @property
    def app_id(self) -> str:
        return str(PeerId.from_public_key(PublicKey.decode_base58(self.manifest.public_key)))

    @property
    def has_module(self) -> bool:
        return self.manifest.HasField("module") and bool(self.manifest.module.file)

    @property
    def module_path(self) -> Path | None:
        return self.directory / self.manifest.module.file if self.has_module else None

    @property
    def schema_paths(self) -> list[Path]:
        return [self.directory / s.file for s in self.manifest.schemas if s.file]

    @property
    def dir_name(self) -> str:
        """The folder name of the installed app: ``<app id>_<version>``."""
        return app_dir_name(self.app_id, self.version)

    def module_multihash(self) -> str:
        """The base58 multihash of the module file as it is on disk."""
        if self.module_path is None:
            raise ManifestError(f"app {self.name} declares no module")
        try:
            return multihash_to_base58(multihash_file(self.module_path))
        except FileNotFoundError:
            raise ManifestError(f"app {self.name}: module file {self.manifest.module.file} does not exist") from None

    def validate(self) -> None:
        """The module's multihash matches the manifest's, every schema file is a FileDescriptorSet."""
        if self.has_module:
            declared = self.manifest.module.multihash
            if not declared:
                raise ManifestError(f"app {self.name}: module.multihash is missing (`exo app package` fills it)")
            actual = self.module_multihash()
            if actual != declared:
                raise ManifestError(
                    f"app {self.name}: module {self.manifest.module.file} has multihash {actual}, "
                    f"the manifest says {declared}"
                )
        for path in self.schema_paths:
            read_schema(path)

    def to_yaml(self) -> str:
        return message_to_yaml(self.manifest)


def app_dir_name(app_id: str, version: str) -> str:
    return f"{app_id}_{version}"


def read_schema(path: Path) -> descriptor_pb2.FileDescriptorSet:
    """A schema file's FileDescriptorSet; ManifestError if missing or not one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read schema file {path.name}: {exc.strerror or exc}") from None
    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except DecodeError as exc:
        raise ManifestError(f"schema file {path.name} is not a FileDescriptorSet: {exc}") from None
    return fds


def parse_manifest(text: str | bytes, directory: Path, source: str = MANIFEST_YAML) -> AppManifest:
    """Parse and check a manifest's fields (not its files, see `AppManifest.validate`)."""
    try:
        manifest = message_from_yaml(text, manifest_pb2.Manifest, source)
    except ConfigError as exc:
        raise ManifestError(str(exc)) from None
    if not manifest.name:
        raise ManifestError(f"{source}: name: required field is missing")
    if not _VERSION.fullmatch(manifest.version):
        raise ManifestError(
            f"{source}: version: {manifest.version!r} is not a version (letters, digits, '.', '_', '+', '-')"
        )
    if not manifest.public_key:
        raise ManifestError(f"{source}: public_key: required field is missing")
    try:
        PublicKey.decode_base58(manifest.public_key)
    except InvalidArgument as exc:
        raise ManifestError(f"{source}: public_key: {exc}") from None
    for i, schema in enumerate(manifest.schemas):
        _relative_path(schema.file, f"schemas[{i}].file", source)
    if manifest.HasField("module"):
        _relative_path(manifest.module.file, "module.file", source)
    return AppManifest(manifest, directory)


def load_manifest(path: str | os.PathLike[str]) -> AppManifest:
    """The manifest of an app folder (or the `app.yaml` file itself)."""
    path = Path(path)
    file = path / MANIFEST_YAML if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"no app manifest {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {file}: {exc}") from None
    return parse_manifest(text, file.parent, str(file))


# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------


def package_file_name(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "app"
    return f"{slug}.zip"


def package_app(directory: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> Path:
    """Write the package zip of the app in `directory` (default output: ``<dir>/<name>.zip``)."""
    app = load_manifest(directory)
    manifest = manifest_pb2.Manifest()
    manifest.CopyFrom(app.manifest)
    if app.has_module:
        manifest.module.multihash = app.module_multihash()
    filled = AppManifest(manifest, app.directory)
    filled.validate()
    out = Path(output) if output is not None else app.directory / package_file_name(app.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(MANIFEST_YAML, filled.to_yaml())
            members = [manifest.module.file] if app.has_module else []
            members += [s.file for s in manifest.schemas]
            for member in dict.fromkeys(members):
                zf.write(app.directory / member, member)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def _url_path(url: str) -> Path | None:
    """The local file a `file://` URL or plain path names; None for other schemes."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"file URL {url!r} names another host")
        return Path(urllib.parse.unquote(parsed.path))
    if not parsed.scheme:
        return Path(url)
    return None


def package_url_of(url: str) -> str:
    """The URL recorded in cell.yaml: plain paths become absolute ``file://`` URLs."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme:
        return url
    return Path(url).expanduser().resolve().as_uri()


def fetch_package(url: str, dest: Path) -> Path:
    """Copy or download the package at `url` to `dest`."""
    local = _url_path(url)
    if local is not None:
        local = local.expanduser()
        if not local.is_file():
            raise NotFound(f"no package file {local}")
        if local.stat().st_size > PACKAGE_MAX_BYTES:
            raise ManifestError(f"package {local} is larger than {PACKAGE_MAX_BYTES} bytes")
        shutil.copyfile(local, dest)
        return dest
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        raise InvalidArgument(f"unsupported package URL scheme {scheme!r} (file://, http:// or https://, or a path)")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
            total = 0
            while chunk := response.read(1 << 16):
                total += len(chunk)
                if total > PACKAGE_MAX_BYTES:
                    raise ManifestError(f"package at {url} is larger than {PACKAGE_MAX_BYTES} bytes")
                out.write(chunk)
    except OSError as exc:  # URLError, HTTPError, timeouts
        raise Unavailable(f"cannot download {url}: {exc}") from None
    return dest


def unpack_package(package: Path, dest: Path) -> AppManifest:
    """Extract a package zip into `dest` (checked: no path leaves it, bounded size) and validate it."""
    try:
        with zipfile.ZipFile(package) as zf:
            infos = zf.infolist()
            if sum(i.file_size for i in infos) > PACKAGE_MAX_BYTES:
                raise ManifestError(f"package unpacks to more than {PACKAGE_MAX_BYTES} bytes")
            for info in infos:
                _relative_path(info.filename.rstrip("/") or ".", "zip member", package.name)
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise ManifestError(f"{package.name} is not a zip file: {exc}") from None
    app = load_manifest(dest)
    app.validate()
    return app


@dataclass(frozen=True)
class InstalledApp:
    """An app of a cell's config and where it is installed on this node."""

    config: config_pb2.CellApplicationConfig
    directory: Path

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def public_key(self) -> str:
        return self.config.public_key

    @property
    def app_id(self) -> str:
        return str(PeerId.from_public_key(PublicKey.decode_base58(self.config.public_key)))

    @property
    def loaded(self) -> bool:
        """Whether the package is unpacked on this node (else the app is listed but not run)."""
        return (self.directory / MANIFEST_YAML).is_file()

    def manifest(self) -> AppManifest:
        return load_manifest(self.directory)


def installed_apps(directory: NodeDirectory, cell_config: config_pb2.CellConfig) -> list[InstalledApp]:
    """The cell's apps (cell.yaml order) with their folder ``apps/<app id>_<version>``."""
    apps_dir = directory.apps_dir(_cell_id_of(cell_config))
    out: list[InstalledApp] = []
    for entry in cell_config.apps:
        if not entry.public_key:
            continue
        app_id = str(PeerId.from_public_key(PublicKey.decode_base58(entry.public_key)))
        if not _VERSION.fullmatch(entry.version):
            raise ManifestError(f"cell.yaml: app {entry.name}: version {entry.version!r} is not a version")
        out.append(InstalledApp(entry, apps_dir / app_dir_name(app_id, entry.version)))
    return out


def installed_schema_files(directory: NodeDirectory, cell_config: config_pb2.CellConfig) -> list[Path]:
    """The schema files (FileDescriptorSets) of the cell's installed apps, for the store's registry."""
    files: list[Path] = []
    for app in installed_apps(directory, cell_config):
        if app.loaded:
            files.extend(app.manifest().schema_paths)
    return files


def _cell_id_of(cell_config: config_pb2.CellConfig) -> str:
    return cell_config.id or str(PeerId.from_public_key(PublicKey.decode_base58(cell_config.public_key)))


def _find_cell(directory: NodeDirectory, cell_id: str) -> config_pb2.CellConfig:
    for cell_config in directory.load_cell_configs():
        if _cell_id_of(cell_config) == cell_id:
            return cell_config
    raise NotFound(f"no cell {cell_id} in {directory.root}")


def install_package(
    directory: NodeDirectory, cell_id: str, url: str, *, overwrite: bool = False
) -> tuple[AppManifest, config_pb2.CellApplicationConfig]:
    """Install the package at `url` into the cell (see module docstring); returns its manifest
    (in its final folder) and the cell.yaml entry written."""
    _find_cell(directory, cell_id)  # fails early for an unknown cell
    tmp_root = directory.tmp_dir(cell_id)
    tmp_root.mkdir(parents=True, exist_ok=True)
    apps_dir = directory.apps_dir(cell_id)
    apps_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="app-install-", dir=tmp_root) as work:
        work_dir = Path(work)
        package = fetch_package(url, work_dir / "package.zip")
        unpacked = work_dir / "app"
        unpacked.mkdir()
        app = unpack_package(package, unpacked)
        final = apps_dir / app.dir_name
        if final.exists():
            if not overwrite:
                raise AlreadyExists(f"app {app.name} {app.version} is already installed in {final} (use --overwrite)")
            shutil.rmtree(final)
        os.replace(unpacked, final)
    entry = config_pb2.CellApplicationConfig(
        name=app.name, version=app.version, public_key=app.public_key, package_url=package_url_of(url)
    )
    # Re-read right before writing: the smallest window for a concurrent edit of cell.yaml.
    cell_config = _find_cell(directory, cell_id)
    add_application(cell_config, entry)
    directory.save_cell_config(cell_config)
    return load_manifest(final), entry


__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "MANIFEST_YAML",
    "PACKAGE_MAX_BYTES",
    "AppManifest",
    "InstalledApp",
    "Manifest",
    "ManifestError",
    "app_dir_name",
    "fetch_package",
    "install_package",
    "installed_apps",
    "installed_schema_files",
    "load_manifest",
    "package_app",
    "package_file_name",
    "package_url_of",
    "parse_manifest",
    "read_schema",
    "unpack_package",
]
