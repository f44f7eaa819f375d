"""`exo app generate <name>`: a new app folder, ready to build, package and install.

The folder holds ``app.yaml`` (name, version 0.0.1, the new app public key, a schema, the module;
the multihash is filled by `exo app package`), ``app.c`` (an app on the C SDK: logs that it
started, then every 10 s counts the entities having its own trait type), ``schema.proto`` (that
trait type), a copy of the SDK in ``sdk/`` (so the folder builds anywhere) and a ``Makefile``:
``make`` builds ``app.wasm`` with zig from the ``ziglang`` wheel and ``schema.fd`` with
grpcio-tools' protoc, ``make package`` the zip.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from exocommon.errors import AlreadyExists, InvalidArgument
from exocommon.ids import PeerId
from exocommon.keys import Keypair

from . import sdk_dir

INITIAL_VERSION = "0.0.1"

_MAKEFILE = """\
# Builds the app: app.wasm (C -> wasm32 with zig, from the `ziglang` PyPI wheel) and schema.fd
# (the trait types, a FileDescriptorSet), then `make package` writes the zip to install with
# `exo cell app install <zip>`.
PYTHON ?= {python}
ZIGCC := $(PYTHON) -m ziglang cc
# wasm32-wasi also works (libc, printf to the app's log): TARGET=wasm32-wasi plus -mexec-model=reactor
TARGET ?= wasm32-freestanding
CFLAGS ?= -O2 -s -Wall -Wextra
APP_FLAGS := --target=$(TARGET) -mbulk-memory -Isdk -Wl,--no-entry -Wl,-z,stack-size=65536 \\
\t$(if $(filter wasm32-freestanding,$(TARGET)),-nostdlib,-mexec-model=reactor)

all: app.wasm schema.fd

app.wasm: app.c sdk/exocore.c sdk/exocore.h
\t$(ZIGCC) $(APP_FLAGS) $(CFLAGS) -o $@ app.c sdk/exocore.c

schema.fd: schema.proto
\t$(PYTHON) -m grpc_tools.protoc -I. --include_imports --descriptor_set_out=$@ schema.proto

package: all
\t$(PYTHON) -m exocli app package .

clean:
\trm -f app.wasm schema.fd *.zip

.PHONY: all package clean
"""

_APP_C = """\
/* {name}: an Exocore app (C SDK in sdk/exocore.h). */
#include "exocore.h"

#define TRAIT_TYPE "{package}.Note"
#define REPORT_INTERVAL (10 * EXO_NS_PER_S)

static void report(void *ctx);

static void on_results(void *ctx, const exo_store_reply *reply) {{
    (void)ctx;
    if (reply->error) {{
        exo_buf line = {{0}};
        exo_buf_str(&line, "{name}: query error: ");
        exo_buf_append(&line, reply->error, reply->error_len);
        exo_log_buf(EXO_LOG_WARN, &line);
        exo_buf_free(&line);
    }} else {{
        exo_buf line = {{0}};
        exo_buf_str(&line, "{name}: ");
        exo_buf_i64(&line, exo_results_count(reply->data, reply->len));
        exo_buf_str(&line, " note(s) on the first page");
        exo_log_buf(EXO_LOG_INFO, &line);
        exo_buf_free(&line);
    }}
    exo_sleep(REPORT_INTERVAL, report, 0);
}}

static void report(void *ctx) {{
    (void)ctx;
    exo_buf query = {{0}};
    exo_query_trait(&query, TRAIT_TYPE);
    exo_query_paging(&query, 100);
    if (!exo_store_query(query.data, query.len, on_results, 0)) {{
        exo_warn("{name}: query not sent");
        exo_sleep(REPORT_INTERVAL, report, 0);
    }}
    exo_buf_free(&query);
}}

void exo_app_start(void) {{
    exo_info("{name} started");
    exo_spawn(report, 0);
}}
"""

_SCHEMA = """\
// The trait types of {name}: compiled to schema.fd by `make`, registered with the cell's stores
// when the app is installed.
syntax = "proto3";

package {package};

message Note {{
  string text = 1;
}}
"""


@dataclass(frozen=True)
class GeneratedApp:
    directory: Path
    name: str
    keypair: Keypair

    @property
    def public_key(self) -> str:
        return self.keypair.public_key.encode_base58()

    @property
    def app_id(self) -> str:
        return str(PeerId.from_public_key(self.keypair.public_key))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def proto_package(name: str) -> str:
    ident = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "app"
    if not ident[0].isalpha():
        ident = "app_" + ident
    return f"exoapp.{ident}"


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generate_app(name: str, directory: Path | None = None, python: str | None = None) -> GeneratedApp:
    """Write a new app folder (default ``./<slug of name>``); refuses an existing non-empty folder."""
    if not name.strip() or any(c in name for c in '\n\r"\\*/'):
        raise InvalidArgument(f"app name {name!r} must be non-empty, on one line, without quotes, '/', '*' or '\\'")
    target = directory if directory is not None else Path(slug(name) or "app")
    if target.exists() and any(target.iterdir()):
        raise AlreadyExists(f"{target} already exists and is not empty")
    keypair = Keypair.generate()
    package = proto_package(name)
    target.mkdir(parents=True, exist_ok=True)
    (target / "sdk").mkdir(exist_ok=True)
    for file in ("exocore.h", "exocore.c"):
        shutil.copyfile(sdk_dir() / file, target / "sdk" / file)
    (target / "app.yaml").write_text(
        f"name: {_yaml_string(name)}\n"
        f"version: {INITIAL_VERSION}\n"
        f"public_key: {keypair.public_key.encode_base58()}\n"
        "schemas:\n"
        "  - file: schema.fd\n"
        "module:\n"
        "  file: app.wasm\n"
        "  # multihash: filled in the package by `exo app package`\n",
        encoding="utf-8",
    )
    (target / "app.c").write_text(_APP_C.format(name=name, package=package), encoding="utf-8")
    (target / "schema.proto").write_text(_SCHEMA.format(name=name, package=package), encoding="utf-8")
    (target / "Makefile").write_text(_MAKEFILE.format(python=python or sys.executable), encoding="utf-8")
    return GeneratedApp(target, name, keypair)
