"""``tessera-task-scheduler`` / ``python -m tessera.task_scheduler``: run one replica."""

from tessera.common.service import main_for
from tessera.task_scheduler.server import serve


def main() -> None:
    main_for(serve)


if __name__ == "__main__":
    main()
