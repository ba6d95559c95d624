"""``tessera-serving`` / ``python -m tessera.serving``: run one replica."""

from tessera.common import heap
from tessera.common.service import main_for
from tessera.serving.server import serve


def main() -> None:
    # parameters live in the node's shared memory: the replica keeps no copy of an upload's large buffers
    heap.map_large_blocks()
    main_for(serve)


if __name__ == "__main__":
    main()
