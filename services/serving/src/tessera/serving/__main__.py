"""``tessera-serving`` / ``python -m tessera.serving``: run one replica."""

from tessera.common.service import main_for
from tessera.serving.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
