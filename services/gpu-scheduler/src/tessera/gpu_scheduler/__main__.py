"""``tessera-gpu-scheduler`` / ``python -m tessera.gpu_scheduler``: run one replica."""

from tessera.common.service import main_for
from tessera.gpu_scheduler.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
