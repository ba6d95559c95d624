"""``tessera-compiler`` / ``python -m tessera.compiler``: run one replica."""

from tessera.common.service import main_for
from tessera.compiler.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
