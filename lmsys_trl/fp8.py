"""FP8 (e4m3) linear layers for scoring: weights quantised once per output row, activations per token at run time.

`torch._scaled_mm` multiplies the FP8 operands with their row-wise scales on FP8 tensor cores (H100; a reference kernel
on the CPU, where it only runs tests), with fast accumulation as torchao's float8 inference uses it. The scale of a row
is its absolute maximum over the largest e4m3 value, so nothing saturates. Used by `scripts/eval.py --precision fp8`
after the LoRA adapters are merged into the bf16 base; the LM head and embeddings stay in bf16.

Why not torchao's float8 inference (`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`): torchao 0.18
installs beside the pinned torch, but its speed and accuracy against this kernel have not been measured on an FP8 GPU
yet (the 2026-12-02 session's device time went to the training path); FP8 is an opt-in precision now, not the default.
Replace this module with it once it measures the same (docs/benchmarks.md, inference).
"""

import torch
from torch import nn


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
ALIGNMENT = 16  # `_scaled_mm` wants the inner and output dimensions (and here the rows) in multiples of 16


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls need FP8 tensor cores on a GPU (compute capability >= 8.9: H100, L4, ...); the CPU runs them too."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"precision fp8 needs FP8 tensor cores (compute capability >= 8.9, e.g. H100); {name} has "
                         f"{torch.cuda.get_device_capability(device)}: use --precision bf16")


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 tensor, (rows, 1) fp32 scales) with x ~= fp8 * scale, one scale per row of the 2-D `x`."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class Float8Linear(nn.Module):
    """`nn.Linear` with FP8 weights (per-output-row scales) and dynamically quantised per-token FP8 activations.
    `fast_accum`: the tensor cores' fast (lower-precision) accumulation, as torchao's float8 inference uses it."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = True):
        super().__init__()
        self.fast_accum = fast_accum
        if linear.in_features % ALIGNMENT or linear.out_features % ALIGNMENT:
            raise ValueError(
                f"FP8 needs in/out features divisible by {ALIGNMENT}, got {linear.in_features}x{linear.out_features}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = rowwise_fp8(linear.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in), row-major: `.t()` is column-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        padding = -rows.shape[0] % ALIGNMENT
        if padding:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padding))
        quantized, scale = rowwise_fp8(rows)
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )
        if padding:
            out = out[: out.shape[0] - padding]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def linear_layers(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The plain `nn.Linear` modules of `model` by name, except those whose name ends with an entry of `keep`."""
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith(keep)}


def quantize_linear_layers(model: nn.Module, keep: tuple[str, ...] = ("lm_head",), skip=(),
                           fast_accum: bool = True) -> int:
    """Replace every `nn.Linear` of `model` (bf16 weights, adapters merged) by a `Float8Linear`, except modules whose
    name ends with an entry of `keep` and the modules named in `skip` (e.g. `most_sensitive`'s choice), which stay
    bf16; returns how many were replaced."""
    targets = {name: m for name, m in linear_layers(model, keep).items() if name not in set(skip)}
    if not targets:
        raise ValueError("no nn.Linear layers to quantise (LoRA adapters must be merged first)")
    for name, module in targets.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Float8Linear(module, fast_accum))
    return len(targets)


@torch.no_grad()
def fp8_output_errors(model: nn.Module, run_forward, keep: tuple[str, ...] = ("lm_head",)) -> dict[str, float]:
    """Calibration: for every `nn.Linear` (bf16, adapters merged) the relative error of its FP8 output on the inputs
    one call of `run_forward()` feeds it, ||fp8(x) fp8(W)^T - x W^T|| / ||x W^T|| over all tokens, measured layer by
    layer on the bf16 model's own activations (one forward pass, hooks; nothing is replaced)."""
    layers = linear_layers(model, keep)
    sums = {name: [0.0, 0.0] for name in layers}

    def hook(name):
        def measure(module, args, output):
            x = args[0].reshape(-1, module.in_features)
            weight, w_scale = rowwise_fp8(module.weight)
            quantized, scale = rowwise_fp8(x)
            approx = (quantized.float() * scale) @ (weight.float() * w_scale).t()
            exact = output.reshape(-1, module.out_features).float()
            if module.bias is not None:
                exact = exact - module.bias.float()
            sums[name][0] += (approx - exact).square().sum().item()
            sums[name][1] += exact.square().sum().item()
        return measure

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (err / max(norm, 1e-30)) ** 0.5 for name, (err, norm) in sums.items()}


def most_sensitive(errors: dict[str, float], fraction: float) -> list[str]:
    """The `fraction` of layers (by count, at least one when fraction > 0) with the largest FP8 output error."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    count = min(len(errors), int(round(fraction * len(errors))) or (1 if fraction > 0 else 0))
    return sorted(errors, key=errors.get, reverse=True)[:count]
