"""A directory laid out as Kubernetes mounts a ConfigMap, updated as the kubelet updates it.

The kubelet writes every version into a fresh hidden directory, points the symlink ``..data``
at it with an atomic rename, and each key is a symlink ``KEY -> ..data/KEY``: the path a pod
reads never changes, the file behind it does (and may keep its size and mtime).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

_versions = itertools.count(1)


def publish(directory: Path, files: dict[str, str]) -> None:
    """Make ``files`` (name -> text) the ConfigMap's content, as one atomic switch."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..2024_01_01_00_00_00.{next(_versions)}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text, encoding="utf-8")
    staged = directory / "..data_tmp"
    staged.symlink_to(version.name)
    os.replace(staged, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
