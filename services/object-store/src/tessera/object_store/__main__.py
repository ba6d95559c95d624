"""``tessera-object-store`` / ``python -m tessera.object_store``: run one replica."""

from tessera.common.service import main_for
from tessera.object_store.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
