"""The optimizer and the learning-rate schedule.

build_optimizer sorts the trainable parameters into groups, each with its learning rate as a
multiple of --lr ("lr_scale": the trainer sets every group's lr to schedule(step) x lr_scale, so
warmup and decay apply to every group alike):

    group              parameters                                          lr (0 = --lr)   decay
    muon               the blocks' 2-D weights: attention qkv/proj,         --muon_lr       yes
                       cross-attention, MLP up/down (--optimizer muon only)
    embeddings         the nn.Embedding tables (token, position, segment)   --embedding_lr  yes
    lm_head            the untied LM head (a tied one is the token table)   --lm_head_lr    yes
    objective's own    what the objective's lr_scales names (classify's     its own         yes
                       --head_lr, --layer_lr_decay; a block matrix among
                       them stays on Muon, at --muon_lr x its scale)
    everything else    AdamW: other matrices with decay, vectors (norm       --lr            matrices
                       gains, biases) without

With the defaults (--optimizer adamw, every lr 0) this is the one AdamW of before, with the same
two groups in the same order, so old checkpoints resume exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from minilm.config import auto_warmup
from minilm.errors import UserError
from minilm.muon import Muon

SCHEDULES = ("cosine", "linear", "constant", "wsd")


# ----------------------------------------------------------------------------- the schedule
def lr_at(step: int, cfg) -> float:
    """Linear warmup from 0 over warmup_steps, then decay to min_lr at max_steps: cosine, linear,
    constant (no decay) or wsd.

    wsd (warmup-stable-decay, the trapezoid; MiniCPM, Hu et al. 2024; modded-nanogpt's cooldown):
    after the warmup the lr stays at --lr, then falls linearly to min_lr over the last
    --decay_fraction (0.2) of max_steps. The long flat part keeps the lr high for most of the run;
    the short decay at the end gets the loss down that a cosine spreads over the whole run."""
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else auto_warmup(cfg.max_steps)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(warmup, cfg.max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    decay_steps = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise UserError(f"unknown --schedule {cfg.schedule!r}; use {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------- parameter groups
def muon_parameters(model: nn.Module) -> set[int]:
    """ids of the hidden matrices that Muon takes: the weights of the nn.Linear layers inside the
    Transformer blocks (attention qkv and proj, cross-attention, MLP up and down). Never an
    embedding, the LM head, an objective's head (all outside the blocks), a norm gain or a bias
    (not 2-D): Muon orthogonalizes a matrix's update, which means nothing for a lookup table whose
    rows are updated one token at a time, or for a vector (modded-nanogpt keeps them on Adam)."""
    from minilm.model import Block
    ids = set()
    for module in model.modules():
        if isinstance(module, Block):
            for sub in module.modules():
                if isinstance(sub, nn.Linear) and sub.weight.requires_grad:
                    ids.add(id(sub.weight))
    return ids


def lr_scales(model: nn.Module, cfg) -> dict[int, float]:
    """{id(parameter): its lr / --lr} for the parameters not at --lr: the embedding tables
    (--embedding_lr), the untied LM head (--lm_head_lr), then the objective's own (its
    lr_scales(lr), e.g. classify's --head_lr), which win."""
    scales: dict[int, float] = {}
    if getattr(cfg, "embedding_lr", 0):
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                scales[id(module.weight)] = cfg.embedding_lr / cfg.lr
    if getattr(cfg, "lm_head_lr", 0):
        for name, module in model.named_modules():
            if name.split(".")[-1] == "lm_head" and isinstance(module, nn.Linear):
                scales[id(module.weight)] = cfg.lm_head_lr / cfg.lr
    if hasattr(model, "lr_scales"):
        scales.update(model.lr_scales(cfg.lr))
    return scales


def adamw_groups(params: list, scales: dict[int, float], weight_decay: float) -> list[dict]:
    """Per lr scale (1.0 first, then ascending) a pair: matrices with weight decay, vectors
    without. The plain pair is always there, even empty (resume compatibility)."""
    groups = []
    for scale in [1.0] + sorted(set(scales.get(id(p), 1.0) for p in params) - {1.0}):
        chosen = [p for p in params if scales.get(id(p), 1.0) == scale]
        groups += [{"params": [p for p in chosen if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": [p for p in chosen if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return groups[:2] + [g for g in groups[2:] if g["params"]]


class MuonWithAdamW:
    """Muon on the hidden matrices, AdamW on the rest, stepped as one optimizer.

    Muon (Keller Jordan 2024; minilm/muon.py): SGD momentum (0.95, Nesterov), then each
    matrix's update replaced by an approximate orthogonalization of it (5 Newton-Schulz
    iterations), so every direction of the update moves by about the same amount instead of a
    few dominant ones taking it all. adjust_lr_fn "match_rms_adamw" (Moonshot, Liu et al. 2025)
    scales the lr by 0.2 sqrt(max(rows, cols)), which gives the update AdamW's RMS: --lr and
    --weight_decay carry over. The trainer sees one object: param_groups (Muon's first) for
    setting the lr, step, zero_grad, and a state_dict of both."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        """Muon's groups, then AdamW's: the same dicts, so an lr set here reaches them (a property:
        load_state_dict replaces each optimizer's list of groups)."""
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the checkpoint's optimizer is AdamW alone, this run's is --optimizer muon")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, cfg, device: torch.device):
    """AdamW (--optimizer adamw) or Muon + AdamW (--optimizer muon) over the groups of this
    module's docstring. A tied parameter appears once: named_parameters() deduplicates. Frozen
    parameters (requires_grad False) are left out."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    scales = lr_scales(model, cfg)
    # torch's fused AdamW: the whole update in one kernel per dtype and device (CUDA and CPU), not a
    # loop of foreach ops; other devices get torch's default
    fused = device.type in ("cuda", "cpu") or None
    if getattr(cfg, "optimizer", "adamw") == "adamw":
        groups = adamw_groups(params, scales, cfg.weight_decay)
        _check_groups(model, groups)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if getattr(cfg, "fsdp", False):
        raise UserError("--optimizer muon orthogonalizes whole matrices, and --fsdp shards them; "
                        "drop --fsdp (DDP works) or use --optimizer adamw")
    hidden = muon_parameters(model)
    muon_scale = (cfg.muon_lr or cfg.lr) / cfg.lr
    # a block matrix the objective gives its own lr (classify's --layer_lr_decay) stays on Muon, at
    # --muon_lr times that scale: one Muon group per scale, the plain one first (even empty)
    block_scales = [1.0] + sorted({scales.get(id(p), 1.0) for p in params if id(p) in hidden} - {1.0})
    muon_groups = [{"params": [p for p in params if id(p) in hidden and scales.get(id(p), 1.0) == scale],
                    "weight_decay": cfg.weight_decay, "lr_scale": muon_scale * scale, "muon": True}
                   for scale in block_scales]
    groups = adamw_groups([p for p in params if id(p) not in hidden], scales, cfg.weight_decay)
    _check_groups(model, muon_groups + groups)
    muon = Muon(muon_groups, lr=cfg.lr, momentum=cfg.muon_momentum)
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return MuonWithAdamW(muon, adamw)


def _check_groups(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters() if p.requires_grad}), \
        "every trainable parameter must be in exactly one optimizer group"


def describe_groups(model: nn.Module, optimizer, lr: float) -> list[str]:
    """One line per non-empty group: its optimizer, how many tensors and parameters, its peak lr,
    its weight decay; printed once at the start of a run."""
    names = {id(p): n for n, p in model.named_parameters()}
    lines = []
    for group in optimizer.param_groups:
        if not group["params"]:
            continue
        kind = "muon" if group.get("muon") else "adamw"
        n = sum(p.numel() for p in group["params"])
        first = names.get(id(group["params"][0]), "?")
        lines.append(f"  {kind:5s} {len(group['params']):3d} tensors {n:>11,} parameters  lr "
                     f"{lr * group.get('lr_scale', 1.0):.3g}  weight_decay {group['weight_decay']:g}  (e.g. {first})")
    return lines
