"""``import tessera`` loads the SDK on first use: a service process pays only for what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.split())


def test_a_service_module_does_not_load_the_sdk() -> None:
    loaded = _modules_after("import tessera.common.service")
    assert "tessera.common.service" in loaded
    assert not {"tessera._api", "tessera.client.objects", "tessera.client", "numpy"} & loaded


def test_sdk_names_load_on_first_use_and_are_the_real_objects() -> None:
    loaded = _modules_after("import tessera\nassert 'tessera._api' not in __import__('sys').modules\n"
                            "from tessera import remote, init\nimport tessera._api, tessera._remote\n"
                            "assert init is tessera._api.init and remote is tessera._remote.remote\n"
                            "assert tessera.exceptions.TaskError")
    assert {"tessera._api", "tessera._remote", "tessera.exceptions"} <= loaded


def test_an_unknown_name_is_an_attribute_error() -> None:
    import tessera

    with pytest.raises(AttributeError, match="no_such_name"):
        tessera.no_such_name  # noqa: B018
    assert "init" in dir(tessera)
