"""Working directories that travel with a job: packed reproducibly, bounded, unpacked safely."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from tessera.common import packages
from tessera.common.errors import InvalidArgumentError


def make(folder: Path) -> None:
    (folder / "pkg").mkdir(parents=True)
    (folder / "train.py").write_text("import pkg.helper\n")
    (folder / "pkg" / "helper.py").write_text("X = 1\n")
    (folder / "pkg" / "__pycache__").mkdir()
    (folder / "pkg" / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"\0" * 10)
    (folder / "data.bin").write_bytes(b"\1" * 100)


def test_the_same_sources_give_the_same_package(tmp_path: Path) -> None:
    make(tmp_path / "a")
    make(tmp_path / "b")
    uri_a, blob_a = packages.pack(tmp_path / "a")
    uri_b, blob_b = packages.pack(tmp_path / "b")
    assert uri_a == uri_b and blob_a == blob_b and uri_a.startswith("pkg:")
    names = zipfile.ZipFile(io.BytesIO(blob_a)).namelist()
    assert sorted(names) == ["pkg/helper.py", "train.py"]  # no bytecode, no data files


def test_unpack_checks_the_content_and_unpacks_once(tmp_path: Path) -> None:
    make(tmp_path / "src")
    uri, blob = packages.pack(tmp_path / "src")
    dest = packages.unpack(uri, blob, tmp_path / "out")
    assert (dest / "pkg" / "helper.py").read_text() == "X = 1\n"
    assert packages.unpack(uri, blob, tmp_path / "out") == dest  # already there: kept
    with pytest.raises(InvalidArgumentError, match="does not match its content"):
        packages.unpack(uri, blob + b"x", tmp_path / "other")


def test_a_package_with_an_unsafe_path_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../escape.py", "boom")
    blob = buf.getvalue()
    import hashlib

    uri = "pkg:" + hashlib.sha256(blob).hexdigest()
    with pytest.raises(InvalidArgumentError, match="unsafe path"):
        packages.unpack(uri, blob, tmp_path / "out")
    assert not (tmp_path / "escape.py").exists()


def test_malformed_uris_and_oversized_folders_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("", "pkg:", "pkg:xyz", "file:/etc/passwd", "pkg:" + "A" * 64):
        with pytest.raises(InvalidArgumentError, match="working_dir must be"):
            packages.key_of(bad)
    (tmp_path / "big.py").write_text("x" * 2000)
    monkeypatch.setattr(packages, "MAX_BYTES", 1000)
    with pytest.raises(InvalidArgumentError, match="too big to travel"):
        packages.pack(tmp_path)


def test_a_module_folder_keeps_its_name_and_a_file_goes_alone(tmp_path: Path) -> None:
    make(tmp_path / "a")
    _, blob = packages.pack(tmp_path / "a" / "pkg", prefix="pkg/")
    assert zipfile.ZipFile(io.BytesIO(blob)).namelist() == ["pkg/helper.py"]
    uri, blob = packages.pack(tmp_path / "a" / "train.py")
    assert zipfile.ZipFile(io.BytesIO(blob)).namelist() == ["train.py"]
    dest = packages.unpack(uri, blob, tmp_path / "out")
    assert (dest / "train.py").read_text() == "import pkg.helper\n"


def test_a_zip_travels_as_it_is_and_anything_else_is_refused(tmp_path: Path) -> None:
    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("m/__init__.py", "X = 1\n")
    uri, blob = packages.of_zip(z)
    assert blob == z.read_bytes() and packages.key_of(uri)
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgumentError, match="is not a zip file"):
        packages.of_zip(tmp_path / "fake.zip")
