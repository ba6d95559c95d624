"""Hypothesis strategies for every request message of Tessera's gRPC APIs, built from the descriptors.

The services and their methods are read from the generated ``*_pb2`` modules under
``tessera.api`` (``DESCRIPTOR.services_by_name``), so a method added to a proto is fuzzed
without touching this file. Each request is either

* **generic**: every field drawn from its descriptor (ids of every wrong length, unicode
  edge cases in strings, bytes that are not UTF-8, int bounds, NaN and infinities, unknown
  enum values, empty and oversized repeated fields and bytes), or
* **nearly valid**: a real request (built from objects that exist on the stack: its
  :class:`World`) with one or two fields replaced by a generic value or a mutated real id.

Used by ``test_fuzz.py``; nothing here talks to a service.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

import tessera.api

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

#: Status codes a public method may answer with. UNIMPLEMENTED is documented by no method.
DOCUMENTED = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})

#: Calls that wait by design (for an object, a build, the next event): the fuzzer gives them a short
#: deadline of its own, so DEADLINE_EXCEEDED is an answer they may give.
BLOCKING = frozenset({
    "tessera.object_store.v1.ObjectStoreService/GetObjects",
    "tessera.compiler.v1.CompilerService/Compile",
})


# ---------------------------------------------------------------------- the API, from the descriptors


@dataclass(frozen=True)
class Method:
    service: ServiceDescriptor
    desc: MethodDescriptor
    process: str  # the launcher's process that serves it, e.g. "control-store"

    @property
    def full_name(self) -> str:
        return f"{self.service.full_name}/{self.desc.name}"

    @property
    def path(self) -> str:
        return f"/{self.full_name}"

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.desc.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.desc.output_type)

    @property
    def streaming(self) -> bool:
        return self.desc.client_streaming or self.desc.server_streaming

    @property
    def blocking(self) -> bool:
        return self.streaming or self.full_name in BLOCKING

    def __str__(self) -> str:
        return f"{self.service.name}.{self.desc.name}"


def api_modules() -> Iterator[Any]:
    """Every generated ``*_pb2`` module under ``tessera.api``."""
    for info in pkgutil.walk_packages(tessera.api.__path__, "tessera.api."):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(info.name)


def methods() -> list[Method]:
    """Every gRPC method of every Tessera service, in a stable order."""
    out = []
    for mod in api_modules():
        for svc in mod.DESCRIPTOR.services_by_name.values():
            # tessera.control_store.v1.ControlStoreService is served by the process "control-store"
            process = svc.full_name.split(".")[1].replace("_", "-")
            out.extend(Method(svc, m, process) for m in svc.methods)
    return sorted(out, key=lambda m: m.full_name)


# ---------------------------------------------------------------------- generic values

_ID_LENGTHS = (0, 1, 3, 4, 5, 8, 15, 16, 17, 19, 20, 21, 31, 32, 33, 64)
_NOT_UTF8 = (b"\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28", b"\xed\xa0\x80", b"\xc0\xaf",
             b"\x00", b"\x00" * 16, b"\xff" * 20)
#: Sizes of the oversized bytes (a few MB; the control store's KV limit is 4 MiB).
_BIG = (64 * 1024 + 1, 1024 * 1024, 4 * 1024 * 1024 + 1)
_STRINGS = ("", " ", "\x00", "a\x00b", "\n", "a\n", "default", "..", "../../etc/passwd", "*", ">", "a.b", "a b",
            "tessera.events.>", "$SYS", "%s%n", "{}", "{\"a\": 1}", "[]", "null", "-1", "0", "NaN", "1e309",
            "\u202eabc", "\ufeff", "名前", "😀" * 3, "\U0010ffff", "e\u0301", "x" * 65, "y" * 129, "z" * 5000,
            "0" * 32, "f" * 32, "F" * 32, "0" * 31, "g" * 32, "c", "module:function", ":", "a:b:c",
            "tessera.gpu_scheduler.examples:train", "os:system", "/dev/null:main", "<f8", "<f4", "float32", "int64",
            "object", "|O", ">f8", "nodes", "kv", "tasks")
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, lo + 1, -1 if lo < 0 else lo, 0, 1, 2, 3, 255, 256, 65_535, 10_000, 10_001, hi - 1, hi})
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


def bytes_values(small: bool = False) -> st.SearchStrategy[bytes]:
    out = [st.binary(max_size=48), st.sampled_from(_ID_LENGTHS).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
           st.sampled_from(_NOT_UTF8)]
    if not small:
        out.append(st.sampled_from(_BIG).map(lambda n: b"\x5a" * n))
    return st.one_of(*out)


def string_values(small: bool = False) -> st.SearchStrategy[str]:
    if small:
        return st.one_of(_TEXT, st.sampled_from(_STRINGS))
    return st.one_of(_TEXT, st.sampled_from(_STRINGS), st.sampled_from((70_000, 1024 * 1024 + 1)).map(lambda n: "s" * n))


def float_values(width: int) -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf")]
    return st.one_of(st.sampled_from(edges), st.floats(allow_nan=True, allow_infinity=True, width=width))


def scalar_values(fd: FieldDescriptor, small: bool = False) -> st.SearchStrategy[Any]:
    """A value of a scalar field; ``small``: no oversized bytes or strings (inside repeated fields)."""
    t = fd.type
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes_values(small)
    if t == FieldDescriptor.TYPE_STRING:
        return string_values(small)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float_values(64 if t == FieldDescriptor.TYPE_DOUBLE else 32)
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(*INT32))  # proto3 enums are open: unknown numbers parse
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return _ints(*INT32)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return _ints(*INT64)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _ints(*UINT32)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return _ints(*UINT64)
    raise TypeError(f"no strategy for field {fd.full_name} of type {t}")


# ---------------------------------------------------------------------- real values (a World)


@dataclass
class World:
    """Objects that exist on the stack, for nearly valid requests.

    ``pools`` maps a field name (singular: ``object_id`` serves ``object_ids`` too) to real values
    of that field, bytes or str; ``seeds`` maps a method's full name to valid requests of it
    (for a client-streaming method: valid lists of messages).
    """

    pools: dict[str, list[Any]] = field(default_factory=dict)
    seeds: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, name: str, *values: Any) -> None:
        self.pools.setdefault(name, []).extend(v for v in values if v not in self.pools.get(name, []))

    def real(self, fd: FieldDescriptor) -> list[Any]:
        want = bytes if fd.type == FieldDescriptor.TYPE_BYTES else str
        names = [fd.name, fd.name[:-1] if fd.name.endswith("s") else fd.name]
        return [v for n in names for v in self.pools.get(n, []) if isinstance(v, want)]


def _mutations(value: Any) -> st.SearchStrategy[Any]:
    """A real id or name, slightly wrong: cut, grown, one byte flipped, case changed."""
    if isinstance(value, bytes):
        cands = [value[:-1], value + b"\x00", value[1:], b"\x00" + value[:-1]]
        if value:
            cands.append(bytes([value[0] ^ 0x01]) + value[1:])
        return st.sampled_from(cands)
    cands = [value[:-1], value + "x", value.upper(), " " + value, value + "\n", value[1:], value + "\x00"]
    return st.sampled_from(cands)


def field_values(fd: FieldDescriptor, world: World | None, depth: int, small: bool = False) -> st.SearchStrategy[Any]:
    """A value of one (non-repeated) field."""
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return message_values(fd.message_type, world, depth + 1, small)
    generic = scalar_values(fd, small)
    real = world.real(fd) if world is not None else []
    if not real:
        return generic
    reals = st.sampled_from(real)
    return st.one_of(generic, reals, reals.flatmap(_mutations))


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def repeated_values(fd: FieldDescriptor, world: World | None, depth: int) -> st.SearchStrategy[list[Any]]:
    """A repeated field: a few elements, or (near the top) one small element thousands of times over."""
    one = field_values(fd, world, depth, small=True)
    if depth > 0:
        return st.lists(one, max_size=2)
    # oversized: the batch limits are 4096 to 10 000 items
    tiny = field_values(fd, None, MAX_DEPTH, small=True)  # messages: empty at this depth
    many = st.tuples(tiny, st.sampled_from((4097, 10_001))).map(lambda t: [t[0]] * t[1])
    big = field_values(fd, world, depth)  # one element that may be oversized itself
    return st.one_of(st.lists(one, max_size=4), many, big.map(lambda v: [v]))


def map_values(fd: FieldDescriptor, world: World | None, depth: int) -> st.SearchStrategy[dict[Any, Any]]:
    entry = fd.message_type
    k = scalar_values(entry.fields_by_name["key"], small=True)
    vfd = entry.fields_by_name["value"]
    v = (message_values(vfd.message_type, world, depth + 1, small=True) if vfd.type == FieldDescriptor.TYPE_MESSAGE
         else scalar_values(vfd, small=True))
    return st.dictionaries(k, v, max_size=4)


MAX_DEPTH = 3


def message_values(desc: Descriptor, world: World | None = None, depth: int = 0,
                   small: bool = False) -> st.SearchStrategy[Message]:
    """A message of type ``desc`` whose fields are generic values (each set or not)."""
    cls = message_factory.GetMessageClass(desc)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if _is_map(fd):
            optional[fd.name] = map_values(fd, world, depth)
        elif fd.is_repeated:
            optional[fd.name] = (st.lists(field_values(fd, world, depth, small=True), max_size=2) if small
                                 else repeated_values(fd, world, depth))
        else:
            optional[fd.name] = field_values(fd, world, depth, small)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        assign(msg, msg.DESCRIPTOR.fields_by_name[name], value)
    return msg


def assign(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Set field ``fd`` of ``msg`` to ``value`` (a list for repeated fields, a dict for maps)."""
    target = getattr(msg, fd.name)
    if _is_map(fd):
        msg.ClearField(fd.name)  # type: ignore[arg-type]
        vfd = fd.message_type.fields_by_name["value"]
        for k, v in value.items():
            if vfd.type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif fd.is_repeated:
        msg.ClearField(fd.name)  # type: ignore[arg-type]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


# ---------------------------------------------------------------------- nearly valid


def _paths(desc: Descriptor, prefix: tuple[FieldDescriptor, ...] = (), depth: int = 0) -> list[tuple[FieldDescriptor, ...]]:
    """Every field reachable through singular message fields (the places a mutation can land)."""
    out = []
    for fd in desc.fields:
        out.append((*prefix, fd))
        if (fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated
                and depth < MAX_DEPTH - 1):
            out.extend(_paths(fd.message_type, (*prefix, fd), depth + 1))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Message, world: World) -> Message:
    """``base`` (a valid request) with one to three fields replaced, or a repeated field's element changed."""
    msg = type(base)()
    msg.CopyFrom(base)
    paths = _paths(msg.DESCRIPTOR)
    if not paths:
        return msg
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        holder = msg
        for fd in path[:-1]:
            holder = getattr(holder, fd.name)
        fd = path[-1]
        depth = len(path) - 1
        if _is_map(fd):
            assign(holder, fd, draw(map_values(fd, world, depth)))
        elif fd.is_repeated:
            items = list(getattr(holder, fd.name))
            if items and fd.type == FieldDescriptor.TYPE_MESSAGE and draw(st.booleans()):
                i = draw(st.integers(0, len(items) - 1))
                items[i] = draw(mutated(items[i], world))
                assign(holder, fd, items)
            elif items and draw(st.booleans()):
                i = draw(st.integers(0, len(items) - 1))
                items[i] = draw(field_values(fd, world, depth))
                assign(holder, fd, items)
            else:
                assign(holder, fd, draw(repeated_values(fd, world, depth)))
        else:
            assign(holder, fd, draw(field_values(fd, world, depth)))
    return msg


def requests(method: Method, world: World | None) -> st.SearchStrategy[Any]:
    """Requests of ``method``: generic ones and, given a world with seeds for it, nearly valid ones.

    For a client-streaming method, a short list of messages (a stream) is drawn instead."""
    generic = message_values(method.desc.input_type, world)
    seeds = world.seeds.get(method.full_name, []) if world is not None else []
    if method.desc.client_streaming:
        frames: list[st.SearchStrategy[list[Any]]] = [st.lists(generic, max_size=3)]
        for stream in seeds:
            frames.append(st.tuples(*(st.one_of(st.just(m), mutated(m, world)) for m in stream)).map(list))  # type: ignore[arg-type]
            frames.append(st.tuples(st.just(stream[0]), st.lists(generic, max_size=2)).map(lambda t: [t[0], *t[1]]))
        return st.one_of(*frames)
    if not seeds:
        return generic
    assert world is not None
    return st.one_of(generic, st.sampled_from(seeds).flatmap(lambda b: st.one_of(st.just(b), mutated(b, world))))


def needs_seed(method: Method) -> bool:
    """A request with fields needs valid examples to reach past the first check; an empty one does not."""
    return bool(method.desc.input_type.fields)


def missing_seeds(world_seed_names: Iterable[str], ms: Sequence[Method] | None = None) -> list[str]:
    names = set(world_seed_names)
    return [m.full_name for m in (ms if ms is not None else methods()) if needs_seed(m) and m.full_name not in names]


# ---------------------------------------------------------------------- calling a method generically


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    responses: list[Any] = field(default_factory=list)


def invoke(channel: grpc.Channel, method: Method, request: Any, *, timeout: float,
           max_responses: int = 3, linger_s: float = 0.3, raw: bool = False) -> Outcome:
    """Call ``method`` with ``request`` (a list of messages when client-streaming), under ``timeout``;
    with ``raw``, the request is bytes sent as they are.

    A server stream is read for at most ``max_responses`` messages or ``linger_s`` after the last
    request was sent (streams such as Watch and OpenSession never end on their own); then the
    client cancels it, which is not an error of the service.
    """
    ser = method.request_class.SerializeToString if not raw else None
    de = method.response_class.FromString
    try:
        if not method.streaming:
            call = channel.unary_unary(method.path, request_serializer=ser, response_deserializer=de)
            return Outcome(grpc.StatusCode.OK, responses=[call(request, timeout=timeout)])
        if method.desc.client_streaming:
            stream = channel.stream_stream(method.path, request_serializer=ser, response_deserializer=de)
            it = stream(iter(request), timeout=timeout)
        else:
            us = channel.unary_stream(method.path, request_serializer=ser, response_deserializer=de)
            it = us(request, timeout=timeout)
        return _read_stream(it, max_responses, linger_s)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")  # type: ignore[attr-defined]


def _read_stream(it: Any, max_responses: int, linger_s: float) -> Outcome:
    import threading

    got: list[Any] = []
    timer = threading.Timer(linger_s, it.cancel)
    timer.start()
    try:
        for resp in it:
            got.append(resp)
            if len(got) >= max_responses:
                break
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            return Outcome(e.code(), e.details() or "", got)  # type: ignore[attr-defined]
    finally:
        timer.cancel()
        it.cancel()
    return Outcome(grpc.StatusCode.OK, responses=got)


#: Codes a method documents beyond DOCUMENTED: WriteObject's chunk that fails its CRC check is DATA_LOSS.
EXTRA: dict[str, frozenset[grpc.StatusCode]] = {"WriteObject": frozenset({grpc.StatusCode.DATA_LOSS})}


def allowed_codes(method: Method) -> frozenset[grpc.StatusCode]:
    codes = DOCUMENTED | EXTRA.get(method.desc.name, frozenset())
    return codes | {grpc.StatusCode.DEADLINE_EXCEEDED} if method.blocking else codes


Check = Callable[[Method, Any, Outcome], None]
