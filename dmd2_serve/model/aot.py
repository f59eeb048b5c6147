"""Ahead-of-time compiled modules (``--backend aoti``): torch.export + AOTInductor packages on disk.

``torch.compile`` keeps Inductor's generated code in its cache, but a new process still traces
every module with Dynamo before it can look the code up: on our CPU the SD1.5 UNet's first call
with a warm cache cost 9.0 s more than the next (1.1-1.5 s with this backend), and on an H200 the
warm start to the first image was 34.1 s.
This backend compiles the same Inductor code ahead of time instead. Each module (the UNet, the
VAE decoder) is exported with ``torch.export`` for one class of inputs (a batch of one, or every
batch of two and more with the batch dimension symbolic, as ``compile`` marks it), compiled by
AOTInductor into a package (``.pt2``: a shared library and its kernels) *without* the weights,
and kept in ``cache_dir/aoti``. A later start with the same architecture, weight layout, inputs,
device and library versions loads that package and hands it the module's own weight tensors (no
copy): nothing is traced or compiled, and one package serves every fine-tune of an architecture.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .errors import BackendError, described

Signature = tuple[Any, ...]
# What this file writes into a package and beside it; a change of either makes old packages unseen.
PACKAGE_FORMAT = 1


def aot_compile_in_place(module: nn.Module, cache_dir: Path, autotune: bool = False, dynamic_batch: bool = True,
                         say: Callable[[str], None] | None = None) -> AOTCompiled:
    """Make ``module(...)`` run AOTInductor packages (see :class:`AOTCompiled`); returns the runner."""
    runner = AOTCompiled(module, cache_dir / "aoti", autotune, dynamic_batch, say or _stderr)
    module._compiled_call_impl = runner
    return runner


class AOTCompiled:
    """A module's calls, run by the AOTInductor package of their input class, built on first need.

    Calls are grouped by their inputs' signature (the tree of arguments; each tensor's shape,
    dtype, device and layout), with the batch size left out for batches of two and more when
    ``dynamic_batch`` (one package serves them all; a batch of one gets its own, as diffusers
    specialises on it). A group's first call loads its package from ``folder``, or exports and
    compiles it there first (minutes for a real UNet). Where ``torch.export`` cannot make the
    batch symbolic, the module warns and builds a package per batch size instead.
    """

    def __init__(self, module: nn.Module, folder: Path, autotune: bool, dynamic_batch: bool,
                 say: Callable[[str], None]) -> None:
        self.module, self.folder, self.autotune, self.dynamic_batch, self.say = (
            module, folder, autotune, dynamic_batch, say)
        self.description: dict[str, Any] | None = None  # the module's side of every key, made on the first call
        self.packages: dict[Signature, Callable[..., Any]] = {}
        self.built: list[Path] = []  # packages this process compiled (the rest were loaded)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = batch_inputs(args, kwargs)[0]
        dynamic = self.dynamic_batch and batch > 1
        signature = _signature(args, kwargs, batch if dynamic else None)
        if signature not in self.packages:
            try:
                self.packages[signature] = self._load_or_build(args, kwargs, batch, dynamic)
            except _DynamicExportFailed as e:
                warnings.warn(f"torch.export could not export {type(self.module).__name__} with a dynamic batch"
                              f" ({e}); compiling it once per batch size instead", stacklevel=2)
                self.dynamic_batch = False
                return self(*args, **kwargs)
        return self.packages[signature](*args, **kwargs)

    def _load_or_build(self, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int,
                       dynamic: bool) -> Callable[..., Any]:
        if self.description is None:
            self.description = describe_module(self.module, self.autotune)
        key = {**self.description, "inputs": _signature_json(args, kwargs, batch if dynamic else None),
               "dynamic_batch": dynamic}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        name, inputs = type(self.module).__name__, "batch 2+" if dynamic else f"batch {batch}"
        path = self.folder / f"{name}-{'bN' if dynamic else f'b{batch}'}-{digest}.pt2"
        t0 = time.perf_counter()
        if not path.exists():
            try:
                program = _export(self.module, args, kwargs, dynamic)
            except Exception as e:
                if not dynamic:
                    raise
                raise _DynamicExportFailed(described(e)) from e
            _package(program, path, key, self.autotune)
            self.built.append(path)
            self.say(f"aoti: compiled {name} ({inputs}) in {time.perf_counter() - t0:.0f} s: {path}")
            t0 = time.perf_counter()
        compiled = load_package(path, self.module)
        self.say(f"aoti: loaded {name} ({inputs}) in {time.perf_counter() - t0:.1f} s from {path}")
        return compiled


class _DynamicExportFailed(Exception):
    """``torch.export`` could not make the batch dimension symbolic."""


def describe_module(module: nn.Module, autotune: bool) -> dict[str, Any]:
    """What a package depends on besides its inputs: the module's code and structure, every weight's
    name, shape, dtype and strides (so channels-last and fused projections count), its attention
    processors, the device and the library versions."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    device = tensors[0][1].device if tensors else torch.device("cpu")
    return {
        "format": PACKAGE_FORMAT,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "structure": hashlib.sha256(repr(module).encode()).hexdigest(),
        "weights": [[name, list(t.shape), str(t.dtype), list(t.stride())] for name, t in tensors],
        "processors": sorted({type(m.processor).__name__ for m in module.modules() if hasattr(m, "processor")}),
        "device": _device_name(device),
        "versions": {name: _version(name) for name in ("torch", "triton", "diffusers", "dmd2-fast")},
        "inductor": {"autotune": autotune, "conv_1x1_as_mm": bool(torch._inductor.config.conv_1x1_as_mm)},
    }


def _export(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool) -> Any:
    """``torch.export`` of ``module`` (its plain forward, not this wrapper), the leading dimension of
    every batch-sized tensor input symbolic when ``dynamic``; refuses a batch that came out fixed."""
    shapes = None
    if dynamic:
        collection = torch.export.ShapesCollection()
        for x in batch_inputs(args, kwargs)[1]:
            collection[x] = {0: torch.export.Dim.DYNAMIC}
        shapes = collection.dynamic_shapes(module, args, kwargs)
    wrapper, module._compiled_call_impl = module._compiled_call_impl, None
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)
    finally:
        module._compiled_call_impl = wrapper
        for x in pytree.tree_leaves((args, kwargs)):  # a failed export leaves its marks on the inputs
            for mark in [name for name in getattr(x, "__dict__", {}) if name.startswith("_dynamo_")]:
                delattr(x, mark)
    if dynamic:
        user = set(program.graph_signature.user_inputs)
        first = next(n.meta["val"] for n in program.graph.nodes
                     if n.op == "placeholder" and n.name in user and getattr(n.meta.get("val"), "ndim", 0))
        if not isinstance(first.shape[0], torch.SymInt):
            raise BackendError(f"the batch dimension of {type(module).__name__} came out fixed in the export")
    return program


def _package(program: Any, path: Path, key: dict[str, Any], autotune: bool) -> None:
    """AOTInductor-compile ``program`` into ``path`` without its weights, written whole or not at all,
    with a readable ``.json`` beside it: what it was built for and the weights it reads.

    Inductor inlines small 1-D constants (a bias of 8 or fewer values: the UNet's and the decoder's
    last convolutions) as literals unless told to keep every one; a package that did would run
    the weights of the model it was built from, so each new package is checked before it is kept.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
    if autotune:
        options.update(max_autotune=True, coordinate_descent_tuning=True)
    weights = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
    # export lifts every parameter; the graph reads fewer (q, k and v are unused once fused)
    reads = sorted({weights[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.name in weights
                    and n.users})
    partial = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
        kept = sorted(torch._inductor.aoti_load_package(str(partial)).get_constant_fqns())
        if kept != reads:
            raise BackendError(f"AOTInductor kept weights inside the package of {path.name.split('-')[0]} (it takes"
                               f" {len(kept)} of the {len(reads)} it reads from outside, e.g."
                               f" {sorted(set(reads) ^ set(kept))[:2]}): it would not follow the model's own weights;"
                               " use --backend compile with this PyTorch")
        summary = {k: v for k, v in key.items() if k != "weights"} | {"weights": len(key["weights"]), "reads": reads}
        path.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_package(path: Path, module: nn.Module) -> Callable[..., Any]:
    """The package at ``path``, running on ``module``'s own weight tensors (shared, not copied)."""
    fix = "delete it and start again to rebuild it"
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    try:
        reads = json.loads(path.with_suffix(".json").read_text())["reads"]
        # single-threaded: the runtime's multi-threaded container synchronises in ways a CUDA-graph
        # capture does not allow ("operation not permitted when stream is capturing", pytorch#148601)
        compiled = torch._inductor.aoti_load_package(str(path), run_single_threaded=True,
                                                     device_index=device.index if device.index is not None else -1)
    except Exception as e:
        raise BackendError(f"could not load the compiled package {path} ({described(e)}); {fix}") from e
    wanted = compiled.get_constant_fqns()
    if sorted(wanted) != sorted(reads) or any(name not in tensors for name in wanted):
        raise BackendError(f"the compiled package {path} does not take the weights of this"
                           f" {type(module).__name__} ({len(wanted)} of them, {len(reads)} recorded); {fix}")
    compiled.load_constants({name: tensors[name].detach() for name in wanted}, check_full_update=True,
                            user_managed=True)
    return compiled


def batch_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, list[Tensor]]:
    """A call's batch size, the leading dimension of its first tensor input (1 without one), and every
    tensor input (nested ones too) with that leading dimension."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if torch.is_tensor(x) and x.ndim]
    batch = tensors[0].shape[0] if tensors else 1
    return batch, [x for x in tensors if x.shape[0] == batch]


def _leaf(x: Any, batch: int | None) -> Any:
    if not torch.is_tensor(x):
        return repr(x)
    shape = tuple("B" if i == 0 and batch is not None and n == batch else n for i, n in enumerate(x.shape))
    if x.is_contiguous():
        layout = "contiguous"
    elif x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layout = "channels_last"
    else:
        layout = str(x.stride())
    return (shape, str(x.dtype), x.device.type, layout)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int | None) -> Signature:
    """A hashable summary of a call's inputs; the batch size left out (``"B"``) when ``batch`` is given."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec), *(_leaf(x, batch) for x in leaves))


def _signature_json(args: tuple[Any, ...], kwargs: dict[str, Any], batch: int | None) -> list[Any]:
    return json.loads(json.dumps(_signature(args, kwargs, batch), default=str))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return device.type


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
