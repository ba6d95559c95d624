"""``tessera-gateway`` / ``python -m tessera.gateway``: run the gateway."""

from tessera.common.service import main_for
from tessera.gateway.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
