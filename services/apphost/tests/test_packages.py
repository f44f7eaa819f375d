"""Manifests, packages and installation through the `exo` CLI: generate, build, package,
install (file path, file:// and http://), list; the installed app's schema reaches the store's
registry and the installed app runs."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exoapphost.runner import AppRunner, AppSpec
from exoapphost.runtime import WasmEngine
from exoapphost.settings import AppLimits, RestartPolicy
from exocli.main import main as exo_main
from exocommon.apps import (
    ManifestError,
    install_package,
    installed_apps,
    installed_schema_files,
    load_manifest,
    package_app,
)
from exocommon.config import NodeDirectory
from exocommon.errors import AlreadyExists
from exocommon.hashing import multihash_file, multihash_to_base58

pytestmark = pytest.mark.timeout(60)

EXAMPLE_PUBLIC_KEY = "pekqnDw6pdC6MzwB7KLkDebygDfd9SzQy1x4Qjx2a2ZSj"


def exo(capsys, *args: str) -> str:
    code = exo_main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, f"exo {' '.join(args)} failed ({code}): {err}"
    return out


def exo_fails(capsys, *args: str) -> str:
    code = exo_main(list(args))
    out, err = capsys.readouterr()
    assert code != 0, f"exo {' '.join(args)} should have failed: {out}"
    return err


@pytest.fixture
def node(tmp_path: Path, capsys) -> NodeDirectory:
    directory = NodeDirectory(tmp_path / "node")
    exo(capsys, "-d", str(directory.root), "node", "init", "--name", "apps")
    exo(capsys, "-d", str(directory.root), "cell", "init", "--name", "apps", "--no-genesis")
    return directory


def cell_id_of(node: NodeDirectory) -> str:
    (cell,) = node.load_cell_configs()
    return cell.id


@pytest.fixture
def example_package(tmp_path: Path, example_wasm: Path, capsys) -> Path:
    out = tmp_path / "example.zip"
    printed = exo(capsys, "app", "package", str(example_wasm.parent), "-o", str(out))
    assert printed == f"package written to {out}\n"
    return out


def test_package_fills_the_multihash_in_the_zip_only(example_package: Path, example_wasm: Path):
    with zipfile.ZipFile(example_package) as zf:
        assert sorted(zf.namelist()) == ["app.yaml", "example.wasm"]
        manifest_text = zf.read("app.yaml").decode()
    assert f"multihash: {multihash_to_base58(multihash_file(example_wasm))}" in manifest_text
    assert "multihash" not in (example_wasm.parent / "app.yaml").read_text().replace("# ", "").split("module:")[1]


def test_install_list_and_overwrite(node: NodeDirectory, example_package: Path, capsys):
    d = str(node.root)
    printed = exo(capsys, "-d", d, "cell", "app", "install", str(example_package))
    app_dir = node.apps_dir(cell_id_of(node)) / "12D3KooWAaCwy4gXp6MrQpgXwwVZRQ4WhzfnUgVSyYRS7wBTvWAf_0.0.1"
    assert (
        printed == f"app example 0.0.1 (12D3KooWAaCwy4gXp6MrQpgXwwVZRQ4WhzfnUgVSyYRS7wBTvWAf) installed in {app_dir}\n"
    )
    assert sorted(p.name for p in app_dir.iterdir()) == ["app.yaml", "example.wasm"]
    load_manifest(app_dir).validate()
    (cell,) = node.load_cell_configs()
    (entry,) = cell.apps
    assert (entry.name, entry.version, entry.public_key) == ("example", "0.0.1", EXAMPLE_PUBLIC_KEY)
    assert entry.package_url == example_package.resolve().as_uri()

    listing = exo(capsys, "-d", d, "cell", "app", "list").splitlines()
    assert listing[0].split() == ["Name", "Version", "Public", "key", "Installed"]
    assert listing[2].split() == ["example", "0.0.1", EXAMPLE_PUBLIC_KEY, "✓"]

    assert "already installed" in exo_fails(capsys, "-d", d, "cell", "app", "install", str(example_package))
    exo(capsys, "-d", d, "cell", "app", "install", example_package.as_uri(), "--overwrite")
    (cell,) = node.load_cell_configs()
    assert len(cell.apps) == 1  # replaced by public key, not added twice

    # Listed but not unpacked on this node.
    import shutil

    shutil.rmtree(app_dir)
    assert exo(capsys, "-d", d, "cell", "app", "list").splitlines()[2].split() == [
        "example",
        "0.0.1",
        EXAMPLE_PUBLIC_KEY,
    ]


def test_install_over_http(node: NodeDirectory, example_package: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(example_package.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{example_package.name}"
        app, entry = install_package(node, cell_id_of(node), url)
        assert app.name == "example" and entry.package_url == url
        with pytest.raises(Exception, match="cannot download"):
            install_package(node, cell_id_of(node), f"http://127.0.0.1:{server.server_port}/missing.zip")
    finally:
        server.shutdown()


def rezip(source: Path, dest: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, replace.pop(name, zin.read(name)))
        for name, data in replace.items():
            zout.writestr(name, data)
    return dest


def test_tampered_and_malicious_packages_are_refused(node: NodeDirectory, example_package: Path, tmp_path: Path):
    cell_id = cell_id_of(node)
    tampered = rezip(example_package, tmp_path / "tampered.zip", {"example.wasm": b"\x00asm\x01\x00\x00\x00"})
    with pytest.raises(ManifestError, match="has multihash .* the manifest says"):
        install_package(node, cell_id, str(tampered))
    escaping = rezip(example_package, tmp_path / "escape.zip", {"../evil": b"x"})
    with pytest.raises(ManifestError, match="must be a relative path inside the app folder"):
        install_package(node, cell_id, str(escaping))
    with pytest.raises(ManifestError, match="not a zip file"):
        (tmp_path / "not-a.zip").write_text("hello")
        install_package(node, cell_id, str(tmp_path / "not-a.zip"))
    assert not any(node.apps_dir(cell_id).iterdir())
    (cell,) = node.load_cell_configs()
    assert not cell.apps
    assert not list(node.tmp_dir(cell_id).iterdir())  # the work folders are cleaned up


@pytest.mark.parametrize(
    ("manifest", "error"),
    [
        ("version: 1\npublic_key: pekqnDw6pdC6MzwB7KLkDebygDfd9SzQy1x4Qjx2a2ZSj\n", "name: required field is missing"),
        (f"name: x\nversion: ../1\npublic_key: {EXAMPLE_PUBLIC_KEY}\n", "is not a version"),
        ("name: x\nversion: 1\npublic_key: nope\n", "public_key:"),
        (f"name: x\nversion: 1\npublic_key: {EXAMPLE_PUBLIC_KEY}\nmodule: {{file: /etc/passwd}}\n", "relative path"),
        (f"name: x\nversion: 1\npublic_key: {EXAMPLE_PUBLIC_KEY}\nschemas: [{{file: ../s.fd}}]\n", "relative path"),
    ],
)
def test_invalid_manifests(tmp_path: Path, manifest: str, error: str):
    (tmp_path / "app.yaml").write_text(manifest)
    with pytest.raises(ManifestError, match=error):
        load_manifest(tmp_path)


def test_a_module_without_multihash_does_not_validate(tmp_path: Path, example_wasm: Path):
    (tmp_path / "app.yaml").write_text(
        f"name: x\nversion: 1\npublic_key: {EXAMPLE_PUBLIC_KEY}\nmodule: {{file: a.wasm}}\n"
    )
    (tmp_path / "a.wasm").write_bytes(example_wasm.read_bytes())
    with pytest.raises(ManifestError, match="module.multihash is missing"):
        load_manifest(tmp_path).validate()
    package_app(tmp_path)  # packaging fills it
    assert (tmp_path / "x.zip").is_file()


@pytest.fixture
def demo_app(tmp_path: Path, capsys) -> Iterator[Path]:
    app_dir = tmp_path / "demo"
    printed = exo(capsys, "app", "generate", "demo", "--dir", str(app_dir))
    assert "keypair:    ae" in printed and "Save the keypair" in printed
    subprocess.run(["make", "-s", "-C", str(app_dir), "package"], check=True, timeout=120, capture_output=True)
    yield app_dir


def test_generated_app_builds_installs_registers_its_schema_and_runs(node: NodeDirectory, demo_app: Path, capsys):
    from exostore.setup import load_registry

    assert sorted(p.name for p in demo_app.iterdir()) == [
        "Makefile",
        "app.c",
        "app.wasm",
        "app.yaml",
        "demo.zip",
        "schema.fd",
        "schema.proto",
        "sdk",
    ]
    exo(capsys, "-d", str(node.root), "cell", "app", "install", str(demo_app / "demo.zip"))
    (cell_config,) = node.load_cell_configs()
    (app,) = installed_apps(node, cell_config)
    assert app.loaded and app.version == "0.0.1"
    assert installed_schema_files(node, cell_config) == [app.directory / "schema.fd"]

    # The store loads the installed apps' schemas into its registry.
    (cell,) = node.load_cells()
    registry = load_registry(node, cell)
    assert registry.message_descriptor("exoapp.demo.Note") is not None

    # The installed package runs (manifest validated, module compiled, app started).
    engine = WasmEngine()
    requests: list[object] = []

    class Bridge:
        def submit(self, _app, message, reply) -> None:
            requests.append(message)

    runner = AppRunner(
        AppSpec(app.app_id, app.name, app.version, directory=app.directory),
        engine,
        AppLimits(),
        RestartPolicy(),
        Bridge(),
    )
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (3, "demo started") in runner.recent_logs
        assert requests, "the demo app's query"
    finally:
        runner.stop()
        engine.close()


def test_generate_refuses_a_non_empty_folder(tmp_path: Path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("")
    assert "already exists" in exo_fails(capsys, "app", "generate", "x", "--dir", str(tmp_path / "x"))


def test_install_into_an_unknown_cell(node: NodeDirectory, example_package: Path):
    with pytest.raises(Exception, match="no cell"):
        install_package(node, "12D3KooWAaCwy4gXp6MrQpgXwwVZRQ4WhzfnUgVSyYRS7wBTvWAf", str(example_package))
    with pytest.raises(AlreadyExists):
        install_package(node, cell_id_of(node), str(example_package))
        install_package(node, cell_id_of(node), str(example_package))
