"""``tessera-dashboard`` / ``python -m tessera.dashboard``: run the dashboard."""

from tessera.common.service import main_for
from tessera.dashboard.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
