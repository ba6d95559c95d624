"""A stack brought up with `tessera up --auth`: credentials everywhere, and none of them leaks.

The SDK and the CLI find the token through the run directory; a raw call without it is
refused by every public method of every service; NATS and Redis refuse a client without
their passwords; the secrets are in no log and on no command line. The same stack runs
with a small serving queue, to show a full queue answering RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from stacks import Cluster, running

from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.control_store.v1 import control_store_pb2_grpc as cpb_grpc
from tessera.api.serving.v1 import serving_pb2 as spb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as tpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2_grpc as tpb_grpc
from tessera.common import auth, rpc
from tessera.common.config import SERVICES

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

#: serving's queue holds this many records at most on this stack
QUEUED_RECORDS = 64


class Secured(Cluster):
    """A stack brought up with ``tessera up --auth``: its secrets are in the run directory."""

    def secret(self, name: str) -> str:
        return (self.run_dir / auth.SECRETS_DIR / name).read_text().strip()

    def secrets(self) -> list[str]:
        return [self.secret(n) for n in (auth.TOKEN_FILE, auth.NATS_PASSWORD_FILE, auth.REDIS_PASSWORD_FILE)]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with running(tmp_path_factory, "secured", "--auth", cls=Secured,
                 TESSERA_SERVING_MAX_QUEUED_RECORDS=str(QUEUED_RECORDS)) as s:
        yield s


SDK_SCRIPT = """
import numpy as np
import tessera
from tessera import _api

tessera.init()

@tessera.remote
def square(x):
    return x * x

assert tessera.get([square.remote(i) for i in range(8)]) == [i * i for i in range(8)]
ref = tessera.put(np.arange(1_000_000))
assert int(tessera.get(ref).sum()) == 499999500000
print("transport", _api.state().session.transport)
print("object transport", _api.object_client().transport)
tessera.shutdown()
print("ok")
"""


def test_the_sdk_finds_the_token_through_the_run_dir(secured: Secured) -> None:
    out = subprocess.run([sys.executable, "-c", SDK_SCRIPT], env=secured.env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    # the driver moved to the agent's Unix socket: its hello carried the token
    assert "transport socket" in out.stdout and out.stdout.strip().endswith("ok"), out.stdout
    # and its object store session to the store's socket, the token in its first frame
    assert "object transport socket" in out.stdout, out.stdout


def test_a_driver_with_a_wrong_or_no_token_gets_one_line_that_says_what_to_set(secured: Secured,
                                                                               tmp_path: Path) -> None:
    address = secured.info()["control_store_address"]
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    script = f"import tessera; tessera.init(address={address!r})"
    for extra in ({"TESSERA_AUTH_TOKEN_FILE": str(wrong)}, {}):
        env = {**{k: v for k, v in secured.env.items() if k != "TESSERA_RUN_DIR"}, **extra,
               "TESSERA_RUN_DIR": str(tmp_path / "elsewhere")}  # no run dir to find the token in
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("ConnectionRefusedError: the cluster at " + address), last
        assert "set TESSERA_AUTH_TOKEN_FILE" in last, last


def test_the_object_store_socket_is_private_and_refuses_a_hello_without_the_token(secured: Secured) -> None:
    from tessera.api.object_store.v1 import object_store_pb2 as opb
    from tessera.api.object_store.v1 import object_store_pb2_grpc as opb_grpc
    from tessera.client._local import LocalConnection, LocalSessionLost
    from tessera.common import localwire as lw

    token = secured.secret(auth.TOKEN_FILE)
    with rpc.stream_channel(secured.address("object-store"), token=token) as ch:
        call = opb_grpc.ObjectStoreServiceStub(ch).OpenSession(opb.OpenSessionRequest(client_name="probe"))
        path = next(call).local_socket
        call.cancel()
    assert path and not path.startswith("@")
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    for wrong in ("", "wrong"):
        with pytest.raises((lw.UnauthenticatedError, LocalSessionLost)):
            LocalConnection(path, token=wrong, name="intruder", timeout=5.0)
    LocalConnection(path, token=token, name="member", timeout=5.0).close()


def test_cli_status_works_and_prints_no_secret(secured: Secured) -> None:
    table = secured.cli("status", timeout=60)
    js = secured.cli("status", "--json", timeout=60)
    assert table.returncode == 0 and js.returncode == 0, table.stdout + table.stderr + js.stderr
    status = json.loads(js.stdout)
    assert status["healthy"] and status["auth"] is True
    rows = {p["name"]: p for p in status["processes"]}
    assert "objects" in rows["object-store"]  # the detail columns come from authenticated calls
    assert "workers" in rows["task-scheduler"]
    for secret in secured.secrets():
        assert secret not in table.stdout + table.stderr + js.stdout + js.stderr


def test_secret_files_are_private(secured: Secured) -> None:
    d = secured.run_dir / auth.SECRETS_DIR
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted([auth.TOKEN_FILE, auth.NATS_PASSWORD_FILE, auth.REDIS_PASSWORD_FILE, "nats.conf",
                            "redis.conf"])
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert len(set(secured.secrets())) == 3 and all(len(s) >= 32 for s in secured.secrets())


def _methods(service: str) -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method the service serves."""
    mod = importlib.import_module(f"tessera.api.{service.replace('-', '_')}.v1.{service.replace('-', '_')}_pb2")
    out = []
    for svc in mod.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            out.append((f"/{svc.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return out


def test_every_public_method_refuses_a_call_without_the_token(secured: Secured) -> None:
    checked = 0
    for name in SERVICES:
        if name == "dashboard":  # no gRPC API of its own (health alone); its pages are HTTP
            continue
        address = secured.address(name)
        assert rpc.health_status(address) == "SERVING"  # health stays open
        with grpc.insecure_channel(address) as ch:
            for path, client_streaming, server_streaming in _methods(name):
                try:
                    if client_streaming and server_streaming:
                        list(ch.stream_stream(path)(iter([b""]), timeout=5))
                    elif client_streaming:
                        ch.stream_unary(path)(iter([b""]), timeout=5)
                    elif server_streaming:
                        list(ch.unary_stream(path)(b"", timeout=5))
                    else:
                        ch.unary_unary(path)(b"", timeout=5)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (path, e.code(), e.details())  # type: ignore[attr-defined]
                    assert "authorization" in (e.details() or ""), (path, e.details())  # type: ignore[attr-defined]
                else:
                    raise AssertionError(f"{name} {path} answered a call without the token")
                checked += 1
        with grpc.insecure_channel(address) as ch:  # a wrong token is refused too
            with pytest.raises(grpc.RpcError) as ei:
                path = _methods(name)[0][0]
                ch.unary_unary(path)(b"", timeout=5, metadata=(("authorization", "Bearer not-the-token"),))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert checked >= 6 * 3


def test_the_agent_socket_refuses_a_hello_without_the_token(secured: Secured) -> None:
    from tessera._framing import FrameError, SocketConnection

    with rpc.stream_channel(secured.address("task-scheduler"), token=secured.secret(auth.TOKEN_FILE)) as ch:
        call = tpb_grpc.TaskSchedulerServiceStub(ch).Session(
            iter([tpb.ClientFrame(hello=tpb.Hello(job_id=b"\x00\x00\x00\x01", name="probe"))]))
        socket_path = next(call).welcome.socket
        call.cancel()
    assert socket_path
    for token in ("", "wrong"):
        conn = SocketConnection(socket_path, timeout=5.0)
        try:
            conn.send(tpb.ClientFrame(hello=tpb.Hello(job_id=b"\x00\x00\x00\x02", name="intruder", token=token)))
            with pytest.raises(FrameError):
                conn.recv()
        finally:
            conn.close()
    conn = SocketConnection(socket_path, timeout=5.0)  # the right token: welcomed
    try:
        conn.send(tpb.ClientFrame(hello=tpb.Hello(job_id=b"\x00\x00\x00\x03", name="member",
                                                  token=secured.secret(auth.TOKEN_FILE))))
        assert conn.recv().welcome.session
    finally:
        conn.close()


def test_the_object_data_socket_refuses_a_request_without_the_token(secured: Secured) -> None:
    import socket

    from tessera.object_store import transfer as tp

    token = secured.secret(auth.TOKEN_FILE)
    raw = grpc.insecure_channel(secured.info()["control_store_address"])
    try:
        stub = cpb_grpc.ControlStoreServiceStub(rpc.authorized(raw, token=token))
        nodes = stub.ListNodes(cpb.ListNodesRequest(), timeout=5).nodes
    finally:
        raw.close()
    host, _, port = nodes[0].labels["object_store_transfer_address"].rpartition(":")

    def ask(given: str) -> tuple[str, str]:
        req = tp.Request(b"\x01" * 20, 0, 1024, b"", given, 1 << 20)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(tp.encode_request(req))
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        _, _, status, n, *_ = tp.RESPONSE.unpack(reply[:tp.RESPONSE.size])
        return tp.STATUSES[status], reply[tp.RESPONSE.size:tp.RESPONSE.size + n].decode()

    assert ask("") == ("UNAUTHENTICATED", "invalid cluster token")
    assert ask("wrong") == ("UNAUTHENTICATED", "invalid cluster token")
    assert ask(token)[0] == "NOT_FOUND"  # past the check: this store has no such object


def test_nats_refuses_a_client_without_credentials(secured: Secured) -> None:
    import nats
    import nats.errors

    url = secured.info()["nats_url"]

    async def scenario() -> None:
        with pytest.raises((nats.errors.Error, OSError, TimeoutError)) as ei:  # noqa: PT012
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0)
            await nc.close()
        assert "authorization" in str(ei.value).lower() or isinstance(ei.value, nats.errors.Error), ei.value
        with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
            nc = await nats.connect(url, user=auth.NATS_USER, password="wrong", allow_reconnect=False,
                                    connect_timeout=3, max_reconnect_attempts=0)
            await nc.close()
        nc = await nats.connect(url, user=auth.NATS_USER, password=secured.secret(auth.NATS_PASSWORD_FILE),
                                allow_reconnect=False, connect_timeout=3)
        await nc.flush(timeout=3)
        await nc.close()

    asyncio.run(scenario())


def test_redis_refuses_a_client_without_the_password(secured: Secured) -> None:
    for url in secured.info()["redis_urls"]:
        with redis.Redis.from_url(url, socket_timeout=5) as r:
            with pytest.raises(redis.exceptions.AuthenticationError):
                r.ping()
        with redis.Redis.from_url(url, password="wrong", socket_timeout=5) as r:
            with pytest.raises(redis.exceptions.AuthenticationError):
                r.ping()
        with redis.Redis.from_url(url, password=secured.secret(auth.REDIS_PASSWORD_FILE), socket_timeout=5) as r:
            assert r.ping()
            assert r.dbsize() > 0  # the control store wrote here with the same password


def test_no_secret_in_logs_command_lines_or_environments(secured: Secured) -> None:
    secrets_ = secured.secrets()
    logs = [f for f in (secured.run_dir / "logs").rglob("*") if f.is_file()]  # workers' logs too
    assert len(logs) >= len(SERVICES) + 2
    for f in logs:
        text = f.read_bytes()
        for s in secrets_:
            assert s.encode() not in text, f"a secret is in {f}"
    ps = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, timeout=30).stdout
    info = secured.info()
    pids = {str(p["pid"]) for p in info["procs"] if p["pid"]} | {str(info["supervisor_pid"])}
    lines = [line for line in ps.splitlines() if line.split(None, 1)[0] in pids]
    assert len(lines) == len(pids), (pids, lines)
    for line in lines:
        for s in secrets_:
            assert s not in line, "a secret is on a command line"
    for pid in pids:  # services are given the secrets' files, never the secrets
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        for s in secrets_:
            assert s.encode() not in environ, f"a secret is in the environment of pid {pid}"


def test_a_full_serving_queue_answers_resource_exhausted(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tessera.serving import Client

    monkeypatch.setenv("TESSERA_AUTH_TOKEN_FILE", str(secured.run_dir / auth.SECRETS_DIR / auth.TOKEN_FILE))
    docs = ["good food", "bad food", "great staff", "rude staff"] * 5
    pipe = make_pipeline(CountVectorizer(), LogisticRegression()).fit(docs, ["pos", "neg"] * 10)
    address = secured.address("serving")
    with Client(address) as c:
        c.register("bounded", pipe, latency_budget_ms=300.0)  # requests wait up to 300 ms to be batched
        assert [p.label for p in c.predict("bounded", ["good food"])] == ["pos"]
    records = [spb.Record(values=[spb.Value(text="good food")]) for _ in range(40)]  # two never fit in 64
    with rpc.channel(address, default_timeout=30) as ch:
        predict = ch.unary_unary("/tessera.serving.v1.ServingService/Predict",
                                 request_serializer=spb.PredictRequest.SerializeToString,
                                 response_deserializer=spb.PredictResponse.FromString)

        def one(_: int) -> str:
            try:
                resp = predict(spb.PredictRequest(pipeline="bounded", records=records))
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
            assert len(resp.predictions) == 40
            return "OK"

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(one, range(32)))
        refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
        assert refused and "OK" in outcomes, outcomes
        assert all(o == "OK" or o.startswith("RESOURCE_EXHAUSTED") for o in outcomes), outcomes
        assert "serving queue is full" in refused[0]
        with pytest.raises(grpc.RpcError) as ei:  # more than the queue can ever hold
            predict(spb.PredictRequest(pipeline="bounded", records=records * 2))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert len(predict(spb.PredictRequest(pipeline="bounded", records=records)).predictions) == 40  # still serving


def _http(url: str, *, body: dict[str, object] | None = None, token: str | None = None) -> tuple[int, dict[str, str],
                                                                                                 bytes]:
    """(status, headers with lowercased names, body) of one HTTP request to serving's front end, error statuses
    included."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def test_serving_http_requires_the_token(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from tessera.serving import Client

    token = secured.secret(auth.TOKEN_FILE)
    monkeypatch.setenv("TESSERA_AUTH_TOKEN_FILE", str(secured.run_dir / auth.SECRETS_DIR / auth.TOKEN_FILE))
    docs = ["good food", "bad food", "great staff", "rude staff"] * 5
    pipe = make_pipeline(CountVectorizer(), LogisticRegression()).fit(docs, ["pos", "neg"] * 10)
    with Client(secured.address("serving")) as c:
        c.register("guarded", pipe, replace=True)
        http = c.stats().http_address
    predict = f"http://{http}/v1/pipelines/guarded:predict"
    listing = f"http://{http}/v1/pipelines"
    infer = f"http://{http}/v2/models/guarded/infer"
    records = {"records": ["good food", "rude staff"]}
    tensors = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good food", "rude staff"]}]}
    guarded = [(predict, records), (listing, None), (infer, tensors), (f"http://{http}/v2/models/guarded", None),
               (f"http://{http}/v2/models/guarded/ready", None), (f"http://{http}/v2", None),
               (f"http://{http}/openapi.json", None)]
    for url, body in guarded:
        for given in (None, "not-the-token", token + "x"):
            status, headers, data = _http(url, body=body, token=given)
            assert status == 401, (url, given is None, status, data)
            assert headers.get("www-authenticate", "").startswith("Bearer"), headers
            error = json.loads(data)["error"]  # KServe's form under /v2: the message alone
            message = error if "/v2" in url else error["message"]
            assert "/v2" in url or error["code"] == "UNAUTHENTICATED", data
            assert "authorization" in message or "token" in message, data
            assert token not in data.decode()
    for url, body in guarded:
        status, _, data = _http(url, body=body, token=token)
        assert status == 200, (url, data)
    status, _, data = _http(infer, body=tensors, token=token)
    assert [o["data"] for o in json.loads(data)["outputs"] if o["name"] == "label"] == [["pos", "neg"]], data
    status, _, data = _http(predict, body=records, token=token)
    assert status == 200, data
    assert [p["label"] for p in json.loads(data)["predictions"]] == ["pos", "neg"]
    status, _, data = _http(listing, token=token)
    assert status == 200 and "guarded" in json.loads(data)["pipelines"], data
    status, _, data = _http(f"http://{http}/healthz")  # the probes stay open
    assert (status, data) == (200, b"ok")
    for probe, answer in (("live", {"live": True}), ("ready", {"ready": True})):
        status, _, data = _http(f"http://{http}/v2/health/{probe}")
        assert (status, json.loads(data)) == (200, answer)
