"""LoRA on convolutions (``nn.Conv1d/2d/3d``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.kernels import dropout_p, rowwise_dropout
from ...core.mixed import MixedBatch
from ...errors import MergeError, PeftkitError, TargetError
from .config import LoraConfig
from .dora import DoraConv
from .layer import LoraLayer


class ConvNd(LoraLayer):
    """LoRA on an N-d convolution: ``y = conv(x, W) + s · conv1x1(conv(x, A), B)``.

    A: ConvNd(in, r, kernel, stride, padding, dilation), B: ConvNd(r, out, 1, groups=base.groups).
    Weight shapes: A (r, in, *kernel), B (out, r / groups, 1, ...). The update's weight (for merging)
    is the composition of the two convolutions. DoRA's magnitude has shape (1, out, 1, ...).
    """

    dora_variant = DoraConv

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.conv_dim = base.weight.dim() - 2
        self.conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.conv_dim]

    def _create(self, name: str, r: int, config: LoraConfig) -> None:
        base = self.get_base_layer()
        if r % base.groups:
            raise TargetError(f"LoRA on a conv with groups={base.groups} needs r divisible by groups (got r={r}).")
        if base.padding_mode != "zeros":
            raise TargetError(f"LoRA on convs with padding_mode={base.padding_mode!r} is not supported.")
        cls = type(base) if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.conv_dim]
        device = self._adapter_device()
        ones = (1,) * self.conv_dim
        self.lora_A[name] = cls(self.in_features, r, base.kernel_size, base.stride, base.padding,
                                dilation=base.dilation, bias=False, device=device)
        self.lora_B[name] = cls(r, self.out_features, ones, ones, groups=base.groups, bias=config.lora_bias,
                                device=device)

    def delta_weight(self, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        if base.groups > 1:
            raise MergeError("Merging LoRA into a grouped convolution (groups > 1) is not supported.")
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        # B is a 1x1 conv, so the composed kernel is B (out, r) times A (r, in * kernel)
        delta = (B.flatten(1) @ A.flatten(1)).view(base.weight.shape)
        return delta * self.scaling[name]

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        xa = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype) if self.cast_input_dtype_enabled else x)
        lora = self.lora_B[name](self.lora_A[name](xa))
        if name in self.dora:
            return self.dora[name].forward(self, name, xa, lora, result)
        return result + (lora * self.scaling[name]).to(result.dtype)

    def _mixed_lora(self, x: torch.Tensor, result: torch.Tensor, mixed: MixedBatch, fresh: bool) -> torch.Tensor:
        """Each row its own adapter, as one grouped convolution over the batch (groups = batch)."""
        names = tuple(self.lora_A.keys())
        if not names:
            return result
        if any(self.use_dora[n] for n in names):
            raise PeftkitError("Mixed-adapter batches are not supported for DoRA on conv layers.")
        base = self.get_base_layer()
        idx = mixed.index(names, x.device, x.shape[0])
        r_max = max(self.r[n] for n in names)
        wA = self.lora_A[names[0]].weight
        kernel = wA.shape[2:]
        A = torch.stack([wA.new_zeros((r_max, self.in_features, *kernel))] + [
            F.pad(self.lora_A[n].weight, (0, 0) * self.conv_dim + (0, 0, 0, r_max - self.r[n])) for n in names])
        g = base.groups
        B = torch.stack([wA.new_zeros((self.out_features, r_max // g if r_max % g == 0 else r_max, *([1] * self.conv_dim)))] + [
            _pad_conv_b(self.lora_B[n].weight * self.scaling[n], r_max, g) for n in names])
        batch = x.shape[0]
        xa = x.to(A.dtype)
        if self.training:
            xa = rowwise_dropout(xa, [0.0] + [dropout_p(self.lora_dropout[n]) for n in names], idx)
        xa = xa.reshape(1, batch * self.in_features, *x.shape[2:])
        a = A.index_select(0, idx).reshape(batch * r_max, self.in_features, *kernel)
        h = self.conv_fn(xa, a, None, base.stride, base.padding, base.dilation, batch)
        b = B.index_select(0, idx).reshape(batch * self.out_features, *B.shape[2:])
        out = self.conv_fn(h, b, None, 1, 0, 1, batch * g)
        out = out.reshape(batch, self.out_features, *out.shape[2:])
        for n in names:
            if self.lora_bias[n]:
                rows = (idx == names.index(n) + 1).to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
                out = out + rows * (self.lora_B[n].bias * self.scaling[n]).view(1, -1, *([1] * self.conv_dim))
        return result + out.to(result.dtype)


def _pad_conv_b(weight: torch.Tensor, r_max: int, groups: int) -> torch.Tensor:
    """Pad B (out, r/groups, 1..) to rank r_max, keeping each group's input channels together."""
    out, per_group = weight.shape[:2]
    target = r_max // groups
    if per_group == target:
        return weight
    return F.pad(weight, (0, 0) * (weight.dim() - 2) + (0, target - per_group))


__all__ = ["ConvNd"]
