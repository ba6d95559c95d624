"""``tessera-control-store`` / ``python -m tessera.control_store``: run one replica."""

from tessera.common.service import main_for
from tessera.control_store.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
