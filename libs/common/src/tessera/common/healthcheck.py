"""``tessera-healthcheck [ADDRESS]``: exit 0 when the gRPC server at ADDRESS reports SERVING.

The container healthcheck of every service: it speaks ``grpc.health.v1``, so a
replica is healthy only once its NATS/Redis connections are up. ADDRESS defaults
to ``127.0.0.1:$TESSERA_GRPC_PORT``.
"""

from __future__ import annotations

import argparse
import os
import sys

from tessera.common.rpc import health_status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tessera-healthcheck", description=__doc__)
    ap.add_argument("address", nargs="?", default=f"127.0.0.1:{os.environ.get('TESSERA_GRPC_PORT', '50051')}")
    ap.add_argument("--service", default="", help="service name to check (default: the whole server)")
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args(argv)
    status = health_status(args.address, service=args.service, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
