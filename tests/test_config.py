"""Daemon configs: the sample files parse, document every option, and unknown keys are refused."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from nvpool.agents.agent import AgentConfig
from nvpool.pool.grpc_meta import MetaConfig
from nvpool.proto.errors import UsageError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("cls,sample", [(AgentConfig, "agent.toml.sample"), (MetaConfig, "meta.toml.sample")])
def test_sample_documents_every_option(cls: type, sample: str) -> None:
    text = (DEPLOY / sample).read_text()
    values = tomllib.loads(text)
    cfg = cls.from_mapping(values)  # type: ignore[attr-defined]
    for f in dataclasses.fields(cls):
        assert re.search(rf"^#? ?{f.name} =", text, re.M), f"{sample} does not document {f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in values and default is not None and not isinstance(default, tuple):
            assert values[f.name] == default, f"{sample}: {f.name} shows {values[f.name]!r}, default is {default!r}"
    assert cfg is not None
    with pytest.raises(UsageError, match="unknown"):
        cls.from_mapping({**values, "lisen": "typo"})  # type: ignore[attr-defined]
