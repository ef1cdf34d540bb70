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


@pytest.mark.parametrize("cls,values,message", [
    (MetaConfig, {"lease_ttl": "abc"}, "meta option lease_ttl must be a number, not 'abc'"),
    (MetaConfig, {"repair_rate": "64M"}, "meta option repair_rate must be an integer"),
    (MetaConfig, {"agent_timeout": True}, "must be a number, not True"),
    (MetaConfig, {"store": 5}, "meta option store must be a string"),
    (AgentConfig, {"drives": ["file:/d:1G", 7]}, "agent option drives must be a list of strings"),
    (AgentConfig, {"data_tls": "yes"}, "agent option data_tls must be true or false"),
    (AgentConfig, {"max_connections": 1.5}, "agent option max_connections must be an integer"),
])
def test_options_of_the_wrong_type_are_refused_at_start(cls: type, values: dict[str, object], message: str) -> None:
    """A config file's ``lease_ttl = "abc"`` is an error when the daemon starts, naming the option, not a
    failure at first use (issue 30, the first hour, 9)."""
    with pytest.raises(UsageError, match=re.escape(message)):
        cls.from_mapping(values)  # type: ignore[attr-defined]
    # the same options with the right types are taken (an integer where a number is asked, too)
    ok = {"lease_ttl": 20, "repair_rate": 1 << 20, "agent_timeout": 4.0, "store": "sqlite:/x.db"} \
        if cls is MetaConfig else {"drives": ["file:/d:1G"], "data_tls": False, "max_connections": 10}
    cls.from_mapping(ok)  # type: ignore[attr-defined]
