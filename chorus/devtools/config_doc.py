"""Generates docs/configuration.md from the settings classes, so the doc cannot drift from the code.

`python -m chorus.devtools.config_doc` rewrites it; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from shared.settings import CommonSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

HEADER = """# Configuration

Every setting is an environment variable `CHORUS_<NAME>` (or a line in `.env`). Each service reads the
common settings plus its own. This page is generated from the settings classes by
`python -m chorus.devtools.config_doc`; a test fails when it is out of date.
"""


def _service_settings() -> list[tuple[str, type[BaseSettings]]]:
    from services.dialogue.settings import DialogueSettings
    from services.gateway.settings import GatewaySettings
    from services.router.settings import RouterSettings
    from services.tts.settings import TtsSettings

    return [
        ("gateway", GatewaySettings),
        ("dialogue", DialogueSettings),
        ("tts", TtsSettings),
        ("router", RouterSettings),
    ]


def _default(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    if field.default_factory is not None:
        return "(computed)"
    value = field.default
    return "(unset)" if value is None or value == "" else f"`{value}`"


def _table(cls: type[BaseSettings], names: list[str]) -> list[str]:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name in names:
        description = (cls.model_fields[name].description or "").replace("|", "\\|")
        rows.append(f"| `CHORUS_{name.upper()}` | {_default(cls, name)} | {description} |")
    return rows


def render() -> str:
    common = list(CommonSettings.model_fields)
    lines = [HEADER, "## Common (every service)", "", *_table(CommonSettings, common), ""]
    for service, cls in _service_settings():
        own = [n for n in cls.model_fields if n not in common]
        lines += [f"## {service}", "", *_table(cls, own), ""]
    return "\n".join(lines)


def main() -> int:
    DOC.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {DOC}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
