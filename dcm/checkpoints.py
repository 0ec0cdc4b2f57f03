"""One checkpoint loader for both experts.

* :func:`load_checkpoint` reads ``.pt`` / ``.pth`` / ``.ckpt`` (``torch.load`` on CPU with
  ``weights_only=True`` and a small allow-list) and ``.safetensors``; a file that pickles anything else
  is refused unless ``trusted=True`` (CLI: ``--trust-checkpoint``).
* :func:`load_state_dict` unwraps the state dict (first of ``model_state_dict``, ``state_dict``,
  ``model``; DCM's combined file holds the global expert under ``model_state_dict`` and VISTA3D under
  ``model``) and strips ``module.`` / ``_orig_mod.`` prefixes.
* :func:`load_into` loads it into a module: strict (every name and shape must match; the error lists
  the first offending keys and names the known preset the checkpoint's layout fits) or by name + shape
  with a printed :class:`LoadReport` of what was skipped. Without a key, a checkpoint holding several
  state dicts (the combined file) gives the module the one whose layout fits it, and says which.

Known layouts (key -> shape) live in ``dcm/models/manifests.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from dcm.atomic import atomic_torch_save, check_writable
from dcm.errors import CheckpointError, DCMError
from dcm.safe_pickle import PickleRefused, resolve_numpy, stand_in_globals

__all__ = [
    "STATE_DICT_KEYS",
    "STRIP_PREFIXES",
    "LoadReport",
    "load_checkpoint",
    "load_state_dict",
    "load_into",
    "strip_prefixes",
    "known_layouts",
    "identify_layout",
    "safe_globals",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Wrapper keys searched, in this order, for the state dict inside a checkpoint.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
#: Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")

logger = logging.getLogger(__name__)

_MANIFESTS = Path(__file__).resolve().parent / "models" / "manifests.json"
_HOW_TO_TRUST = "pass trusted=True (CLI flag --trust-checkpoint) to load it fully, only if you trust its source"


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def safe_globals() -> List[Any]:
    """What ``weights_only`` loading allows beyond torch's defaults.

    ``argparse.Namespace`` (training args saved in checkpoints), ``torch.device``, and numpy scalars /
    arrays / dtypes (old checkpoints store metrics as numpy values), under their numpy 1 and 2 names. The
    numpy names resolve to :mod:`dcm.safe_pickle`'s stand-ins, never to numpy's own unpickling (which would
    let a file set the raw bytes of an object dtype); :func:`load_checkpoint` builds the real values.
    """
    return [argparse.Namespace, torch.device] + stand_in_globals()


def _unsafe_globals(path: Path) -> List[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return []
    allowed = set()
    for g in safe_globals():
        if isinstance(g, tuple):
            allowed.add(g[1])
        else:
            allowed.add(f"{g.__module__}.{g.__qualname__}")
    return [g for g in found if g not in allowed]


def load_checkpoint(path: PathLike, trusted: bool = False) -> Any:
    """Read a checkpoint file onto the CPU.

    Args:
        path: ``.safetensors`` (read with safetensors) or anything ``torch.save`` wrote (``.pt``,
            ``.pth``, ``.ckpt``, ...).
        trusted: load pickles fully (``weights_only=False``): arbitrary code may run; only for files
            from a trusted source.

    Returns:
        The stored object (a dict of tensors for ``.safetensors``).

    Raises:
        CheckpointError: missing / unreadable / corrupt file, or (``trusted=False``) a file that pickles
            objects outside the allow-list.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is a requirement
            raise CheckpointError(f"{p}: reading .safetensors needs the 'safetensors' package") from e
        try:
            loaded = load_file(str(p), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{p}: not a readable .safetensors file "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        return _check_finite(loaded, p)
    return _check_finite(_load_pickled(p, trusted), p)


def _load_pickled(p: Path, trusted: bool) -> Any:
    """``torch.load`` of a file, every failure as one :class:`CheckpointError` line."""
    try:
        if trusted:
            return torch.load(str(p), map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(safe_globals()):
            return resolve_numpy(torch.load(str(p), map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        refused = _refusal(e)
        if refused is not None:
            raise CheckpointError(f"{p}: refused: {refused} (a safe load never rebuilds such data)") from None
        msg = str(e)
        lowered = msg.lower()
        if not trusted and ("not an allowed global" in lowered or "unsupported global" in lowered):
            bad = _unsafe_globals(p)
            what = f" ({', '.join(bad[:5])})" if bad else ""
            raise CheckpointError(
                f"{p}: the file contains arbitrary pickled objects{what} that a safe (weights-only) load "
                f"refuses; {_HOW_TO_TRUST}"
            ) from e
        if not trusted and "Weights only load failed" in msg:
            detail = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), _first_line(e))
            raise CheckpointError(
                f"{p}: cannot be read safely ({detail}): the file is corrupt, or a plain pickle (arbitrary "
                f"pickled objects) that only a full load can read; {_HOW_TO_TRUST}"
            ) from e
        raise CheckpointError(f"{p}: corrupt or not a checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{p}: corrupt or not a checkpoint ({type(e).__name__}: {_first_line(e)})") from e


def _check_finite(obj: Any, path: Path) -> Any:
    """``obj`` unchanged, after checking that no state dict in it (a mapping of tensors, up to 3 wrapper
    levels deep) holds a NaN or infinite value.

    Raises:
        CheckpointError: naming the file and the first bad tensor.
    """
    todo: List[Tuple[str, Any]] = [("", obj)]
    for _ in range(4):
        nested: List[Tuple[str, Any]] = []
        for where, m in todo:
            if not isinstance(m, Mapping):
                continue
            for k, v in m.items():
                name = f"{where}{k}"
                if isinstance(v, torch.Tensor) and _non_finite(v):
                    raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values (the weights "
                                          f"are broken; use a checkpoint from before training diverged)")
                if isinstance(v, Mapping):
                    nested.append((f"{name}/", v))
        todo = nested
    return obj


def _non_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN / inf (one reduction; the exact test only if the sum overflows)."""
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta" or t.numel() == 0:
        return False
    if bool(torch.isfinite(t.sum())):
        return False
    return not bool(torch.isfinite(t).all())


def _refusal(e: BaseException) -> Optional[str]:
    """The one-line reason when ``e`` is, or was raised while handling, a :class:`PickleRefused`."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, PickleRefused):
            return str(e)
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


# --------------------------------------------------------------------------------------------------
# Unwrapping
# --------------------------------------------------------------------------------------------------


def _is_tensor_like(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Sequence[str] = STRIP_PREFIXES) -> Dict[str, Any]:
    """Remove wrapper prefixes from every key.

    A leading prefix is removed (repeatedly, in any combination, e.g. ``module._orig_mod.``) when every
    key carries it; ``_orig_mod.`` components (torch.compile) are removed anywhere.
    """
    keys = list(state_dict.keys())
    if "_orig_mod." in prefixes:
        keys = [k.replace("._orig_mod.", ".") for k in keys]
    changed = True
    while changed and keys:
        changed = False
        for pre in prefixes:
            if all(k.startswith(pre) for k in keys):
                keys = [k[len(pre):] for k in keys]
                changed = True
    if len(set(keys)) != len(keys):
        raise CheckpointError("state dict has duplicate keys after stripping prefixes " + ", ".join(prefixes))
    return dict(zip(keys, state_dict.values()))


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())[:8]
        return "a dict with keys " + ", ".join(map(repr, keys)) + (" ..." if len(obj) > 8 else "")
    return f"a {type(obj).__name__}"


def load_state_dict(
    path_or_obj: Union[PathLike, Mapping[str, Any], nn.Module],
    key: Optional[str] = None,
    trusted: bool = False,
) -> Dict[str, torch.Tensor]:
    """The unwrapped, prefix-stripped state dict of a checkpoint.

    Args:
        path_or_obj: a checkpoint path (see :func:`load_checkpoint`), an already loaded checkpoint
            object, a raw state dict, or a module.
        key: the wrapper key holding the state dict (e.g. ``"model"`` for the local expert in DCM's
            combined file). None: the first of ``model_state_dict``, ``state_dict``, ``model`` present;
            a raw state dict passes through.
        trusted: see :func:`load_checkpoint`.

    Returns:
        ``{name: tensor}`` in the checkpoint's order (numpy arrays converted to tensors).

    Raises:
        CheckpointError: no state dict found, ``key`` absent, or non-tensor entries.
    """
    src, obj = _read(path_or_obj, trusted)
    return _unwrap(obj, key, src)


def _read(path_or_obj: Union[PathLike, Mapping[str, Any], nn.Module], trusted: bool) -> Tuple[str, Any]:
    """``(prefix for messages, checkpoint object)``: a path is read (:func:`load_checkpoint`), a module gives its
    state dict, anything else passes through."""
    src = ""
    obj: Any = path_or_obj
    if isinstance(obj, (str, os.PathLike)):
        src = f"{obj}: "
        obj = load_checkpoint(obj, trusted=trusted)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    return src, obj


def _unwrap(obj: Any, key: Optional[str], src: str) -> Dict[str, torch.Tensor]:
    """:func:`load_state_dict` of an already read checkpoint object; ``src`` prefixes error messages."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src}expected a dict-like checkpoint, found {_describe(obj)}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{src}checkpoint has no key {key!r}; it is {_describe(obj)}")
        obj = obj[key]
    else:
        for _ in range(3):  # nested wrappers, e.g. {'state_dict': {'model': ...}}
            if obj and all(_is_tensor_like(v) for v in obj.values()):
                break
            picked = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
            if picked is None:
                break
            obj = obj[picked]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{src}no state dict found (looked for {', '.join(STATE_DICT_KEYS)}); "
                              f"it is {_describe(obj)}")
    bad = [k for k, v in obj.items() if not _is_tensor_like(v)]
    if bad:
        raise CheckpointError(
            f"{src}no state dict found: entries are not tensors ({', '.join(map(repr, bad[:5]))}); "
            f"looked for {', '.join(STATE_DICT_KEYS)}; pass key= to pick the right one"
        )
    out = {str(k): _as_tensor(v, f"{src}{k}") for k, v in obj.items()}
    return strip_prefixes(out)


def _fit(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> int:
    """How many of the model's tensors the state dict holds under the same name and shape."""
    return sum(1 for k, v in model_sd.items() if k in state_dict and tuple(state_dict[k].shape) == tuple(v.shape))


def _fitting_entry(
    obj: Any, model_sd: Mapping[str, torch.Tensor], src: str
) -> Optional[Tuple[str, Dict[str, torch.Tensor], Dict[str, int]]]:
    """The wrapper entry (of :data:`STATE_DICT_KEYS`) whose state dict fits the model best, when a checkpoint
    holds several (DCM's combined file: the global expert under ``model_state_dict``, VISTA3D under ``model``).

    Returns:
        ``(entry, its state dict, {entry: fitting tensors} of every candidate)``; ties go to the first entry in
        :data:`STATE_DICT_KEYS` order (the single-entry default). None when there are fewer than two
        candidates: the default unwrapping applies.
    """
    if not isinstance(obj, Mapping) or all(_is_tensor_like(v) for v in obj.values()):
        return None
    candidates: List[Tuple[str, Dict[str, torch.Tensor]]] = []
    for entry in STATE_DICT_KEYS:
        if isinstance(obj.get(entry), Mapping):
            try:
                candidates.append((entry, _unwrap(obj[entry], None, src)))
            except CheckpointError:  # not a state dict (e.g. a config under 'model')
                continue
    if len(candidates) < 2:
        return None
    fits = {entry: _fit(sd, model_sd) for entry, sd in candidates}
    best = max(candidates, key=lambda c: fits[c[0]])  # max keeps the first of equal ones
    return best[0], best[1], fits


def _as_tensor(v: Any, where: str) -> torch.Tensor:
    """A tensor, or a numpy array of numbers as one (native byte order, contiguous)."""
    if not isinstance(v, np.ndarray):
        return v
    if v.dtype.kind not in "biufc":
        raise CheckpointError(f"{where}: a numpy array of dtype {v.dtype} is not a weight tensor")
    return torch.from_numpy(np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("=")))


# --------------------------------------------------------------------------------------------------
# Known layouts
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def known_layouts() -> Dict[str, Dict[str, Any]]:
    """``{layout: {"preset": str, "params": int, "state_dict": {key: shape list}}}`` of the known models."""
    try:
        with open(_MANIFESTS, "r", encoding="utf-8") as f:
            return json.load(f)["layouts"]
    except (OSError, ValueError, KeyError):
        return {}


def identify_layout(shapes: Mapping[str, Any]) -> Optional[Tuple[str, bool, float]]:
    """Which known layout a state dict (or ``{key: shape}``) fits best.

    Returns:
        ``(layout name, exact, score)`` where ``exact`` means identical keys and shapes and ``score`` is the
        fraction of (key, shape) pairs shared (intersection over union); None when nothing overlaps.
    """
    mine = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}
    best: Optional[Tuple[str, bool, float]] = None
    for name, lay in known_layouts().items():
        ref = {k: tuple(s) for k, s in lay["state_dict"].items()}
        common = sum(1 for k, s in mine.items() if ref.get(k) == s)
        union = len(set(mine) | set(ref))
        score = common / union if union else 0.0
        exact = mine == ref
        if score > 0 and (best is None or (exact, score) > (best[1], best[2])):
            best = (name, exact, score)
    return best


def _layout_hint(state_dict: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor]) -> str:
    layouts = known_layouts()
    parts = []
    ck = identify_layout(state_dict)
    if ck is not None and ck[2] >= 0.5:
        name, exact, score = ck
        rel = "has exactly the layout of" if exact else f"is closest to the layout of ({score:.0%} of tensors match)"
        parts.append(f"the checkpoint {rel} '{name}' -> {layouts[name]['preset']}")
    md = identify_layout(model_sd)
    if md is not None and md[1]:
        parts.append(f"the model is built as '{md[0]}' ({layouts[md[0]]['preset']})")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Loading into a module
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_into` did.

    Attributes:
        loaded: model keys filled from the checkpoint.
        missing: model keys the checkpoint lacks (left as initialised).
        unexpected: checkpoint keys the model lacks (ignored).
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present in both with different shapes
            (left as initialised).
        source: where the state dict came from (a path, or "<state dict>").
        entry: the checkpoint's wrapper entry the state dict came from, when one was given or picked.
    """

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    source: str = ""
    entry: Optional[str] = None

    @property
    def skipped(self) -> List[str]:
        """Every model or checkpoint key that was not loaded (missing, mismatched, unexpected)."""
        return list(self.missing) + [k for k, _, _ in self.mismatched] + list(self.unexpected)

    @property
    def complete(self) -> bool:
        """True when every key and shape matched."""
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, limit: int = 20) -> str:
        """Multi-line human-readable report (at most ``limit`` keys per list)."""

        def show(items: Sequence[str]) -> str:
            s = ", ".join(items[:limit])
            return s + (f", ... (+{len(items) - limit})" if len(items) > limit else "")

        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        where = self.source or "<state dict>"
        if self.entry is not None:
            where += f" [{self.entry}]"
        lines = [f"checkpoint {where}: loaded {len(self.loaded)}/{total} model tensors"]
        if self.mismatched:
            lines.append(f"  skipped, shape mismatch ({len(self.mismatched)}): " + show(
                [f"{k} {list(a)} (model {list(b)})" for k, a, b in self.mismatched]))
        if self.missing:
            lines.append(f"  missing, left as initialised ({len(self.missing)}): " + show(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected, ignored ({len(self.unexpected)}): " + show(self.unexpected))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _compare(
    sd: Mapping[str, torch.Tensor], model_sd: Mapping[str, torch.Tensor], source: str
) -> LoadReport:
    rep = LoadReport(source=source)
    for k, v in model_sd.items():
        if k not in sd:
            rep.missing.append(k)
        elif tuple(sd[k].shape) != tuple(v.shape):
            rep.mismatched.append((k, tuple(sd[k].shape), tuple(v.shape)))
        else:
            rep.loaded.append(k)
    rep.unexpected = [k for k in sd if k not in model_sd]
    return rep


def load_into(
    model: nn.Module,
    path_or_state_dict: Union[PathLike, Mapping[str, Any]],
    strict: bool = True,
    key: Optional[str] = None,
    trusted: bool = False,
    verbose: bool = True,
) -> LoadReport:
    """Load a checkpoint into ``model`` (in place) and report what happened.

    Args:
        model: the module to fill (its ``state_dict()`` keys, persistent buffers included).
        path_or_state_dict: a checkpoint path, a loaded checkpoint object or a state dict.
        strict: True: every key and shape must match (else nothing is loaded and CheckpointError lists
            the first missing / unexpected / mismatched keys and the known preset the checkpoint fits).
            False: load the tensors whose name and shape match, skip the rest.
        key: wrapper key, see :func:`load_state_dict`. None: when the checkpoint holds several state dicts
            (DCM's combined file), the one whose layout fits ``model`` (most tensors of the same name and shape;
            said in a printed / logged line), else the :func:`load_state_dict` default.
        trusted: see :func:`load_checkpoint`.
        verbose: print which entry was picked (when there was a choice) and, with ``strict=False``, the report
            of what was skipped.

    Returns:
        The :class:`LoadReport`.
    """
    path = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else None
    source = path or "<state dict>"
    src, obj = _read(path_or_state_dict, trusted)
    model_sd = model.state_dict()
    picked = _fitting_entry(obj, model_sd, src) if key is None else None
    if picked is None:
        sd = _unwrap(obj, key, src)
    else:
        entry, sd, fits = picked
        others = ", ".join(f"{k!r} {n}" for k, n in fits.items() if k != entry)
        line = (f"checkpoint {source}: took entry {entry!r}, the one that fits the model ({fits[entry]}/"
                f"{len(model_sd)} tensors by name and shape; {others})")
        logger.info(line)
        if verbose:
            print(line, flush=True)
    rep = _compare(sd, model_sd, source)
    rep.entry = key if picked is None else picked[0]
    if strict and not rep.complete:
        problems = []
        if rep.missing:
            problems.append(f"{len(rep.missing)} missing (" + ", ".join(rep.missing[:5])
                            + (", ..." if len(rep.missing) > 5 else "") + ")")
        if rep.unexpected:
            problems.append(f"{len(rep.unexpected)} unexpected (" + ", ".join(rep.unexpected[:5])
                            + (", ..." if len(rep.unexpected) > 5 else "") + ")")
        if rep.mismatched:
            problems.append(f"{len(rep.mismatched)} shape mismatch(es) (" + ", ".join(
                f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in rep.mismatched[:5]
            ) + (", ..." if len(rep.mismatched) > 5 else "") + ")")
        hint = _layout_hint(sd, model_sd)
        raise CheckpointError(
            "checkpoint does not fit the model: " + "; ".join(problems)
            + (f". Hint: {hint}" if hint else "")
            + ". Use the config (model presets) the weights were trained with.",
            path=path,
        )
    if strict:
        model.load_state_dict(sd, strict=True)
    else:
        model.load_state_dict({k: sd[k] for k in rep.loaded}, strict=False)
        if verbose:
            print(rep.format())
    return rep


# ---------------------------------------------------------------------------------------------- combine


def combine(global_path: PathLike, local_path: PathLike, out_path: PathLike, trusted: bool = False) -> Path:
    """Write DCM's combined inference file: the global expert under ``model_state_dict``, VISTA3D under ``model``.

    Each input may be a training checkpoint (ours or DCM's), a raw state dict or a ``.safetensors`` file;
    prefixes are stripped. The output is written atomically.
    """
    global_sd = load_state_dict(global_path, trusted=trusted)
    local_obj = load_checkpoint(local_path, trusted=trusted)
    local_sd = load_state_dict(local_obj, key="model" if isinstance(local_obj, Mapping) and "model" in local_obj
                               else None, trusted=trusted)
    return atomic_torch_save({"model_state_dict": global_sd, "model": local_sd}, out_path)


def interpolate(from_path: PathLike, to_path: PathLike, alpha: float, out_path: PathLike,
                trusted: bool = False) -> Path:
    """Write ``(1 - alpha) * from + alpha * to``, tensor by tensor, for two checkpoints of the same model.

    Both inputs are DCM inference files (the sections ``model_state_dict`` and ``model`` are interpolated each
    with its counterpart) or plain state dicts; floating-point tensors are interpolated, others (counters,
    integer buffers) are taken from ``from``. Meant for two fine-tunings from one start (weight
    interpolation, "model soups"). The output is written atomically.

    Raises:
        DCMError: the two do not hold the same tensors (names, shapes), or ``alpha`` is not in [0, 1].
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise DCMError(f"alpha {alpha} is not in [0, 1]")
    sections = ("model_state_dict", "model")
    objs = [load_checkpoint(p, trusted=trusted) for p in (from_path, to_path)]
    combined = [isinstance(o, Mapping) and set(sections) <= set(o) for o in objs]
    if all(combined):
        pairs = {key: [load_state_dict(o, key=key, trusted=trusted) for o in objs] for key in sections}
    elif any(combined):
        raise DCMError(f"one of {from_path} and {to_path} is a combined DCM file (global and local expert), the "
                       f"other is not: not one model")
    else:
        pairs = {"": [load_state_dict(o, trusted=trusted) for o in objs]}
    out: Dict[str, Any] = {}
    for key, (a, b) in pairs.items():
        if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
            where = f" ({key})" if key else ""
            raise DCMError(f"{from_path} and {to_path} do not hold the same tensors{where}: not one model")
        mixed = {k: (_lerp(a[k], b[k], float(alpha)) if a[k].is_floating_point() else a[k].clone()) for k in a}
        if key:
            out[key] = mixed
        else:
            out = mixed
    return atomic_torch_save(out, out_path)


def _lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) a + alpha b`` computed in at least float32, returned in ``a``'s dtype."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return torch.lerp(a.to(dtype), b.to(dtype), alpha).to(a.dtype)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcm.checkpoints",
                                     description="Checkpoint tools: combine two expert checkpoints into DCM's file; "
                                                 "interpolate two checkpoints of one model.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("combine", help="global + local checkpoints -> one inference file")
    c.add_argument("--global", dest="global_path", required=True, help="global-RoI expert checkpoint")
    c.add_argument("--local", dest="local_path", required=True, help="local-RoI expert (VISTA3D) checkpoint")
    c.add_argument("--out", required=True)
    c.add_argument("--trust-checkpoint", action="store_true")
    i = sub.add_parser("interpolate", help="(1 - alpha) * FROM + alpha * TO, for two checkpoints of one model")
    i.add_argument("--from", dest="from_path", required=True)
    i.add_argument("--to", dest="to_path", required=True)
    i.add_argument("--alpha", type=float, required=True, help="0: FROM, 1: TO")
    i.add_argument("--out", required=True)
    i.add_argument("--trust-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    try:
        check_writable(args.out)  # before two checkpoints are read
        if args.command == "interpolate":
            out = interpolate(args.from_path, args.to_path, args.alpha, args.out, args.trust_checkpoint)
        else:
            out = combine(args.global_path, args.local_path, args.out, args.trust_checkpoint)
    except DCMError as e:
        print(" ".join(f"{args.command}: {e}".split()), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
