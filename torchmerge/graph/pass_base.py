"""GraphPass / PassResult: the contract every torchmerge graph transform follows.

A pass is a small object configured by its (dataclass) fields. `call(gm)` transforms the GraphModule in
place or returns a new one, and says whether anything changed. `uuid()` identifies the pass for compile
caches: it hashes the pass's class, its options and the source of the module that defines it, so it is
stable across processes and changes whenever the options or the code change.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import torch.fx as fx


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) GraphModule and whether the graph changed."""

    gm: fx.GraphModule
    modified: bool


class NodeError(RuntimeError):
    """Raised by a pass that fails on a specific node, so the pipeline can name it."""

    def __init__(self, node, message: str):
        super().__init__(message)
        self.node = node


def stable_repr(obj) -> object:
    """A JSON-able, process-independent description of an option value (for uuids)."""
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return {"type": type(obj).__qualname__, "json": obj.to_json()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__qualname__,
                **{f.name: stable_repr(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, dict):
        return {str(k): stable_repr(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple, frozenset, set)):
        items = [stable_repr(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    return repr(obj)


@lru_cache(maxsize=None)
def _source_digest(cls) -> str:
    """Hash of the source of every torchmerge module along the class's MRO (a base-class edit counts too)."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        module = inspect.getmodule(klass)
        if module is None or not module.__name__.startswith("torchmerge"):
            continue
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):
            digest.update(klass.__qualname__.encode())
    return digest.hexdigest()


class GraphPass(ABC):
    """Base class of graph passes. Subclasses are usually frozen dataclasses whose fields are the options."""

    name: str = "graph_pass"

    def options(self) -> dict:
        """The pass's options; dataclass fields by default."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    def uuid(self) -> str:
        """Stable identity for compile caches (class, options, defining module's source)."""
        payload = {"cls": f"{type(self).__module__}.{type(self).__qualname__}", "name": self.name,
                   "options": stable_repr(self.options()), "source": _source_digest(type(self))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult:
        """Transform `gm`; return the result and whether the graph changed."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)
