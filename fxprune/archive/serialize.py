"""save / load / apply_plan: pruned models on disk, and nothing from the file is ever unpickled.

An archive is what ``torch.export.save`` writes for ``torch.export.export(gm, example_inputs)`` with
the batch dims (and the sequence dims of token inputs) dynamic where the model allows
(``core/dynamic.py``; the record's ``"dims"`` says which), plus one extra file, ``extra/fxprune.json``:
the format version, the ``gm.meta["fxprune"]`` record (kept indices, plan, report, input specs; the
fingerprint when recorded) and a sha256 of the record and of the archive's other entries. ``load``
gives a GraphModule that trains: ``train()``/``eval()`` switch its batch-norm and dropout ops too.

``torch.export.load`` alone is not safe on a file from elsewhere (torch 2.14): it calls
``torch.load(weights_only=False)`` on weights and constants marked ``use_pickle``, retries the sample
inputs with ``weights_only=False`` when ``weights_only=True`` fails, ``pickle.loads`` opaque constants,
loads AOTInductor shared libraries, ``sympy.sympify``s (``eval``s) symbolic shape strings, compiles its
guards' code, and resolves any ``torch.*`` attribute named as a graph target. So ``load`` reads the
file once, admits only the entries ``save`` writes, none pickled, no sample inputs, no guards' code,
symbolic shapes only as sympy constructors of size symbols and integers (``_SYMBOLIC``), checks the
sha256, gives those same bytes to ``torch.export.load`` and admits only ATen operators in the graph.

A pruned detector is a copy of its module tree, which no exporter captures whole; its archive has the
same root folder and record, ``"kind": "modules"`` in the record's file, and one other entry,
``data/weights.safetensors`` (its state_dict; safetensors holds raw tensors and a JSON header, nothing
to unpickle). ``load`` then needs a fresh instance of the architecture: it replays the plan on it
(checked against the recorded fingerprint) and loads the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import operator
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx
from torch import nn

from ..core.fxutil import is_hf
from ..core import dynamic
from ..core import metakeys as keys
from .. import pipeline
from ..api import prune
from ..core.codegen import DirectGraphModule
from ..pipeline import Inputs
from ..errors import ArchiveError, ArgumentError, PlanError
from ..core.groups import Plan
from ..core.provenance import input_specs, inputs_from_specs, plan_fingerprint

__all__ = ["FORMAT", "save", "load", "read_record", "apply_plan"]

FORMAT = "fxprune/1"
"""Format version of ``extra/fxprune.json``; ``load`` refuses any other."""

PathLike = str | os.PathLike[str]

_RECORD = "extra/fxprune.json"
# Every entry torch.export.save (torch 2.14) writes for one static-shape model, relative to the root.
_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/(version|serialization_id)|models/model\.json"
    r"|data/weights/(model_weights_config\.json|weight_\d+)|data/constants/(model_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/model\.pt|extra/fxprune\.json"
)
# A symbolic size as torch.export writes it (``Mul(Integer(4), Symbol('s31', positive=True, integer=True))``):
# sympy constructors, size symbols and integers only, nothing that names an attribute or other code.
_SYMBOLIC = re.compile(r"(?:(?:Symbol|Integer|Rational|Mul|Add|Pow|Max|Min|Mod|PythonMod|FloorDiv|CeilToInt|CleanDiv)\("
                       r"|'[su]\d+'|(?:positive|integer|nonnegative)=True|-?\d+|[(), ])+")
_UNHASHED = ("extra/", ".data/")  # the record itself, and the writer's bookkeeping
_MODULES = "modules"  # the record file's "kind" for a pruned module tree (see the module docstring)
_WEIGHTS = "data/weights.safetensors"
_PAYLOAD_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
# What zipfile raises on a damaged archive: bad headers, CRC or deflate data, odd flags.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError)


def _refuse(path: PathLike, why: str) -> ArchiveError:
    return ArchiveError(f"{os.fspath(path)}: {why}; load only files written by fxprune.save (write it again)")


def _open(source: PathLike | bytes, path: PathLike) -> tuple[zipfile.ZipFile, str]:
    """The archive as a ZipFile, and its single root folder ("name/")."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
        names = zf.namelist()
    except FileNotFoundError as e:
        raise ArchiveError(f"{os.fspath(path)}: cannot read ({e.strerror})") from e
    except _ZIP_ERRORS as e:
        raise _refuse(path, f"not a zip archive, or truncated ({e})") from e
    roots = {n.split("/", 1)[0] for n in names}
    # torch's reader looks names up case-insensitively: two spellings could hide a second entry.
    if len(roots) != 1 or len({n.lower() for n in names}) != len(names):
        raise _refuse(path, "not a torch.export archive (entries outside one root folder, or duplicated)")
    return zf, roots.pop() + "/"


def _read(zf: zipfile.ZipFile, name: str, path: PathLike) -> bytes:
    try:
        return zf.read(name)
    except KeyError as e:
        raise _refuse(path, f"entry {name} is missing") from e
    except _ZIP_ERRORS as e:
        raise _refuse(path, f"entry {name} is corrupt ({e})") from e


def _document(zf: zipfile.ZipFile, root: str, path: PathLike) -> dict[str, Any]:
    """The parsed ``extra/fxprune.json``, checked for format version and shape."""
    if root + _RECORD not in zf.namelist():
        raise _refuse(path, f"not an fxprune archive (it has no {_RECORD})")
    try:
        doc = json.loads(_read(zf, root + _RECORD, path))
    except ValueError as e:
        raise _refuse(path, f"{_RECORD} is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise _refuse(path, f"format {found!r}, but this fxprune reads {FORMAT!r}")
    if not (isinstance(doc.get("sha256"), str) and _well_formed(doc.get("fxprune"))):
        raise _refuse(path, f"{_RECORD} lacks sha256, or its fxprune record is malformed")
    return doc


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(type(i) is int and i >= 0 for i in value)


def _spec_ok(spec: Any) -> bool:
    """A tensor's recorded shape and dtype, or a non-empty list of them (see record.input_specs)."""
    if isinstance(spec, dict) and isinstance(spec.get("list"), list):
        return bool(spec["list"]) and all(_spec_ok(s) and "list" not in s for s in spec["list"])
    return isinstance(spec, dict) and _naturals(spec.get("shape")) and isinstance(getattr(torch, str(spec.get("dtype")), None), torch.dtype)


def _well_formed(record: Any) -> bool:
    """Whether the fields load and apply_plan read (plan, inputs, fingerprint) have the types they expect."""
    if not isinstance(record, dict):
        return False
    plan, specs, prints = record.get("plan"), record.get("inputs"), record.get("fingerprint", [])
    plan_ok = isinstance(plan, dict) and all(k.isdigit() and _naturals(v) for k, v in plan.items())
    specs_ok = isinstance(specs, list) and all(_spec_ok(s) for s in specs)
    prints_ok = isinstance(prints, list) and all(
        isinstance(g, dict) and type(g.get("width")) is int and isinstance(g.get("members"), list) and g["members"]
        and all(isinstance(m, str) for m in g["members"])
        for g in prints
    )
    return plan_ok and specs_ok and prints_ok


def _digest(zf: zipfile.ZipFile, root: str, record: dict[str, Any], path: PathLike) -> str:
    """sha256 of the fxprune record (as canonical JSON) and of the names and contents of every entry but
    the record's file and the writer's bookkeeping, which torch rewrites on every save."""
    h = hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(zf.namelist()):
        rel = name[len(root):]
        if not rel.startswith(_UNHASHED):
            data = _read(zf, name, path)
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def _values(tree: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a parsed JSON ``tree``."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in _values(v, key)]
    return [x for v in tree for x in _values(v, key)] if isinstance(tree, list) else []


def _check_modules_contents(zf: zipfile.ZipFile, root: str, path: PathLike) -> None:
    """A module tree's archive holds its record and its weights, nothing else."""
    names = set(zf.namelist())
    extra = sorted(names - {root + _RECORD, root + _WEIGHTS})
    if extra:
        raise _refuse(path, f"unexpected entry {extra[0]}")
    if root + _WEIGHTS not in names:
        raise _refuse(path, f"entry {root + _WEIGHTS} is missing")


def _check_contents(zf: zipfile.ZipFile, root: str, path: PathLike) -> None:
    """Refuse whatever torch.export.load would unpickle, execute or eval (see the module docstring)."""
    for name in zf.namelist():
        if not _ENTRIES.fullmatch(name[len(root):]):
            raise _refuse(path, f"unexpected entry {name}")
    try:
        for config in _PAYLOAD_CONFIGS:
            if any(meta["use_pickle"] is not False for meta in json.loads(_read(zf, root + config, path))["config"].values()):
                raise _refuse(path, f"{config} lists a pickled tensor")
        program = json.loads(_read(zf, root + "models/model.json", path))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _refuse(path, f"malformed program or payload config ({type(e).__name__}: {e})") from e
    if _read(zf, root + "data/sample_inputs/model.pt", path):
        raise _refuse(path, "it holds pickled sample inputs")
    unsafe = [e for e in _values(program, "expr_str") if not (isinstance(e, str) and _SYMBOLIC.fullmatch(e))]
    if unsafe:
        raise _refuse(path, f"its program has a symbolic shape that is not a size expression ({str(unsafe[0])[:80]!r})")
    if any(_values(program, "guards_code")):
        raise _refuse(path, "its program has guards' code")


def _check_graph(ep: torch.export.ExportedProgram, path: PathLike) -> None:
    """Admit only ATen operators (and getitem on their tuple results) as call targets."""
    for node in ep.graph.nodes:
        target = node.target
        aten = isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
        if node.op not in ("placeholder", "output") and not (node.op == "call_function" and (aten or target is operator.getitem)):
            raise _refuse(path, f"graph node {node.name} calls {target!r}, which is not an ATen operator")


def save(gm: nn.Module, path: PathLike, example_inputs: Inputs = None) -> None:
    """Write a model from ``compile``/``prune``/``apply_plan``/``load`` to ``path`` (see the module docstring).

    A GraphModule's archive holds a program whose batch (and token sequence) dims are dynamic where the
    model allows; the record's ``"dims"`` says which, and why any is static. ``example_inputs`` defaults to random tensors of the shapes recorded in
    ``gm.meta["fxprune"]["inputs"]``; a model without that record needs them. A pruned module tree
    (a detector) is written as its record and weights.
    """
    record = gm.meta.get(keys.RECORD) if isinstance(getattr(gm, "meta", None), dict) else None
    if not isinstance(record, dict) or "plan" not in record:
        raise ArgumentError("save() takes a model returned by fxprune.compile, prune, apply_plan or load")
    if is_hf(gm):
        raise ArgumentError(f"save() was given a {type(gm).__name__}, a Hugging Face model whose config describes its pruned widths: "
                            f"save it with save_pretrained(dir) and load it with {type(gm).__name__}.from_pretrained(dir)")
    if example_inputs is None and "inputs" not in record:
        raise ArgumentError(f"save() needs example_inputs= to write {os.fspath(path)}: this model records no input shapes")
    inputs = inputs_from_specs(record["inputs"]) if example_inputs is None else pipeline.example_inputs(example_inputs)
    if not isinstance(gm, torch.fx.GraphModule):
        _write(path, _modules_archive(gm, {**record, "inputs": input_specs(inputs)}))
        return
    try:
        with _mode(gm, training=False):  # the archive holds the inference graph; load's train() switches it
            ep, dims = dynamic.export(gm, inputs)
    except Exception as e:  # export fails in many ways (guards, unsupported ops, wrong inputs)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArchiveError(f"{os.fspath(path)}: torch.export.export failed on the pruned model ({type(e).__name__}: {first}); "
                           "check that example_inputs= are inputs the model accepts") from e
    ep.example_inputs = None  # torch.export.save would pickle them, and load would unpickle them
    ep._guards_code = []  # code that load would compile; the loaded module checks its inputs' static dims itself
    out = io.BytesIO()
    torch.export.save(ep, out)
    record = {**record, "inputs": input_specs(inputs), "dims": dims}
    zf, root = _open(out.getvalue(), path)
    doc = {"format": FORMAT, "sha256": _digest(zf, root, record, path), "fxprune": record}
    with zipfile.ZipFile(out, "a") as archive:  # where torch.export.save(extra_files=) puts it, without saving twice
        archive.writestr(root + _RECORD, json.dumps(doc))
    _write(path, out.getvalue())


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in train or eval mode (``model.train``, which a result's graph ops follow) for the duration."""
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


def _write(path: PathLike, data: bytes) -> None:
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ArchiveError(f"{os.fspath(path)}: cannot write ({e.strerror}); choose a writable path") from e


def _modules_archive(model: nn.Module, record: dict[str, Any]) -> bytes:
    """The archive of a pruned module tree: its record and its state_dict (see the module docstring)."""
    # Copies: safetensors refuses tensors that share storage (tied weights); load_state_dict fills both again.
    weights = safetensors.torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    root, out = "model/", io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(root + _WEIGHTS, weights)
        doc = {"format": FORMAT, "kind": _MODULES, "class": f"{type(model).__module__}.{type(model).__qualname__}",
               "sha256": _digest(zf, root, record, "archive"), "fxprune": record}
        zf.writestr(root + _RECORD, json.dumps(doc))
    return out.getvalue()


def _verified(path: PathLike) -> tuple[bytes, zipfile.ZipFile, str, dict[str, Any]]:
    """The archive's bytes, zip, root and record document, once its entries and sha256 are checked."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ArchiveError(f"{os.fspath(path)}: cannot read ({e.strerror})") from e
    zf, root = _open(data, path)
    doc = _document(zf, root, path)
    (_check_modules_contents if doc.get("kind") == _MODULES else _check_contents)(zf, root, path)
    if _digest(zf, root, doc["fxprune"], path) != doc["sha256"]:
        raise _refuse(path, "its contents do not match the sha256 recorded when it was saved (modified or damaged)")
    return data, zf, root, doc


def read_record(path: PathLike) -> dict[str, Any]:
    """The checked ``meta["fxprune"]`` record of an archive from ``save``, without building its model."""
    return _verified(path)[3]["fxprune"]


def load(path: PathLike, model: nn.Module | None = None) -> nn.Module:
    """Read a model written by ``save``, with ``meta[keys.RECORD]`` restored. Never unpickles.

    A graph's archive gives a GraphModule in eval mode that takes any batch size the record's ``"dims"``
    allows, and trains: ``train()`` switches its batch-norm and dropout ops to training. A pruned module tree's (a detector's) needs ``model``, a
    fresh instance of the architecture it was pruned from (e.g. its factory with ``weights=None``): the
    plan is replayed on it and the saved weights loaded; that instance is not modified.
    """
    data, zf, root, doc = _verified(path)
    if doc.get("kind") == _MODULES:
        return _load_modules(zf, root, doc, path, model)
    if model is not None:
        raise ArgumentError(f"load({os.fspath(path)!r}, model=...): this archive holds the whole pruned graph; call load(path) alone")
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # whatever torch's deserializer raises on a program it cannot rebuild
        raise _refuse(path, f"torch.export.load failed ({type(e).__name__}: {e})") from e
    _check_graph(ep, path)
    program = ep.module()  # its train() and eval() raise NotImplementedError: a GraphModule of its own trains
    gm = DirectGraphModule(program, program.graph, "GraphModule")
    gm.eval()
    gm.meta[keys.RECORD] = doc["fxprune"]
    return gm


def _load_modules(zf: zipfile.ZipFile, root: str, doc: dict[str, Any], path: PathLike, model: nn.Module | None) -> nn.Module:
    """Replay the record's plan on ``model`` and load the archive's weights into the result."""
    if model is None:
        raise ArgumentError(f"{os.fspath(path)} holds a pruned {doc.get('class', 'module tree')}'s plan and weights, not a graph: "
                            "pass a fresh instance of the architecture it was pruned from, load(path, model=...), in Python "
                            "(the file names no factory, so the command line cannot build one)")
    pruned = _from_record(model, doc["fxprune"], None, False, os.fspath(path))
    try:
        weights = safetensors.torch.load(_read(zf, root + _WEIGHTS, path))
    except Exception as e:  # safetensors' own error types differ between releases
        raise _refuse(path, f"{_WEIGHTS} is not a safetensors file ({type(e).__name__}: {e})") from e
    try:
        pruned.load_state_dict(weights)
    except RuntimeError as e:
        raise PlanError(f"{os.fspath(path)}: the saved weights do not fit {type(model).__name__} pruned by the saved plan ({e}); "
                        "pass an instance built with the same arguments as the one that was pruned") from e
    pruned.meta[keys.RECORD] = doc["fxprune"]
    return pruned


def _fingerprint_mismatch(saved: Sequence[dict[str, Any]], now: Sequence[dict[str, Any]]) -> str | None:
    """How the first differing group differs, or None when the fingerprints match."""
    for gid, (a, b) in enumerate(itertools.zip_longest(saved, now)):
        if a == b:
            continue
        if a is None or b is None:
            return f"group {gid} exists only in {'this model' if a is None else 'the plan'}"
        differ = sorted(set(a["members"]) ^ set(b["members"]))
        if a["width"] != b["width"] or not differ:
            return f"group {gid} ({a['members'][0]}, ...) has width {a['width']} in the plan, {b['width']} here"
        side = "the plan" if differ[0] in a["members"] else "this model"
        return f"group {gid} ({a['members'][0]}, ...): member {differ[0]} is only in {side}"
    return None


def apply_plan(
    model: nn.Module,
    plan: Plan | Mapping[Any, Sequence[int]] | PathLike,
    example_inputs: Inputs = None,
    *,
    verify: bool = True,
) -> nn.Module:
    """Prune ``model``, a fresh instance of the architecture a plan was made for, as the plan says.

    ``plan`` is a ``Plan``, the dict in ``gm.meta["fxprune"]["plan"]``, or a file from ``save`` (only its
    JSON record is read; ``example_inputs`` then default to the recorded shapes). When the plan comes
    with a fingerprint, ``model``'s must match, else ``PlanError`` names the first differing group.
    """
    if isinstance(plan, (str, os.PathLike)):
        source = os.fspath(plan)
        zf, root = _open(source, source)
        with zf:
            record = _document(zf, root, source)["fxprune"]
        return _from_record(model, record, example_inputs, verify, source)
    return prune(model, plan, example_inputs, verify=verify)


def _from_record(model: nn.Module, record: dict[str, Any], example_inputs: Inputs, verify: bool, source: str) -> nn.Module:
    """``prune`` by a saved record's plan, once ``model``'s fingerprint matches the record's."""
    a = pipeline.analyze(model, inputs_from_specs(record["inputs"]) if example_inputs is None else example_inputs)
    fingerprint = record.get("fingerprint")
    mismatch = None if fingerprint is None else _fingerprint_mismatch(fingerprint, plan_fingerprint(a.deps))
    if mismatch:
        raise PlanError(f"the plan from {source} was made for another architecture than {type(model).__name__}: "
                        f"{mismatch}; apply it to a model built like the one it came from")
    return pipeline.apply_checked_plan(a, record["plan"], verify)
