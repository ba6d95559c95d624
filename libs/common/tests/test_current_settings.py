"""``current_settings()``: one Settings per environment, built again when a TESSERA_* variable changes."""

from __future__ import annotations

import pytest

from tessera.common.config import current_settings


@pytest.mark.usefixtures("clean_env")
def test_the_same_environment_gives_the_same_settings_and_a_change_gives_new_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = current_settings()
    assert current_settings() is first
    monkeypatch.setenv("TESSERA_RPC_TIMEOUT_S", "3.5")
    changed = current_settings()
    assert changed is not first and changed.rpc_timeout_s == 3.5
    assert current_settings() is changed
    monkeypatch.setenv("tessera_rpc_timeout_s", "4.5")  # the variables are read regardless of case
    monkeypatch.delenv("TESSERA_RPC_TIMEOUT_S")
    assert current_settings().rpc_timeout_s == 4.5
    monkeypatch.delenv("tessera_rpc_timeout_s")
    assert current_settings().rpc_timeout_s == first.rpc_timeout_s
    monkeypatch.setenv("NOT_TESSERA", "x")  # other variables do not matter
    assert current_settings() is current_settings()


@pytest.mark.usefixtures("clean_env")
def test_a_bad_value_raises_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_RPC_TIMEOUT_S", "-1")
    for _ in range(2):
        with pytest.raises(ValueError):
            current_settings()
