"""How much each layer group costs at each rung: the loss a mix is predicted from.

Groups: the linears that read the same input (the architecture table's norm -> linears groups:
q/k/v of a block, gate/up of a block) are one group, every other linear (o_proj, down_proj) its
own; a group takes one scheme. On SmolLM2-135M that is 4 groups per block, 120 in all.

The loss of a group at a rung is the mean per-token KL(P_float || P_quantized) of the model's
next-token distribution on the calibration tokens when ONLY that group is quantized to that rung.

- `kld` (measured): swap the group's dequantized weights in, run the model, restore; one forward
  per group x rung against the float log-probs computed once (`Reference`).
- `fisher` (proxy, the default): KL(P || P_θ+Δ) ≈ ½ Δᵀ F Δ with F the Fisher information of the
  model's own next-token distribution. Its diagonal is estimated from squared gradients of
  log p(y) with y SAMPLED from the model, one backward per calibration sequence (cross-token terms
  have zero mean because each y is drawn from the model given its context), so every group x rung
  costs one weight quantization and a dot product: ½ Σ F ⊙ (W - Q(W))² / tokens. On the default
  model it ranks group x rung losses as the measured KLD does (the rank correlation is in
  docs/results/search.md).
Methods without a per-weight quantizer (GPTQ, AWQ) are measured with RTN: their own errors need
calibration statistics per layer; the loop then measures the real mix with the real method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..formats.scheme import Scheme
from ..models.arch import arch_facts, is_transposed

from .spec import SENSITIVITIES  # noqa: E402,F401


@dataclass(frozen=True)
class Group:
    name: str  # e.g. "model.layers.3.self_attn.q_proj+k_proj+v_proj"
    layers: tuple[str, ...]  # full module names
    weights: int  # weight count


def layer_groups(model: nn.Module, targets: dict[str, nn.Module]) -> list[Group]:
    """Targets grouped by shared input (architecture table), in model order; leftovers are singletons."""
    facts = arch_facts(model.config.model_type)
    prefix = re.compile(rf"^{re.escape(facts.blocks)}\.(\d+)\.(.+)$")
    shared = [g.linears for g in facts.groups if len(g.linears) > 1]
    groups: list[Group] = []
    seen: set[str] = set()
    for name in targets:
        if name in seen:
            continue
        m = prefix.match(name)
        members = (name,)
        if m:
            for linears in shared:
                if m[2] in linears:
                    members = tuple(f"{facts.blocks}.{m[1]}.{rel}" for rel in linears
                                    if f"{facts.blocks}.{m[1]}.{rel}" in targets)
                    break
        seen.update(members)
        label = members[0] if len(members) == 1 else \
            members[0].rsplit(".", 1)[0] + "." + "+".join(n.rsplit(".", 1)[1] for n in members)
        groups.append(Group(label, members, sum(_weight(targets[n]).numel() for n in members)))
    return groups


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().t() if is_transposed(module) else module.weight.detach()


def group_bits(group: Group, targets: dict[str, nn.Module], scheme: Scheme) -> int | None:
    """Stored bits of a group at a scheme; None when the scheme cannot store one of its layers."""
    bits = 0
    for name in group.layers:
        out_f, in_f = _weight(targets[name]).shape
        if scheme.granularity == "group" and in_f % scheme.group_size:
            return None
        bits += scheme.storage_bits(out_f, in_f)
    return bits


class Reference:
    """The float model's next-token log-probs on the calibration tokens, computed once."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 4):
        self.tokens, self.batch_size = tokens, batch_size
        self.logp = [_logprobs(model, tokens[i: i + batch_size]) for i in range(0, len(tokens), batch_size)]

    @torch.inference_mode()
    def kld(self, model: nn.Module) -> float:
        """Mean per-token KL(P_float || P_model) over every position of the calibration tokens."""
        total, count = 0.0, 0
        for i, ref in zip(range(0, len(self.tokens), self.batch_size), self.logp):
            logq = _logprobs(model, self.tokens[i: i + self.batch_size])
            kl = (ref.exp() * (ref - logq)).sum(-1).clamp_min(0.0)  # (B, T)
            total += float(kl.sum())
            count += kl.numel()
        return total / count


@torch.inference_mode()
def _logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)  # (B, T, V)


def dequantized(module: nn.Module, scheme: Scheme, quantize_weight, params) -> torch.Tensor:
    """The module's weight as the rung stores it, in the module's own layout and dtype."""
    w = _weight(module)
    deq = quantize_weight(w, scheme, params).dequantize().to(w.dtype)
    return deq.t().contiguous() if is_transposed(module) else deq


@torch.inference_mode()
def kld_table(model, targets, groups: list[Group], rungs: list[Scheme], reference: Reference, quantize_weight,
              params, *, progress: bool = True) -> list[list[float | None]]:
    """Measured loss[g][r]: the KLD with only group g at rung r (other weights float)."""
    table = []
    for group in tqdm(groups, desc="sensitivity (measured KLD)", disable=not progress):
        row = []
        for scheme in rungs:
            if group_bits(group, targets, scheme) is None:
                row.append(None)
                continue
            saved = {n: targets[n].weight.data for n in group.layers}
            try:
                for n in group.layers:
                    targets[n].weight.data = dequantized(targets[n], scheme, quantize_weight, params)
                row.append(reference.kld(model))
            finally:
                for n, w in saved.items():
                    targets[n].weight.data = w
        table.append(row)
    return table


def fisher_diagonal(model: nn.Module, targets: dict[str, nn.Module], tokens: torch.Tensor, *, seed: int = 0,
                    progress: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Per target weight: Σ over sequences of (∂ Σ_t log p(y_t) / ∂W)², y_t ~ P_model. -> (F, tokens)."""
    params = {n: m.weight for n, m in targets.items()}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for seq in tqdm(tokens, desc="sensitivity (Fisher)", disable=not progress):
            logits = model(input_ids=seq[None], use_cache=False).logits[0].float()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # (T, 1) drawn from the model
            grads = torch.autograd.grad(logp.gather(-1, y).sum(), list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                fisher[n] += g.float().pow(2)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
    return fisher, int(tokens.numel())


@torch.no_grad()
def fisher_table(targets, groups: list[Group], rungs: list[Scheme], fisher: dict[str, torch.Tensor], tokens: int,
                 quantize_weight, params) -> list[list[float | None]]:
    """Proxy loss[g][r] = ½ Σ_layers Σ F ⊙ (W - Q_r(W))² / tokens (nats per token, as the KLD)."""
    table = []
    for group in groups:
        row = []
        for scheme in rungs:
            if group_bits(group, targets, scheme) is None:
                row.append(None)
                continue
            loss = 0.0
            for n in group.layers:
                delta = targets[n].weight.detach().float() - dequantized(targets[n], scheme, quantize_weight,
                                                                          params).float()
                loss += 0.5 * float((fisher[n] * delta.pow(2)).sum()) / tokens
            row.append(loss)
        table.append(row)
    return table
