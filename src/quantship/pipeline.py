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
from .formats.scheme import Scheme, parse_scheme
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


def assign_schemes(targets: dict[str, nn.Module], spec: QuantSpec) -> dict[str, Scheme]:
    """Each target's scheme: the last override whose regex is found in its full name, else the
    default. An override that matches no target is an error naming it."""
    for pattern, scheme in spec.overrides:
        if not any(re.search(pattern, name) for name in targets):
            kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in targets}))
            raise ValueError(f"--override {pattern}={scheme} matches no layer to quantize (the regex is searched in "
                             f"each layer's full name, e.g. {next(iter(targets))}; the layers here end in {kinds}; "
                             f"--ignore'd layers are not targets)")
    return {name: spec.scheme_for(name) for name in targets}


def override_of(spec: QuantSpec, name: str) -> str | None:
    """The `REGEX=SCHEME` override that decided `name`'s scheme, or None (the default)."""
    chosen = None
    for pattern, scheme in spec.overrides:
        if re.search(pattern, name):
            chosen = f"{pattern}={scheme}"
    return chosen


def check_scheme_fits(targets: dict[str, nn.Module], schemes: dict[str, Scheme] | Scheme,
                      spec: QuantSpec | None = None) -> None:
    """Every layer's group size divides its input width; the error names the layer (and the
    override that gave it its scheme)."""
    for name, module in targets.items():
        scheme = schemes[name] if isinstance(schemes, dict) else schemes
        out_f, in_f = linear_weight(module).shape
        if scheme.granularity == "group" and in_f % scheme.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_f % g == 0]
            origin = override_of(spec, name) if spec is not None else None
            origin = f" (from --override {origin})" if origin else ""
            raise ValueError(
                f"scheme {scheme.name}{origin}: group size {scheme.group_size} does not divide in_features={in_f} "
                f"of layer {name}; choose a group size that divides it (e.g. {', '.join(map(str, divisors)) or '32'})"
            )


def plan_schemes(model: nn.Module, spec: QuantSpec):
    """Validate `spec` against `model` before any work: the method and its params, the targets,
    each target's scheme (overrides that match nothing, groups that do not divide a layer, schemes
    the method does not take). -> (method, params, targets, {target name: Scheme})."""
    facts = arch_facts(model.config.model_type)
    method = get_method(spec.method)
    params = method.make_params(spec.params)
    method.check_scheme(spec.parsed_scheme, params)  # names what the method takes and which methods take the scheme
    for pattern, scheme in spec.overrides:
        method.check_scheme(parse_scheme(scheme), params, override=f"{pattern}={scheme}")
    targets = find_targets(model, facts, spec)
    if not targets:
        raise ValueError("no layer to quantize: every target matched --ignore")
    schemes = assign_schemes(targets, spec)
    check_scheme_fits(targets, schemes, spec)
    return method, params, targets, schemes


def schemes_label(schemes: dict[str, Scheme]) -> str:
    """'w4g64' or 'w4g64+w8': the distinct schemes, most layers first (progress bars, reports)."""
    counts: dict[str, int] = {}
    for scheme in schemes.values():
        counts[scheme.name] = counts.get(scheme.name, 0) + 1
    return "+".join(sorted(counts, key=lambda n: -counts[n]))


def quantize_model(model: nn.Module, tokenizer, spec: QuantSpec, *, source: Path, progress: bool = True,
                   calib=None, reclaim_memory: bool = False) -> QuantResult:
    """Quantize `model` in place according to `spec` and return the swapped model + format table.

    reclaim_memory: hand the float weights' pages back to the OS as layer-by-layer calibration
    finishes with them, and map large allocations separately (memory.reclaiming_memory): lower
    peak RSS for a one-shot process, at the price of process-wide allocator settings. The torch
    RNG is seeded with spec.seed inside and restored on return."""
    method, params, targets, schemes = plan_schemes(model, spec)
    if method.needs_calibration and calib is None:
        raise ValueError(f"method {method.name!r} needs calibration data (--calib)")

    with reclaiming_memory(reclaim_memory), torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _quantize_targets(model, tokenizer, spec, source, method, params, schemes, targets, calib, progress)


def _quantize_targets(model, tokenizer, spec, source, method, params, schemes, targets, calib, progress) -> QuantResult:
    result = QuantResult(model, tokenizer, spec, source, method_params=_params_dict(params))
    started = time.perf_counter()
    # glibc keeps freed per-layer temporaries (MBs each, interleaved with the kept codes) as heap:
    # w3g64 RTN peaked at 1192-1443 MiB over identical runs without trimming, 875-892 MiB trimming
    # after every layer (but 3.4 s -> 9-21 s); the trimmer trims only once RSS has grown 128 MiB
    trim = HeapTrimmer()
    if method.quantize_weight is not None:
        for name, module in tqdm(list(targets.items()), desc=f"{method.name} {schemes_label(schemes)}",
                                 disable=not progress):
            qw = method.quantize_weight(linear_weight(module), schemes[name], params)
            _swap(model, name, module, qw, result)
            trim()
    else:
        def swap_now(name: str, qw: QuantizedWeight) -> None:
            _swap(model, name, model.get_submodule(name), qw, result)
            trim()

        stream = {"on_quantized": swap_now} if method.streams else {}
        chosen = method.run(model, targets, schemes, params, calib, progress=progress, report=result.extra, **stream)
        for name in [n for n in targets if n in chosen]:
            swap_now(name, chosen.pop(name))
        missing = [n for n in targets if n not in result.modules]
        if missing:
            raise RuntimeError(f"method {method.name!r} returned no quantized weight for {missing[:3]}")
        wrong = [n for n in targets if result.modules[n]["scheme"] != schemes[n].name]
        if wrong:
            raise RuntimeError(f"method {method.name!r} quantized {wrong[0]} as {result.modules[wrong[0]]['scheme']}, "
                               f"not its scheme {schemes[wrong[0]].name}")
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
