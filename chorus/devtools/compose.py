"""This repository's compose files read as `docker compose` reads them, without Docker.

YAML with merge keys and compose's `!reset` / `!override` tags, a `.env` file, `${VAR:-default}`
interpolation, the merge of override files onto the base file, and each service's environment
(`env_file` then `environment`). It covers the syntax our files use and says so when it meets other
syntax; `docker compose config` stays the reference. `make compose-check` validates with it, and
tests/deploy starts the services it resolves as local processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Sequences an override file replaces instead of extending (compose's merge rules).
REPLACED_SEQUENCES = frozenset({"command", "entrypoint", "test"})

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^}]*)\}|(?P<invalid>))"
)
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


class ComposeError(ValueError):
    """A compose file this reader cannot resolve the way compose would."""


@dataclass(frozen=True)
class Tagged:
    """A value carrying compose's `!reset` or `!override` tag: it replaces, rather than merges into, the
    value of the files before it."""

    tag: str
    value: Any


def _tagged(tag: str) -> Any:
    def construct(loader: Any, node: Any) -> Tagged:
        if isinstance(node, yaml.MappingNode):
            return Tagged(tag, loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Tagged(tag, loader.construct_sequence(node, deep=True))
        return Tagged(tag, loader.construct_scalar(node) or None)

    return construct


# A SafeLoader subclass that also knows compose's tags (built with type(): yaml ships no type stubs).
_Loader: Any = type("ComposeLoader", (yaml.SafeLoader,), {})
_Loader.add_constructor("!reset", _tagged("!reset"))
_Loader.add_constructor("!override", _tagged("!override"))


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    if not isinstance(data, dict):
        raise ComposeError(f"{path}: a compose file is a mapping")
    return data


def untag(value: Any) -> Any:
    """The plain value, every tag dropped (what a schema validator should see)."""
    if isinstance(value, Tagged):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, `#` comments, optional quotes: the .env syntax our files use."""
    env: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ComposeError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _substitute(text: str, env: Mapping[str, str], where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        braced = match["braced"]
        parsed = _BRACED.match(braced or "") if braced is not None else None
        if parsed is None or "${" in (parsed["arg"] or ""):
            raise ComposeError(f"{where}: unsupported interpolation in {text!r}")
        name, op, arg = parsed["name"], parsed["op"], parsed["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value or ""
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise ComposeError(f"{where}: required variable {name} is missing: {arg}")
            return value or ""
        if op in (":+", "+"):
            return "" if (unset_or_empty if op == ":+" else value is None) else arg
        return value or ""

    return _VARIABLE.sub(replace, text)


def interpolate(value: Any, env: Mapping[str, str], where: str = "compose") -> Any:
    """Every string value with its `${...}` filled in from `env` (keys are left as they are)."""
    if isinstance(value, str):
        return _substitute(value, env, where)
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, env, where))
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def variables(value: Any) -> set[str]:
    """The names of the variables a compose document interpolates."""
    if isinstance(value, str):
        names = set()
        for match in _VARIABLE.finditer(value):
            if match["plain"]:
                names.add(match["plain"])
            elif match["braced"] is not None and (parsed := _BRACED.match(match["braced"])):
                names.add(parsed["name"])
        return names
    if isinstance(value, Tagged):
        return variables(value.value)
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value)) if value else set()
    return set()


def _as_mapping(key: str, value: Any) -> Any:
    """`environment`, `labels` and `depends_on` in list form, as the mapping compose merges them as."""
    if key in ("environment", "labels") and isinstance(value, list):
        pairs = (str(item).partition("=") for item in value)
        return {k: (v if sep else None) for k, sep, v in pairs}
    if key == "depends_on" and isinstance(value, list):
        return {name: {"condition": "service_started"} for name in value}
    return value


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`override` merged onto `base` by compose's rules: mappings merge, most sequences extend, and
    command/entrypoint/healthcheck.test and tagged values replace."""
    if isinstance(override, Tagged):
        return override.value
    base, override = _as_mapping(key, base), _as_mapping(key, override)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = merge(merged[k], v, k) if k in merged else untag(v)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return untag(override)


def load_project(files: Iterable[Path], env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model of `docker compose -f A -f B config`: merged, then interpolated from `env`."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = merge(merged, load_yaml(path))
    resolved: dict[str, Any] = interpolate(untag(merged), env)
    return resolved


def service_environment(
    service: Mapping[str, Any], project_dir: Path, env: Mapping[str, str]
) -> dict[str, str]:
    """A container's environment as compose builds it: its env_files in order, then `environment`
    (a key with no value passes the variable through from `env`, or leaves it out)."""
    result: dict[str, str] = {}
    entries = service.get("env_file") or []
    for entry in [entries] if isinstance(entries, str | dict) else entries:
        path, required = (
            (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
        )
        file = project_dir / path
        if file.exists():
            result.update(read_env_file(file))
        elif required:
            raise ComposeError(f"env_file {file} does not exist")
    for key, value in _as_mapping("environment", service.get("environment") or {}).items():
        if value is not None:
            result[key] = str(value)
        elif key in env:
            result[key] = env[key]
    return result
