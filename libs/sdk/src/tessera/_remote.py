"""``@tessera.remote``: remote functions, actor classes and actor handles (Ray's names)."""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import cloudpickle

from tessera import _api
from tessera._generators import ObjectRefGenerator
from tessera.api.control_store.v1 import control_store_pb2 as cpb
from tessera.api.task_scheduler.v1 import task_scheduler_pb2 as pb
from tessera.client.objects import ObjectRef
from tessera.common import ids
from tessera.common.errors import InvalidArgumentError
from tessera.common.serialization import serialize

T = TypeVar("T")

_TASK_OPTIONS = {"num_cpus", "num_gpus", "resources", "num_returns", "max_retries", "name", "scheduling_strategy",
                 "retry_exceptions", "runtime_env"}
_ACTOR_OPTIONS = {"num_cpus", "num_gpus", "resources", "max_restarts", "name", "namespace", "lifetime",
                  "max_concurrency", "concurrency_groups", "max_task_retries", "scheduling_strategy", "runtime_env"}
_METHOD_OPTIONS = {"num_returns", "name", "concurrency_group", "max_task_retries", "retry_exceptions"}
#: Most calls of one actor (or one concurrency group) running at once.
MAX_CONCURRENCY_LIMIT = 100_000


def _check_options(opts: dict[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise TypeError(f"unknown option(s) for {what}: {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    for k in ("num_cpus", "num_gpus"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, int | float) or v < 0):
            raise ValueError(f"{k} must be a number >= 0, got {v!r}")
    nr = opts.get("num_returns")
    if nr is not None and nr not in GENERATOR_KINDS and (isinstance(nr, bool) or not isinstance(nr, int)
                                                         or nr < 0 or nr > 10_000):
        raise ValueError(f"num_returns must be an int between 0 and 10000, 'streaming' or 'dynamic', got {nr!r}")
    if "retry_exceptions" in opts:
        opts["retry_exceptions"] = _retry_exceptions(opts["retry_exceptions"])
    for k in ("max_retries", "max_restarts", "max_task_retries"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, int) or v < -1):
            raise ValueError(f"{k} must be an int >= -1 (-1: unlimited), got {v!r}")
    mc = opts.get("max_concurrency")
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= MAX_CONCURRENCY_LIMIT):
        raise ValueError(f"max_concurrency must be an int between 1 and {MAX_CONCURRENCY_LIMIT}, got {mc!r}")
    groups = opts.get("concurrency_groups")
    if groups is not None:
        if not isinstance(groups, dict) or not groups:
            raise ValueError(f"concurrency_groups must map group names to limits, got {groups!r}")
        for g, n in groups.items():
            if not isinstance(g, str) or not g:
                raise ValueError(f"concurrency group names must be non-empty strings, got {g!r}")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CONCURRENCY_LIMIT:
                raise ValueError(f"concurrency group {g!r} needs a limit between 1 and {MAX_CONCURRENCY_LIMIT}, "
                                 f"got {n!r}")
    cg = opts.get("concurrency_group")
    if cg is not None and (not isinstance(cg, str) or not cg):
        raise ValueError(f"concurrency_group must be a non-empty string, got {cg!r}")
    r = opts.get("resources")
    if r is not None:
        if not isinstance(r, dict) or not all(isinstance(k, str) and isinstance(v, int | float) and v >= 0 for k, v in r.items()):
            raise ValueError(f"resources must map names to amounts >= 0, got {r!r}")
        if {"CPU", "GPU"} & set(r):
            raise ValueError("use num_cpus / num_gpus, not resources={'CPU'|'GPU': ...}")
    if "runtime_env" in opts:
        from tessera._runtime_env import validate

        opts["runtime_env"] = validate(opts["runtime_env"])
    if opts.get("scheduling_strategy") is not None:
        from tessera.util import scheduling_strategies

        scheduling_strategies.check(opts["scheduling_strategy"])
    return opts


#: num_returns of a generator task -> TaskSpec.generator.
GENERATOR_KINDS = {"streaming": 1, "dynamic": 2}


def _retry_exceptions(v: Any) -> bool | tuple[type[BaseException], ...]:
    """``retry_exceptions`` (Ray's): a bool, or a list of exception classes (only their instances are
    retried)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, list | tuple) and v:
        bad = [x for x in v if not (isinstance(x, type) and issubclass(x, BaseException))]
        if not bad:
            return tuple(v)
        raise TypeError(f"retry_exceptions must be a bool or a list of exception classes; {bad[0]!r} is not an "
                        f"exception class")
    raise TypeError(f"retry_exceptions must be a bool or a non-empty list of exception classes, got {v!r}")


def _generator_kind(opts: dict[str, Any], fn: Any = None) -> int:
    """TaskSpec.generator: from num_returns, or streaming for a generator function with num_returns unset
    (Ray 2.x's default)."""
    nr = opts.get("num_returns")
    if isinstance(nr, str):
        return GENERATOR_KINDS[nr]
    if nr is None and (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
        return GENERATOR_KINDS["streaming"]
    return 0


def _returns(returns: list[bytes], generator: int, num_returns: int, task_id: bytes) -> Any:
    """What ``.remote()`` gives back: refs, or an ObjectRefGenerator for a streaming task."""
    if generator == GENERATOR_KINDS["streaming"]:
        return ObjectRefGenerator(task_id, _api.state().core)
    return _refs(returns, num_returns)


def _resources(opts: dict[str, Any], default_cpus: float) -> dict[str, float]:
    out = {k: float(v) for k, v in (opts.get("resources") or {}).items()}
    cpus = opts.get("num_cpus")
    out["CPU"] = float(default_cpus if cpus is None else cpus)
    if opts.get("num_gpus"):
        out["GPU"] = float(opts["num_gpus"])
    return {k: v for k, v in out.items() if v > 0}


def _strategy(opts: dict[str, Any], spec: pb.TaskSpec) -> None:
    if opts.get("scheduling_strategy") is not None:
        from tessera.util import scheduling_strategies

        scheduling_strategies.apply(opts["scheduling_strategy"], spec)


class _Exported:
    """A function or class exported once per cluster (content-addressed in the control store)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
        self._ids: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def function_id(self) -> bytes:
        st = _api.state()
        with self._lock:
            fid = self._ids.get(st.cluster_key)
            if fid is not None:
                return fid
            _ship_local_module(self.obj)
            try:
                code = cloudpickle.dumps(self.obj)
            except Exception as e:
                raise TypeError(f"{self.name} cannot be serialized to run remotely: {e}") from None
            fid = hashlib.sha256(code).digest()
            st.control_store().ExportFunction(cpb.ExportFunctionRequest(job_id=st.core.job_id, name=self.name, code=code,
                                                                        expected_function_id=fid), timeout=30.0)
            self._ids[st.cluster_key] = fid
            return fid


def _ship_local_module(obj: Any) -> None:
    """Code from the driver's own files (its script's folder or the working directory), which workers
    cannot import, travels by value; installed packages travel by reference."""
    name = getattr(obj, "__module__", None)
    mod = sys.modules.get(name) if name else None
    if mod is None or name is None or name == "__main__" or name in _by_value:
        return
    path = getattr(mod, "__file__", None)
    if not path:
        return
    real = os.path.realpath(path)
    if any(part in ("site-packages", "dist-packages") for part in real.split(os.sep)):
        return
    roots = {os.path.realpath(sys.path[0] or os.getcwd()), os.path.realpath(os.getcwd())}
    if any(real.startswith(r + os.sep) for r in roots):
        cloudpickle.register_pickle_by_value(mod)
        _by_value.add(name)


_by_value: set[str] = set()


def _args(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[pb.Arg], list[bytes]]:
    """The task's arguments, and the refs serialized inside their values (the task holds them while it runs)."""
    st = _api.state()
    limit = st.inline_threshold
    out: list[pb.Arg] = []
    items: list[tuple[str, Any]] = [("", a) for a in args] + list(kwargs.items())
    refs = st.core.refs
    with refs.capture() as nested:
        for i, (kw, v) in enumerate(items):
            if isinstance(v, ObjectRef):
                out.append(pb.Arg(object_id=v.id, keyword=kw))
                continue
            try:
                ser = serialize(v)
            except InvalidArgumentError as e:
                which = f"argument {kw!r}" if kw else f"argument {i}"
                raise TypeError(f"{which} of {name} cannot be serialized: {e}") from None
            if ser.size <= limit:
                out.append(pb.Arg(value=ser.to_bytes(), keyword=kw))
            else:  # large: through the object store, read in place by the worker (freed when the task ends)
                oid = ids.new_id("object_id")
                refs.own_put(oid)
                st.objects().put_serialized(oid, ser)
                out.append(pb.Arg(object_id=oid, keyword=kw))
    return out, nested


def _refs(returns: list[bytes], num_returns: int) -> Any:
    refs = [ObjectRef(r) for r in returns]
    if num_returns == 1:
        return refs[0]
    return tuple(refs)


class RemoteFunction(Generic[T]):
    """A function that runs as a task: ``f.remote(...)`` returns an ObjectRef."""

    def __init__(self, fn: Callable[..., T], options: dict[str, Any], exported: _Exported | None = None) -> None:
        self._fn = fn
        self._options = options
        self._exported = exported or _Exported(fn)
        self._templates: dict[str, pb.TaskSpec] = {}
        self._shipped = options  # what a pickled copy carries: the options, runtime_env resolved once it is
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "remote_function")
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {self.__name__} cannot be called directly: use {self.__name__}.remote(...)")

    def __reduce__(self) -> tuple[Any, ...]:  # tasks that call other remote functions carry them by value
        return (RemoteFunction, (self._fn, self._shipped))

    def options(self, **options: Any) -> RemoteFunction[T]:
        merged = {**self._options, **_check_options(options, _TASK_OPTIONS, f"function {self.__name__}")}
        return RemoteFunction(self._fn, merged, self._exported)

    def _template(self, st: Any) -> pb.TaskSpec:
        """The parts of this function's task specs that never change (per cluster)."""
        t = self._templates.get(st.cluster_key)
        if t is None:
            o = self._options
            gen = _generator_kind(o, self._fn)
            env, self._shipped = _api.runtime_env_of(st, o)
            t = pb.TaskSpec(kind=pb.TASK_KIND_NORMAL, function_id=self._exported.function_id(),
                            name=o.get("name") or self._exported.name, num_returns=_num_returns(o, gen),
                            resources=_resources(o, 1.0), max_retries=int(o.get("max_retries", 3)), generator=gen,
                            runtime_env=env)
            _strategy(o, t)
            self._templates[st.cluster_key] = t
        return t

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        st = _api.state()
        t = self._template(st)
        spec = pb.TaskSpec()
        spec.CopyFrom(t)
        spec.task_id = os.urandom(ids.TASK_ID_LEN)
        nested: list[bytes] = []
        if args or kwargs:
            a, nested = _args(t.name, args, kwargs)
            spec.args.extend(a)
        returns = st.core.submit(spec, nested, retry_exceptions=self._options.get("retry_exceptions", False))
        return _returns(returns, t.generator, t.num_returns, spec.task_id)


def _num_returns(opts: dict[str, Any], generator: int) -> int:
    """The returns a task's spec counts: none for a streaming task (its items come as it yields them),
    one for a dynamic one (the list of its items' refs)."""
    if generator:
        return 0 if generator == GENERATOR_KINDS["streaming"] else 1
    return int(opts.get("num_returns", 1))


class ActorClass:
    """A class whose instances are actors: ``A.remote(...)`` returns an :class:`ActorHandle`."""

    def __init__(self, cls: type, options: dict[str, Any], exported: _Exported | None = None) -> None:
        self._cls = cls
        self._options = options
        self._exported = exported or _Exported(cls)
        self.__name__ = cls.__name__
        self.__doc__ = cls.__doc__
        self._method_options = _method_options(cls, options.get("concurrency_groups") or {})
        self._shipped = options  # what a pickled copy carries: the options, runtime_env resolved once it is

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self.__name__} cannot be instantiated directly: use {self.__name__}.remote(...)")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ActorClass, (self._cls, self._shipped))

    def options(self, **options: Any) -> ActorClass:
        merged = {**self._options, **_check_options(options, _ACTOR_OPTIONS, f"actor class {self.__name__}")}
        return ActorClass(self._cls, merged, self._exported)

    def remote(self, *args: Any, **kwargs: Any) -> ActorHandle:
        st = _api.state()
        o = self._options
        actor_id = os.urandom(ids.ACTOR_ID_LEN)
        fid = self._exported.function_id()
        name = str(o.get("name") or "")
        namespace = str(o.get("namespace") or "")
        if o.get("lifetime") not in (None, "detached", "non_detached"):
            raise ValueError(f"lifetime must be 'detached' or 'non_detached', got {o.get('lifetime')!r}")
        max_restarts = int(o.get("max_restarts", 0))
        env, self._shipped = _api.runtime_env_of(st, o)  # its packages stored before the actor is recorded
        groups = {g: int(n) for g, n in (o.get("concurrency_groups") or {}).items()}
        methods = sorted(n for n, _ in inspect.getmembers(self._cls, callable) if not n.startswith("__"))
        info = cpb.ActorInfo(actor_id=actor_id, job_id=st.core.job_id, name=name, namespace=namespace,
                             class_function_id=fid, max_restarts=max_restarts)
        try:
            st.control_store().CreateActor(cpb.CreateActorRequest(actor=info), timeout=30.0)
        except Exception as e:
            code = getattr(e, "code", lambda: None)()
            if code is not None and code.name == "ALREADY_EXISTS":
                raise ValueError(f"an actor named {name!r} already exists (namespace {namespace!r})") from None
            raise
        cname = f"{self._exported.name}.__init__"
        spec_args, nested = _args(cname, args, kwargs)
        spec = pb.TaskSpec(task_id=os.urandom(ids.TASK_ID_LEN), kind=pb.TASK_KIND_ACTOR_CREATE, function_id=fid,
                           name=cname, args=spec_args, num_returns=1,
                           resources=_resources(o, 0.0), actor_id=actor_id, max_restarts=max_restarts,
                           actor_name=name, namespace=namespace, max_retries=0,
                           detached=o.get("lifetime") == "detached",
                           max_concurrency=int(o.get("max_concurrency") or 0), concurrency_groups=groups,
                           runtime_env=env)
        _strategy(o, spec)
        ready = st.core.submit(spec, nested)
        h = ActorHandle(actor_id, methods, self._exported.name, method_options=self._method_options,
                        groups=sorted(groups), max_task_retries=int(o.get("max_task_retries", 0)))
        h._ready = ObjectRef(ready[0])
        return h


class ActorHandle:
    """A reference to an actor: ``handle.method.remote(...)``; calls from one caller run in order."""

    def __init__(self, actor_id: bytes, methods: list[str] | None, class_name: str, *,
                 method_options: dict[str, dict[str, Any]] | None = None, groups: list[str] | None = None,
                 max_task_retries: int = 0) -> None:
        self._actor_id = actor_id
        self._methods = methods
        self._class_name = class_name
        self._method_options = method_options or {}
        self._groups = groups  # None: not known here (the actor's worker checks a call's group)
        self._max_task_retries = max_task_retries
        self._caller = os.urandom(8)
        self._seq = 0
        self._lock = threading.Lock()
        self._ready: ObjectRef | None = None

    @property
    def actor_id(self) -> bytes:
        return self._actor_id

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._methods is not None and name not in self._methods:
            raise AttributeError(f"actor {self._class_name} has no method {name!r}")
        return ActorMethod(self, name, dict(self._method_options.get(name, {})))

    def __repr__(self) -> str:
        return f"ActorHandle({self._class_name}, {self._actor_id.hex()})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self._actor_id, self._methods, self._class_name, self._method_options,
                                  self._groups, self._max_task_retries))

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq


class ActorMethod:
    def __init__(self, handle: ActorHandle, name: str, options: dict[str, Any]) -> None:
        self._handle = handle
        self._name = name
        self._options = options

    def options(self, **options: Any) -> ActorMethod:
        opts = _check_options(options, _METHOD_OPTIONS, f"method {self._name}")
        group = opts.get("concurrency_group")
        known = self._handle._groups
        if group is not None and known is not None and group not in known:
            raise ValueError(f"actor {self._handle._class_name} has no concurrency group {group!r} "
                             f"(its groups: {', '.join(known) or 'none'})")
        return ActorMethod(self._handle, self._name, {**self._options, **opts})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        st = _api.state()
        h = self._handle
        o = self._options
        gen = _generator_kind(o)  # (a generator method's default is in its method options)
        num_returns = _num_returns(o, gen)
        name = f"{h._class_name}.{self._name}"
        spec_args, nested = _args(name, args, kwargs)
        # max_retries of an actor call: how often it is sent again to the restarted actor if the actor dies
        spec = pb.TaskSpec(task_id=os.urandom(ids.TASK_ID_LEN), kind=pb.TASK_KIND_ACTOR_METHOD, name=name,
                           method=self._name, args=spec_args, num_returns=num_returns,
                           actor_id=h._actor_id, caller=h._caller, seq=h._next_seq(),
                           max_retries=int(o.get("max_task_retries", h._max_task_retries)),
                           concurrency_group=str(o.get("concurrency_group") or ""), generator=gen)
        returns = st.core.submit(spec, nested, retry_exceptions=o.get("retry_exceptions", False))
        return _returns(returns, gen, num_returns, spec.task_id)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor method {self._name} cannot be called directly: use .{self._name}.remote(...)")


def _rebuild_handle(actor_id: bytes, methods: list[str] | None, class_name: str,
                    method_options: dict[str, dict[str, Any]], groups: list[str] | None,
                    max_task_retries: int) -> ActorHandle:
    return ActorHandle(actor_id, methods, class_name, method_options=method_options, groups=groups,
                       max_task_retries=max_task_retries)


#: Where ``@tessera.method`` keeps a method's options (read by the SDK and by the actor's worker).
METHOD_OPTIONS_ATTR = "__tessera_method_options__"


def method(*args: Any, **options: Any) -> Any:
    """``@tessera.method(num_returns=..., concurrency_group=..., max_task_retries=..., retry_exceptions=...)`` on
    an actor's method (Ray's ``ray.method``): the defaults of that method's calls."""
    if args:
        raise TypeError("@tessera.method takes keyword options only, e.g. @tessera.method(concurrency_group='io')")
    opts = _check_options(dict(options), _METHOD_OPTIONS - {"name"}, "@tessera.method")
    if not opts:
        raise ValueError("@tessera.method needs at least one of: " + ", ".join(sorted(_METHOD_OPTIONS - {"name"})))

    def deco(fn: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"@tessera.method applies to methods, not {type(fn).__name__}")
        setattr(fn, METHOD_OPTIONS_ATTR, dict(opts))
        return fn

    return deco


def _method_options(cls: type, groups: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's ``@tessera.method`` options; a group no ``concurrency_groups`` defines is refused now."""
    out: dict[str, dict[str, Any]] = {}
    for n, fn in inspect.getmembers(cls, callable):
        opts = getattr(fn, METHOD_OPTIONS_ATTR, None)
        if (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)) and "num_returns" not in (opts or {}):
            opts = {**(opts or {}), "num_returns": "streaming"}  # Ray 2.x: a generator method streams by default
        if not opts:
            continue
        g = opts.get("concurrency_group")
        if g is not None and g not in groups:
            raise ValueError(f"method {cls.__name__}.{n} is in concurrency group {g!r}, which {cls.__name__} does not "
                             f"define (concurrency_groups: {', '.join(sorted(groups)) or 'none'})")
        out[n] = dict(opts)
    return out


def remote(*args: Any, **options: Any) -> Any:
    """``@tessera.remote`` or ``@tessera.remote(num_cpus=..., num_gpus=..., resources=..., num_returns=...,
    max_retries=..., max_restarts=...)`` on a function (a task) or a class (an actor); an actor also takes
    ``max_concurrency``, ``concurrency_groups`` and ``max_task_retries`` (Ray's meanings)."""
    if len(args) == 1 and not options and (inspect.isfunction(args[0]) or inspect.isclass(args[0])
                                           or callable(args[0])):
        return _make(args[0], {})
    if args:
        raise TypeError("@tessera.remote takes keyword options only, e.g. @tessera.remote(num_cpus=2)")

    def deco(obj: Any) -> Any:
        return _make(obj, options)

    return deco


def _make(obj: Any, options: dict[str, Any]) -> Any:
    if inspect.isclass(obj):
        return ActorClass(obj, _check_options(dict(options), _ACTOR_OPTIONS, f"actor class {obj.__name__}"))
    if callable(obj):
        return RemoteFunction(obj, _check_options(dict(options), _TASK_OPTIONS, f"function {obj.__name__}"))
    raise TypeError(f"@tessera.remote applies to functions and classes, not {type(obj).__name__}")
