"""NumPy values out of untrusted pickles without NumPy's own unpickling.

NumPy rebuilds a pickled array or dtype from whatever state the pickle gives (``np.dtype.__setstate__``
accepts the flags of an object dtype, ``_reconstruct`` + ``__setstate__`` fill an array from raw bytes), so
an allow-list of NumPy names is not enough: an ``O8`` dtype whose flags say "no references" makes NumPy read
8 bytes of the file as a pointer. Here the NumPy names a pickle may use resolve to stand-ins that only
record their arguments; :func:`resolve_numpy` then builds the real values itself:

* a dtype only from its descriptor (numbers, bool, ``U`` / ``S`` strings, byte order); structured, sub-array
  and other dtypes are refused, and the state's flags are never used;
* an array of such a dtype from bytes of exactly the declared size; an object array only from the list of
  Python items the pickle holds (never from bytes);
* a scalar from bytes of exactly its size.

:func:`unpickle_plain` reads the object arrays of case files (plain containers, numbers, strings, None and
such arrays only, at most :data:`MAX_DEPTH` levels and :data:`MAX_ITEMS` items); :data:`NUMPY_STAND_INS`
serve ``torch.load(weights_only=True)`` for checkpoints.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "PickleRefused", "NUMPY_STAND_INS", "resolve_numpy", "stand_in_globals",
           "unpickle_plain"]

#: Nesting deeper than this is refused (case files nest 4 levels: array, dict, list, point).
MAX_DEPTH = 64
#: Items (counting every reference to a shared object) above this are refused in case files.
MAX_ITEMS = 1_000_000
_SIMPLE_KINDS = "biufcUS"  # bool, signed / unsigned integers, floats, complex, str, bytes
_MAX_DIMS = 32


class PickleRefused(pickle.UnpicklingError):
    """A pickle holds something a safe load does not rebuild; ``str(err)`` is one line."""


class _Dtype:
    """Stands for ``numpy.dtype(descr, align, copy)`` plus its ``__setstate__`` while unpickling."""

    descr: Any = None
    state: Any = None

    def __init__(self, descr: Any = None, *args: Any) -> None:
        self.descr = descr

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def resolve(self) -> Optional[np.dtype]:
        """The NumPy dtype, built from the descriptor alone; None for the object dtype.

        Raises:
            PickleRefused: any other kind (structured, sub-array, datetime, ...) or a malformed state.
        """
        descr = self.descr
        if not isinstance(descr, str) or not descr:
            raise PickleRefused(f"numpy dtype with descriptor {descr!r}")
        if descr in ("O", "O4", "O8"):
            return None
        if descr[0] not in _SIMPLE_KINDS:
            raise PickleRefused(f"numpy dtype {descr!r} (only numbers, strings and Python objects are read)")
        byteorder, elsize = "|", None
        if self.state is not None:
            state = self.state
            if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
                raise PickleRefused(f"numpy dtype {descr!r} with a malformed state")
            byteorder, subarray, names, fields, elsize = state[1:6]
            if subarray is not None or names is not None or fields is not None:
                raise PickleRefused(f"structured or sub-array numpy dtype {descr!r}")
        try:
            dt = np.dtype(descr)
        except (TypeError, ValueError):
            raise PickleRefused(f"numpy dtype {descr!r} is not a dtype") from None
        if dt.kind not in _SIMPLE_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise PickleRefused(f"numpy dtype {descr!r} (only numbers, strings and Python objects are read)")
        if dt.kind in "US" and isinstance(elsize, int) and not isinstance(elsize, bool) and elsize >= 0:
            width = 4 if dt.kind == "U" else 1
            if elsize % width:
                raise PickleRefused(f"numpy dtype {descr!r} with item size {elsize}")
            dt = np.dtype(f"{dt.kind}{elsize // width}")
        if byteorder in ("<", ">"):
            dt = dt.newbyteorder(byteorder)
        elif byteorder not in ("|", "="):
            raise PickleRefused(f"numpy dtype {descr!r} with byte order {byteorder!r}")
        return dt


class _Array:
    """Stands for ``numpy.ndarray`` (the class handed to ``_reconstruct``) and for the array being rebuilt."""

    state: Any = None

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(subtype: Any, shape: Any = None, dtype: Any = None) -> _Array:
    if subtype is not _Array:
        raise PickleRefused(f"numpy array of class {getattr(subtype, '__name__', type(subtype).__name__)}")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
    """Protocol-5 form of a numeric array: ``(bytes, dtype, shape, order)``."""
    out = _Array()
    out.state = (1, shape, dtype, order == "F", buffer)
    return out


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _Dtype):
        raise PickleRefused("numpy scalar without a dtype")
    dt = dtype.resolve()
    if dt is None:
        raise PickleRefused("numpy object scalar")
    data = _raw_bytes(data, "numpy scalar")
    if len(data) != dt.itemsize or dt.itemsize == 0:
        raise PickleRefused(f"numpy {dt} scalar of {len(data)} bytes (expected {dt.itemsize})")
    return np.frombuffer(data, dtype=dt, count=1)[0]


def _latin1(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: ``(str, 'latin1')`` only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise PickleRefused("_codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


def _raw_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):  # numpy 1 pickles of protocol 0-2 may hold latin-1 text
        return data.encode("latin1")
    raise PickleRefused(f"{what} data of type {type(data).__name__}")


#: Pickle global names -> stand-ins (numpy 1 and 2 module names).
NUMPY_STAND_INS: Dict[str, Any] = {"numpy.dtype": _Dtype, "numpy.ndarray": _Array}
for _mod in ("numpy.core", "numpy._core"):
    NUMPY_STAND_INS[f"{_mod}.multiarray._reconstruct"] = _reconstruct
    NUMPY_STAND_INS[f"{_mod}.multiarray.scalar"] = _scalar
    NUMPY_STAND_INS[f"{_mod}.numeric._frombuffer"] = _frombuffer


class _PlainUnpickler(pickle.Unpickler):
    """Plain containers and the NumPy stand-ins; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        found = NUMPY_STAND_INS.get(f"{module}.{name}")
        if found is None and (module, name) == ("_codecs", "encode"):
            found = _latin1
        if found is None:
            raise PickleRefused(f"refused to unpickle {module}.{name} (case files hold plain data only)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise PickleRefused("persistent references are not read")


def unpickle_plain(data: bytes) -> Any:
    """Unpickle plain data (containers, numbers, strings, None, NumPy arrays of those) from ``data``.

    Raises:
        PickleRefused: a global outside the NumPy stand-ins, an object dtype set from bytes, a structured
            dtype, nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_ITEMS` items, a cycle.
        Exception: whatever a malformed pickle raises (``UnpicklingError``, ``EOFError``, ...).
    """
    return resolve_numpy(_PlainUnpickler(io.BytesIO(data)).load(), tree=True)


def resolve_numpy(obj: Any, tree: bool = False) -> Any:
    """``obj`` with every NumPy stand-in replaced by the real value (dicts and lists are changed in place).

    Args:
        obj: what an unpickler using :data:`NUMPY_STAND_INS` returned.
        tree: the data must be a tree of plain data (case files): no cycles, at most :data:`MAX_ITEMS` items
            counting every reference to a shared object (so no consumer can blow it up).

    Raises:
        PickleRefused: see :func:`unpickle_plain`.
    """
    return _Resolver(tree)(obj, 0)


class _Resolver:
    _LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), np.generic, np.ndarray)

    def __init__(self, tree: bool) -> None:
        self.tree = tree
        self.done: Dict[int, Any] = {}
        self.sizes: Dict[int, int] = {}
        self.active: set = set()
        self.keep: List[Any] = []
        self.count = 0

    def _tick(self, n: int = 1) -> None:
        self.count += n
        if self.tree and self.count > MAX_ITEMS:
            raise PickleRefused(f"more than {MAX_ITEMS} items")

    def __call__(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, self._LEAVES):
            self._tick()
            return obj
        if depth > MAX_DEPTH:
            raise PickleRefused(f"nested deeper than {MAX_DEPTH} levels")
        key = id(obj)
        if key in self.done:
            self._tick(self.sizes[key])
            return self.done[key]
        if key in self.active:
            if self.tree:
                raise PickleRefused("a container holds itself")
            return obj
        self.active.add(key)
        start = self.count
        try:
            out = self._convert(obj, depth)
        finally:
            self.active.discard(key)
        self.keep.append(obj)
        self.done[key], self.sizes[key] = out, self.count - start
        return out

    def _convert(self, obj: Any, depth: int) -> Any:
        self._tick()
        if isinstance(obj, _Array):
            return self._array(obj, depth)
        if isinstance(obj, _Dtype):
            dt = obj.resolve()
            return np.dtype(object) if dt is None else dt
        if isinstance(obj, dict):
            if any(isinstance(k, (_Array, _Dtype)) for k in obj):
                raise PickleRefused("numpy value as a dict key")
            for k, v in list(obj.items()):
                self(k, depth + 1)
                new = self(v, depth + 1)
                if new is not v:
                    obj[k] = new
            return obj
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                new = self(v, depth + 1)
                if new is not v:
                    obj[i] = new
            return obj
        if type(obj) is tuple:
            items = [self(v, depth + 1) for v in obj]
            return obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
        if isinstance(obj, (set, frozenset)):
            for v in obj:
                if isinstance(v, (_Array, _Dtype)):
                    raise PickleRefused("numpy value in a set")
                self(v, depth + 1)
            return obj
        if self.tree:
            raise PickleRefused(f"object of type {type(obj).__name__}")
        attrs = getattr(obj, "__dict__", None)  # argparse.Namespace and the like
        if type(attrs) is dict:
            self(attrs, depth + 1)
        return obj

    def _array(self, arr: _Array, depth: int) -> np.ndarray:
        state = arr.state
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise PickleRefused("numpy array without a valid state")
        shape, dtype, fortran, data = state
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if (not isinstance(shape, tuple) or len(shape) > _MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise PickleRefused(f"numpy array with shape {shape!r}")
        if not isinstance(dtype, _Dtype):
            raise PickleRefused("numpy array without a dtype")
        dt = dtype.resolve()
        n = math.prod(shape)
        order = "F" if fortran else "C"
        if dt is None:  # object array: its items are the pickle's own Python objects, never bytes
            if not isinstance(data, list):
                raise PickleRefused("numpy object array stored as raw bytes")
            if len(data) != n:
                raise PickleRefused(f"numpy object array of shape {shape} holds {len(data)} items")
            flat = np.empty(n, dtype=object)
            for i, item in enumerate(data):
                flat[i] = self(item, depth + 1)
            return flat.reshape(shape, order=order)
        raw = _raw_bytes(data, f"numpy {dt} array")
        if len(raw) != n * dt.itemsize:
            raise PickleRefused(f"numpy {dt} array of shape {shape} declares {n * dt.itemsize} bytes, "
                                f"holds {len(raw)}")
        self._tick(n if self.tree else 0)
        if dt.itemsize == 0:
            return np.zeros(shape, dtype=dt)
        return np.frombuffer(raw, dtype=dt, count=n).reshape(shape, order=order).copy(order="K")


def stand_in_globals() -> List[Any]:
    """``(stand-in, "module.name")`` pairs for ``torch.serialization.safe_globals``."""
    return [(value, name) for name, value in NUMPY_STAND_INS.items()]

