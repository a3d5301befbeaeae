from __future__ import annotations

from chorus.devtools import config_doc


def test_configuration_doc_lists_every_setting_as_the_code_defines_it() -> None:
    assert config_doc.DOC.read_text(encoding="utf-8") == config_doc.render(), (
        "docs/configuration.md is stale: run `python -m chorus.devtools.config_doc`"
    )
