"""Print the third-party requirements of Tessera distributions, read from their pyproject.toml.

    python3 deploy/image/requirements.py libs/api libs/common services/gateway

The image build (Dockerfile) installs third-party dependencies in layers of their own,
before any of Tessera's code is copied in, so that a code change does not reinstall them:
it needs the dependency lists from the pyproject files alone. Tessera's own distributions
(``tessera`` and ``tessera-*``) are left out: the build makes their wheels from the source
tree. Optional dependencies (extras) are not included. Standard library only: it runs on
the bare Python of the base image.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# The distribution name at the start of a PEP 508 requirement.
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalisation: ``Tessera_API`` and ``tessera-api`` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party(project_dirs: list[Path]) -> list[str]:
    """The union of the projects' dependencies, without Tessera's own, in a stable order."""
    seen: dict[str, None] = {}
    for d in project_dirs:
        project = tomllib.loads((d / "pyproject.toml").read_text())["project"]
        for spec in project.get("dependencies", []):
            m = _NAME.match(spec)
            if m is None:
                raise SystemExit(f"{d}/pyproject.toml: cannot read the requirement {spec!r}")
            name = canonical(m.group(1))
            if name == "tessera" or name.startswith("tessera-"):
                continue
            seen.setdefault(" ".join(spec.split()), None)
    return sorted(seen, key=str.lower)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    for line in third_party([Path(a) for a in argv]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
