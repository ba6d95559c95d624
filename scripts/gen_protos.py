"""Regenerate the Python stubs of every .proto under protos/ into libs/api.

    python scripts/gen_protos.py          # write libs/api/src/tessera/api/...
    python scripts/gen_protos.py --check  # exit 1 when the committed stubs are stale

Proto packages are ``tessera.<service>.v1`` (buf style); their Python modules live
under ``tessera.api.<service>.v1`` so that they never collide with the service
packages ``tessera.<service>``. Import lines are rewritten accordingly.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "api" / "src" / "tessera" / "api"

_IMPORT = re.compile(r"^(from|import) tessera\.(?!api\.)", re.M)
_MODNAME = re.compile(r"'tessera\.(?!api\.)([a-z_]+\.v\d+\.\w+_pb2)'")
_PYI_REF = re.compile(r"\btessera\.(?!api\.)([a-z_]+\.v\d+\.)")


def _rewrite(path: Path) -> None:
    text = path.read_text()
    text = _IMPORT.sub(r"\1 tessera.api.", text)
    text = _MODNAME.sub(r"'tessera.api.\1'", text)
    if path.suffix == ".pyi":
        text = _PYI_REF.sub(r"tessera.api.\1", text)
    path.write_text(text)


def generate(dest: Path) -> None:
    protos = sorted(p.relative_to(PROTOS) for p in PROTOS.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *map(str, protos),
        ]
        subprocess.run(cmd, check=True)
        gen = Path(tmp) / "tessera"
        for f in gen.rglob("*.py*"):
            _rewrite(f)
        for d in [gen, *(p for p in gen.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        (gen / "__init__.py").write_text('"""Generated gRPC/protobuf stubs: run scripts/gen_protos.py."""\n')
        (gen / "py.typed").touch()
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(gen, dest)


def _same(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_same(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the committed stubs differ from fresh ones")
    args = ap.parse_args()
    if not args.check:
        generate(OUT)
        print(f"wrote {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "api")
        if not OUT.exists() or not _same(Path(tmp) / "api", OUT):
            print("generated stubs are stale: run `make protos` and commit the result", file=sys.stderr)
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
