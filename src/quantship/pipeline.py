"""Orchestration: find targets -> run the method -> swap modules -> write the artifact."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats.grid import QuantizedWeight
from .formats.linear import QuantLinear
from .formats.scheme import Scheme
from .memory import HeapTrimmer, reclaiming_memory
from .methods.registry import get_method
from .models.arch import ArchFacts, arch_facts, is_transposed
from .specs import QuantSpec


@dataclass
class QuantResult:
    model: nn.Module
    tokenizer: object
    spec: QuantSpec
    source: Path
    modules: dict[str, dict] = field(default_factory=dict)  # per-module format table
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None
    method_params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # method reports (e.g. per-block peak RSS)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or a transformers Conv1D (stored transposed)."""
    return module.weight.detach().t() if is_transposed(module) else module.weight.detach()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, facts: ArchFacts, spec: QuantSpec) -> dict[str, nn.Module]:
    """Linear layers of the decoder blocks (plus lm_head with quantize_head), minus --ignore matches."""
    blocks = model.get_submodule(facts.blocks)
    linear_types = facts.linear_types()
    targets: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if rel and isinstance(module, linear_types):
                targets[f"{facts.blocks}.{i}.{rel}"] = module
    if spec.quantize_head:
        head = model.get_output_embeddings()
        head_name = next(n for n, m in model.named_modules() if m is head)
        targets[head_name] = head
    patterns = [re.compile(p) for p in spec.ignore]
    return {n: m for n, m in targets.items() if not any(p.search(n) for p in patterns)}


def check_scheme_fits(targets: dict[str, nn.Module], scheme: Scheme) -> None:
    for name, module in targets.items():
        out_f, in_f = linear_weight(module).shape
        if scheme.granularity == "group" and in_f % scheme.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_f % g == 0]
            raise ValueError(
                f"scheme {scheme.name}: group size {scheme.group_size} does not divide in_features={in_f} "
                f"of layer {name}; choose a group size that divides it (e.g. {', '.join(map(str, divisors)) or '32'})"
            )


def quantize_model(model: nn.Module, tokenizer, spec: QuantSpec, *, source: Path, progress: bool = True,
                   calib=None, reclaim_memory: bool = False) -> QuantResult:
    """Quantize `model` in place according to `spec` and return the swapped model + format table.

    reclaim_memory: hand the float weights' pages back to the OS as layer-by-layer calibration
    finishes with them, and map large allocations separately (memory.reclaiming_memory): lower
    peak RSS for a one-shot process, at the price of process-wide allocator settings. The torch
    RNG is seeded with spec.seed inside and restored on return."""
    facts = arch_facts(model.config.model_type)
    scheme = spec.parsed_scheme
    method = get_method(spec.method)
    params = method.make_params(spec.params)
    method.check_scheme(scheme)  # names what the method takes and which methods take the scheme
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {method.name!r} needs calibration data (--calib)")
    targets = find_targets(model, facts, spec)
    if not targets:
        raise ValueError("no layer to quantize: every target matched --ignore")
    check_scheme_fits(targets, scheme)

    with reclaiming_memory(reclaim_memory), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _quantize_targets(model, tokenizer, spec, source, method, params, scheme, targets, calib, progress)


def _quantize_targets(model, tokenizer, spec, source, method, params, scheme, targets, calib, progress) -> QuantResult:
    result = QuantResult(model, tokenizer, spec, source, method_params=_params_dict(params))
    started = time.perf_counter()
    # glibc keeps freed per-layer temporaries (MBs each, interleaved with the kept codes) as heap:
    # w3g64 RTN peaked at 1192-1443 MiB over identical runs without trimming, 875-892 MiB trimming
    # after every layer (but 3.4 s -> 9-21 s); the trimmer trims only once RSS has grown 128 MiB
    trim = HeapTrimmer()
    if method.quantize_weight is not None:
        for name, module in tqdm(list(targets.items()), desc=f"{method.name} {scheme.name}", disable=not progress):
            qw = method.quantize_weight(linear_weight(module), scheme, params)
            _swap(model, name, module, qw, result)
            trim()
    else:
        def swap_now(name: str, qw: QuantizedWeight) -> None:
            _swap(model, name, model.get_submodule(name), qw, result)
            trim()

        stream = {"on_quantized": swap_now} if method.streams else {}
        chosen = method.run(model, targets, scheme, params, calib, progress=progress, report=result.extra, **stream)
        for name in [n for n in targets if n in chosen]:
            swap_now(name, chosen.pop(name))
        missing = [n for n in targets if n not in result.modules]
        if missing:
            raise RuntimeError(f"method {method.name!r} returned no quantized weight for {missing[:3]}")
    if spec.quantize_head and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head is quantized, the embedding stays float
    result.timings["quantize_s"] = round(time.perf_counter() - started, 3)
    return result


def _swap(model: nn.Module, name: str, module: nn.Module, qw: QuantizedWeight, result: QuantResult) -> None:
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    dtype = linear_weight(module).dtype
    layer = QuantLinear.from_quantized(qw, bias, dtype=dtype)
    set_submodule(model, name, layer)
    out_f, in_f = qw.codes.shape
    result.modules[name] = {
        "format": qw.scheme.kind,
        "scheme": qw.scheme.name,
        "shape": [out_f, in_f],
        "bias": bias is not None,
        "bits_per_weight": round(qw.scheme.bits_per_weight(out_f, in_f), 4),
        "storage_bytes": layer.storage_bytes(),
    }


def _params_dict(params) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(params) if is_dataclass(params) else dict(params)
