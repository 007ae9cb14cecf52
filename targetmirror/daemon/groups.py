"""Consistency groups: named sets of mirrors split at one instant, kept in one JSON file.

(The YAML config will define groups too; it will populate this same registry.)
"""

from __future__ import annotations

import json
import threading

from targetmirror.atomicfile import write_json
from targetmirror.errors import ConfigError, MirrorError
from targetmirror.names import valid_name


class GroupStore:
    """Group name -> member mirror names, persisted atomically."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read consistency groups: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object of group name -> mirror names")
        self._groups: dict[str, list[str]] = {str(k): list(v) for k, v in data.items()}

    def all(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._groups.items()}

    def members(self, group: str) -> list[str]:
        with self._lock:
            if group not in self._groups:
                raise MirrorError(f"no consistency group named {group!r}")
            return list(self._groups[group])

    def create(self, group: str, names: list[str]) -> dict[str, list[str]]:
        if not valid_name(group):
            raise ConfigError(f"group name {group!r}: expected letters, digits, '_', '.', '-'")
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"group {group}: expected two or more distinct mirror names")
        with self._lock:
            if group in self._groups:
                raise MirrorError(f"consistency group {group!r} already exists")
            self._groups[group] = list(names)
            self._save()
        return self.all()

    def delete(self, group: str) -> dict[str, list[str]]:
        with self._lock:
            if self._groups.pop(group, None) is None:
                raise MirrorError(f"no consistency group named {group!r}")
            self._save()
        return self.all()

    def _save(self) -> None:
        write_json(self.path, self._groups)
