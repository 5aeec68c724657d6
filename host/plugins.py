"""Plugin installation: manifest in, verified artifact in the state dir, row in the store.

A manifest comes from a path, file:// or http(s):// URL; its initramfs (or
rootfs) URL may be relative to the manifest's own folder. The artifact is
checked against the manifest's checksum before anything is recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from host import fetch
from host.errors import AlreadyExists, ChecksumMismatch, VolarError
from host.names import NAME_RULE, valid_name
from host.rows import Plugin, from_row
from host.state import Store
from kestrel.cliout import Output
from kestrel.manifest import Manifest, ManifestError, load_manifest, normalize_checksum


def _source_base(source: str) -> str:
    if fetch.is_url(source):
        return source
    return str(Path(source).resolve())




def install(store: Store, source: str, *, force: bool = False,
            output: Output | None = None) -> Plugin:
    """Install the plugin whose manifest is at ``source``; returns its row."""
    base = _source_base(source)
    text = fetch.read_text(fetch.local_path(base) if base.startswith("file://") else base)
    manifest = load_manifest(text)  # ManifestError names the field
    if not valid_name(manifest.name):
        raise ManifestError("name", f"{manifest.name!r}: {NAME_RULE}")
    exists = store.db.execute(
        "SELECT 1 FROM plugins WHERE name = ?", (manifest.name,)
    ).fetchone()
    if exists and not force:
        raise AlreadyExists(
            f"plugin {manifest.name!r} is already installed "
            "(`volar plugins remove` it first, or install with --force to replace it)"
        )
    strategy, artifact = (
        ("initramfs", manifest.initramfs) if manifest.initramfs else ("rootfs", manifest.rootfs)
    )
    assert artifact is not None  # parse_manifest requires one of them
    where = fetch.resolve(artifact.url, base=base)
    tmp, actual = fetch.download(where, dest_dir=store.artifacts_dir, output=output)
    if artifact.checksum:
        expected = normalize_checksum(artifact.checksum, field=f"{strategy}.checksum")
        if expected != actual:
            tmp.unlink()
            raise ChecksumMismatch(url=where, expected=expected, actual=actual)
    suffix = ".cpio.gz" if strategy == "initramfs" else ".img"
    path = fetch.store_artifact(tmp, actual, dest_dir=store.artifacts_dir, suffix=suffix)
    raw = dict(manifest.raw)
    # Volant defaulted a missing `enabled` to false, so a fresh install could
    # not be used (HTTP 409): a manifest that does not say is enabled.
    raw["enabled"] = manifest.enabled
    row = {
        "name": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "enabled": int(manifest.enabled),
        "strategy": strategy,
        "manifest_json": json.dumps(raw, separators=(",", ":")),
        "source": source,
        "artifact_path": str(path),
        "artifact_sha256": actual,
        "installed_at": time.time(),
    }
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    store.db.execute(
        f"INSERT OR REPLACE INTO plugins ({cols}) VALUES ({marks})", tuple(row.values())
    )
    return from_row(Plugin, row)


def manifest_of(row: Plugin) -> Manifest:
    return load_manifest(row.manifest_json)


def set_enabled(store: Store, name: str, enabled: bool) -> None:
    row = store.plugin(name)
    raw = json.loads(row.manifest_json)
    raw["enabled"] = enabled
    store.db.execute(
        "UPDATE plugins SET enabled = ?, manifest_json = ? WHERE name = ?",
        (int(enabled), json.dumps(raw, separators=(",", ":")), name),
    )


def remove(store: Store, name: str, *, force: bool = False) -> None:
    row = store.plugin(name)
    users = [r[0] for r in store.db.execute("SELECT name FROM vms WHERE plugin = ?", (name,))]
    if users and not force:
        raise VolarError(
            f"plugin {name!r} is used by VM(s) {', '.join(users)}: delete them first "
            "or pass --force"
        )
    with store.transaction():
        store.db.execute("DELETE FROM plugins WHERE name = ?", (name,))
        still_used = store.db.execute(
            "SELECT 1 FROM plugins WHERE artifact_path = ? UNION ALL "
            "SELECT 1 FROM vms WHERE initramfs = ?",
            (row.artifact_path, row.artifact_path),
        ).fetchone()
    if not still_used:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(row.artifact_path)


def describe(row: Plugin) -> dict[str, Any]:
    """What ``plugins show`` prints: the row plus the decoded manifest."""
    out = {k: v for k, v in asdict(row).items() if k != "manifest_json"}
    out["manifest"] = json.loads(row.manifest_json)
    return out
