"""AdaLoRA: SVD-form low-rank adaptation with a rank budget reallocated during training.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512. Each adapted weight ``W`` (out x in) gets an update in SVD form::

    delta W = B diag(E) A * s / (init_r + 1e-5)      A: (r, in) right vectors, E: (r, 1) values, B: (out, r)

with ``s = lora_alpha`` (``r`` when ``lora_alpha <= 0``), ``r = init_r`` at the start. ``E`` starts
at 0 (``A``, ``B`` ~ N(0, 0.02)), so the model starts as the base model exactly. During training
(:class:`AdaLoraHook`, run by the one training loop through :class:`deltatune.inject.TrainHook`):

* every step adds ``orth_reg_weight * mean(||A A^T - I||_F, ||B^T B - I||_F)`` over all the
  adapter's matrices to the loss (the orthogonality regulariser);
* after every optimizer step (0-based ``step``), while ``step < total_step - tfinal``, each entry's
  sensitivity ``|p * grad|`` is smoothed (EMA ``beta1``) with its uncertainty (EMA ``beta2``); the
  budget is ``init_r * n`` up to ``tinit``, then falls cubically to ``target_r * n`` at
  ``total_step - tfinal`` (``n``: adapted matrices); every ``deltaT`` steps the triplets
  (``A`` row, ``E`` value, ``B`` column) with the lowest scores are pruned by zeroing their ``E``
  value, to fit the budget. At ``step == total_step - tfinal`` the final mask is fixed; later steps
  keep it. The kept triplets are ``config.rank_pattern``: ``{"<module path>.lora_E": [bool] * init_r}``.

The file is PEFT's: ``rank_pattern`` in ``adapter_config.json`` and, per layer, ``lora_A``,
``lora_B``, ``lora_E`` cut to the kept triplets (``base_model.model.<path>.lora_A``...; PEFT's
constant ``ranknum`` is not saved). A config with a ``rank_pattern`` builds each layer at its kept
rank, as peft does when loading. Linear layers (nn.Linear, transformers Conv1D, 4-bit linears) and
nn.Conv2d (``A``: (r, in * kh * kw), groups 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import AdapterRecord, compute_dtype, module_device, resolve_dtype
from ..routing import attach, iter_adapter_modules
from ..config import register_config
from ..inject import register_method
from .common import check_kind, check_zero_padding, conv_apply, finish_inject, resolve_targets
from .lora import LoraConfig, _check_supported

SCHEDULE_FIELDS = frozenset({"target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                             "total_step"})


@register_config
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA configuration, field for field as Hugging Face PEFT's ``AdaLoraConfig`` (which extends
    ``LoraConfig``: ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``bias``, ``modules_to_save``...
    keep LoRA's meaning; ``r`` is not used, ``init_r`` is the starting rank).

    Fields:
        target_r: average rank the budget ends at (per adapted matrix). Default 8.
        init_r: starting rank of every matrix. Default 12.
        tinit: steps before pruning starts. tfinal: steps at the end with the rank pattern fixed.
        deltaT: steps between two budget allocations. Default 1.
        beta1, beta2: EMA factors of sensitivity and uncertainty. Default 0.85 each.
        orth_reg_weight: weight of the orthogonality regulariser (>= 0). Default 0.5.
        total_step: optimizer steps of the training run (required, > 0; when deltatune's loop runs
            another number of steps, the schedule is scaled to it, with a warning: :class:`AdaLoraHook`).
        rank_pattern: the kept triplets per matrix (set by training; module docstring).
        init_lora_weights: True: ``E = 0``, ``A, B ~ N(0, 0.02)``; False: all ~ N(0, 1).

    Raises:
        ValueError: ``use_dora``, a missing or non-positive ``total_step``, negative
            ``orth_reg_weight``, or a schedule without a pruning phase (``tinit >= total_step - tfinal``).
    """

    PEFT_TYPE = "ADALORA"
    neutral_fields = LoraConfig.neutral_fields | SCHEDULE_FIELDS

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA (use_dora=True)")
        if self.extra.get("loftq_config"):
            raise ValueError("ADALORA does not support LoftQ (loftq_config)")
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA needs total_step > 0: the number of optimizer steps of the training run")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no "
                             "budgeting phase: decrease tfinal/tinit or increase total_step")
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1!r}, {self.beta2!r}")
        if self.r != 8:  # after the errors: a config that fails says one thing
            warnings.warn("r is not used by AdaLoRA: init_r is its starting rank", stacklevel=3)


class AdaLoraAdapter(nn.Module):
    """One AdaLoRA update on one host (module docstring).

    Parameters (adapter dtype, PEFT's names): ``lora_A`` (r, in * prod(k)), ``lora_E`` (r, 1),
    ``lora_B`` (out, r); ``r`` is ``init_r`` or the layer's kept rank (0 allowed: no update).
    Called as ``adapter(x, out, call) -> out + (dropout(x) @ (A * E)^T @ B^T) * s / (init_r + 1e-5)``
    (a convolution host runs its own geometry with the reshaped ``delta W``).

    Raises:
        TypeError: the host is not a linear layer or nn.Conv2d. ValueError: a grouped convolution.
    """

    side = "output"
    merge_error = None
    uses_base_output = False
    supports_inplace = False
    composes = "add"
    # lora_A / lora_B are singular vectors held near orthonormal by the regulariser: decaying them
    # towards 0 fights it; lora_E (singular values) is neutral at 0 and decays
    no_decay = ("lora_A", "lora_B")

    def __init__(self, host: nn.Module, name: str, r: int, config: AdaLoraConfig,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        kind = check_kind(host, name, "AdaLoRA", ("linear-like", "conv2d"))
        self.kind, self.linear_like = kind.name, kind.linear_like
        fin, fout = kind.in_features(host), kind.out_features(host)
        if not kind.linear_like:
            check_zero_padding(host, name, "AdaLoRA")
            if host.groups != 1:
                raise ValueError(f"AdaLoRA on a grouped convolution ({name}, groups={host.groups}) is not supported")
            fin = fin * host.kernel_size[0] * host.kernel_size[1]
            self.weight_shape = tuple(host.weight.shape)
        self.r, self.init_r = r, config.init_r
        # PEFT's ranknum: init_r (a rank-pattern load keeps the trained scaling)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.factor = self.scaling / (float(config.init_r if r > 0 else 0) + 1e-5)
        self.merged = False
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        kw = dict(dtype=dtype or torch.float32, device=module_device(host, recurse=False))
        self.lora_A = nn.Parameter(torch.randn(r, fin, **kw))
        self.lora_E = nn.Parameter(torch.randn(r, 1, **kw))
        self.lora_B = nn.Parameter(torch.randn(fout, r, **kw))
        if config.init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """``B diag(E) A * s / (init_r + 1e-5)`` in the host's canonical weight shape (adapter dtype)."""
        w = (self.lora_B @ (self.lora_A * self.lora_E)) * self.factor
        return w if self.linear_like else w.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor, out: torch.Tensor, call) -> torch.Tensor:
        dt = compute_dtype(x, self.lora_A.dtype)
        xa = self.lora_dropout(x.to(dt))
        if self.linear_like:
            y = (xa @ (self.lora_A * self.lora_E).to(dt).T @ self.lora_B.to(dt).T) * self.factor
        else:
            y = conv_apply(call.host, self.kind, xa, self.delta_weight().to(dt))
        return out + y.to(out.dtype)

    def merge_into(self, host: nn.Module, w: torch.Tensor) -> torch.Tensor:
        """``w + delta W`` (float32, canonical layout)."""
        return w + self.delta_weight().to(w.dtype).reshape(w.shape)

    def merge_bias(self, host: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return b

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, init_r={self.init_r}, scaling={self.scaling:g}"


def _pattern_key(host: str) -> str:
    return f"{host}.lora_E"


def _kept_rank(config: AdaLoraConfig, host: str, adapter_name: str) -> int:
    """The rank a host is built with: ``init_r``, or the kept triplets of ``rank_pattern``."""
    rp = config.rank_pattern or {}
    mask = rp.get(_pattern_key(host), rp.get(f"{_pattern_key(host)}.{adapter_name}"))
    return config.init_r if mask is None else int(sum(bool(v) for v in mask))


def inject_adalora(model: nn.Module, config: AdaLoraConfig, rec: AdapterRecord, *, adapter_dtype=None) -> None:
    """Attach an :class:`AdaLoraAdapter` to every target of ``config`` (its kept rank when the config
    carries a ``rank_pattern``), and the modules_to_save copies and trained biases.

    Raises:
        ValueError: nothing matches, or a ``rank_pattern`` key names no adapted module.
    """
    _check_supported(config)
    hosts = resolve_targets(model, config, "adalora")
    known = {_pattern_key(h) for h in hosts} | {f"{_pattern_key(h)}.{rec.name}" for h in hosts}
    bad = [k for k in (config.rank_pattern or {}) if k not in known]
    if bad:
        raise ValueError(f"rank_pattern keys {bad[:4]!r} name no adapted module (keys are '<module path>.lora_E')")
    for name in hosts:
        host = model.get_submodule(name)
        dtype = resolve_dtype(adapter_dtype, getattr(host, "weight", None))
        attach(model, name, rec.name, AdaLoraAdapter(host, name, _kept_rank(config, name, rec.name), config, dtype))
    finish_inject(model, config, rec, hosts)


def _to_disk(model: nn.Module, adapter_name: str, config: AdaLoraConfig) -> dict:
    """PEFT's file: each layer's ``lora_A``/``lora_E`` rows and ``lora_B`` columns of the kept triplets
    (these keys replace the full matrices of the key rule)."""
    out = {}
    for path, _, _, ad in iter_adapter_modules(model, adapter_name):
        mask = (config.rank_pattern or {}).get(_pattern_key(path)) if isinstance(ad, AdaLoraAdapter) else None
        if mask is None or sum(bool(v) for v in mask) == ad.r or len(mask) != ad.r:
            continue
        keep = torch.tensor([bool(v) for v in mask], device=ad.lora_A.device)
        base = f"base_model.model.{path}."
        out.update({base + "lora_A": ad.lora_A.detach()[keep], base + "lora_E": ad.lora_E.detach()[keep],
                    base + "lora_B": ad.lora_B.detach()[:, keep]})
    return out


class AdaLoraHook:
    """AdaLoRA's training-time part for one adapter (module docstring), run by the training loop
    (:class:`deltatune.inject.TrainHook`); PEFT's ``RankAllocator`` with ``update_and_allocate``.

    The schedule follows the run: when ``config.total_step`` differs from the run's ``total_steps``,
    ``total_step`` becomes ``total_steps`` and ``tinit``/``tfinal`` are scaled by the same ratio
    (with a warning), so pruning ends where training ends and the saved config says what ran.

    Raises:
        ValueError: the scaled schedule leaves no budgeting phase.
    """

    def __init__(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig, total_steps: int):
        if config.total_step != total_steps:
            ratio = total_steps / config.total_step
            tinit, tfinal = int(round(config.tinit * ratio)), int(round(config.tfinal * ratio))
            warnings.warn(f"AdaLoRA: total_step={config.total_step} but this training run takes {total_steps} optimizer "
                          f"steps; the rank schedule follows the run (total_step={total_steps}, tinit={tinit}, "
                          f"tfinal={tfinal} are saved)", stacklevel=3)
            if tinit >= total_steps - tfinal:
                raise ValueError(f"AdaLoRA: tinit={tinit} and tfinal={tfinal} leave no budgeting phase in a run of "
                                 f"{total_steps} optimizer steps")
            config.total_step, config.tinit, config.tfinal = total_steps, tinit, tfinal
        self.config = config
        self.layers = [(path, ad) for path, _, _, ad in iter_adapter_modules(model, adapter_name)
                       if isinstance(ad, AdaLoraAdapter)]
        self.init_bgt = sum(ad.lora_A.shape[0] for _, ad in self.layers)
        self.target_bgt = config.target_r * len(self.layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    # -- the regulariser ------------------------------------------------------------------
    def loss_term(self, model: nn.Module) -> Optional[torch.Tensor]:
        """``orth_reg_weight * mean over A, B of ||A A^T - I||_F, ||B^T B - I||_F`` (None when the weight is 0)."""
        if not self.config.orth_reg_weight or not self.layers:
            return None
        total = 0.0
        for _, ad in self.layers:
            for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
                total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype,
                                                                         device=cov.device))
        return self.config.orth_reg_weight * total / (2 * len(self.layers))

    # -- the allocator ----------------------------------------------------------------------
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to prune at this step): constant to ``tinit``, cubic decrease to the target."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul ** 3 + self.target_bgt), step % c.deltaT == 0

    def update_ipt(self) -> None:
        """Smooth each entry's sensitivity ``|p * grad|`` (EMA beta1) and its uncertainty (EMA beta2)."""
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, ad in self.layers:
                for leaf in ("lora_A", "lora_B", "lora_E"):
                    p, key = getattr(ad, leaf), (path, leaf)
                    if key not in self.ipt:
                        self.exp_avg_ipt[key] = torch.zeros_like(p)
                        self.exp_avg_unc[key] = torch.zeros_like(p)
                    ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                    self.ipt[key] = ipt
                    self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                    self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def _score(self, path: str, leaf: str) -> torch.Tensor:
        return self.exp_avg_ipt[(path, leaf)] * self.exp_avg_unc[(path, leaf)]

    def mask_to_budget(self, budget: int) -> dict:
        """Zero the ``E`` values of the lowest-scoring triplets so that ``budget`` remain; return the rank pattern."""
        triplet = {}
        for path, _ in self.layers:
            a = self._score(path, "lora_A").mean(dim=1, keepdim=True)  # (r, 1)
            b = self._score(path, "lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
            triplet[path] = self._score(path, "lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)
        k = self.init_bgt - budget
        scores = torch.cat([t for t in triplet.values()]) if triplet else torch.zeros(0)
        thr = float(torch.kthvalue(scores, k=k)[0]) if 0 < k <= scores.numel() else float("-inf")
        pattern = {}
        with torch.no_grad():
            for path, ad in self.layers:
                drop = triplet[path].view(-1, 1) <= thr
                ad.lora_E.masked_fill_(drop, 0.0)
                pattern[_pattern_key(path)] = (~drop).view(-1).tolist()
        return pattern

    def mask_using_rank_pattern(self, pattern: dict) -> None:
        """Keep the fixed final pattern: zero the ``E`` values it drops."""
        with torch.no_grad():
            for path, ad in self.layers:
                mask = pattern.get(_pattern_key(path))
                if mask is not None and len(mask) == ad.lora_E.shape[0]:
                    keep = torch.tensor(mask, dtype=torch.bool, device=ad.lora_E.device).unsqueeze(-1)
                    ad.lora_E.masked_fill_(~keep, 0.0)

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """PEFT's ``update_and_allocate(step)``: score and prune during the budget phase, fix the pattern
        at ``total_step - tfinal``, keep it afterwards; the pattern goes into ``config.rank_pattern``."""
        c = self.config
        end = c.total_step - c.tfinal
        if step < end:
            self.update_ipt()
            budget, prune = self.budget_schedule(step)
            if prune:
                c.rank_pattern = self.mask_to_budget(budget)
        elif step == end:
            budget, _ = self.budget_schedule(step)
            c.rank_pattern = self.mask_to_budget(budget)
            self.reset_ipt()
        elif c.rank_pattern:
            self.mask_using_rank_pattern(c.rank_pattern)


register_method(AdaLoraConfig, inject_adalora, to_disk=_to_disk, train_hook=AdaLoraHook)
