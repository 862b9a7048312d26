"""A directory laid out like a Kubernetes Secret or projected volume, swapped as the kubelet does."""

from __future__ import annotations

import os
from pathlib import Path


class MountedSecret:
    """A directory laid out like a Kubernetes Secret volume: files are links through `..data`."""

    def __init__(self, root: Path, files: dict[str, str]) -> None:
        self.root = root
        root.mkdir(parents=True)
        self._generation = 0
        self._write(files)
        for name in files:
            (root / name).symlink_to(f"..data/{name}")

    def _write(self, files: dict[str, str]) -> None:
        self._generation += 1
        target = self.root / f"..2026_11_22_{self._generation:02d}"
        target.mkdir()
        for name, value in files.items():
            (target / name).write_text(value)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")  # atomic, as the kubelet does

    def swap(self, files: dict[str, str]) -> None:
        """Publish a new version of the Secret."""
        self._write(files)
