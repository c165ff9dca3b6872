"""LoRA on a plain nn.Module inside a Lightning training loop: pretrain on digits 0-4, adapt to 5-9.

The "LoRA on MNIST" workflow with scikit-learn's 8x8 handwritten digits (they ship with scikit-learn,
no download) and a small MLP (no transformers, no PeftModel wrapper). A ``lightning.LightningModule``
trains the MLP in full on the classes 0-4; then ``peftkit.inject_adapter_in_model`` freezes it and
puts LoRA adapters on its two hidden layers and a trainable copy of its output head
(``modules_to_save``) into the module itself, and a second Lightning run trains only those on the
classes 5-9 (the optimizer gets the trainable parameters only). The adapter is written as a Hugging
Face PEFT folder (adapter_config.json + adapter_model.safetensors) that ``peftkit.PeftModel`` and
``peft.PeftModel`` load onto the pretrained MLP; the Lightning checkpoint keeps only the adapter
tensors (``on_save_checkpoint``) and is restored with ``load_state_dict(strict=False)``. Prints the
accuracies, the trainable share, the checkpoint sizes, and the time taken.

    pip install -e ".[examples]" && python examples/lightning_lora.py
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Any

STARTED = time.perf_counter()  # "done in" counts the imports below too (lightning's takes a few seconds)

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning as L
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as exc:
    raise ImportError(f"This example needs lightning and scikit-learn: pip install -e '.[examples]' "
                      f"({exc})") from exc

import peftkit
from peftkit.tuners.tuners_utils import BaseTunerLayer  # every adapter layer (Hugging Face PEFT's name)
from peftkit.utils import ModulesToSaveWrapper  # trained copies of whole modules: not BaseTunerLayers, as in PEFT
from safetensors.torch import save_file

OLD, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
TARGETS, HEAD = ["fc1", "fc2"], "head"
PREFIX = "base_model.model."  # the key prefix of a Hugging Face PEFT folder (what PeftModel.save_pretrained writes)


class MLP(nn.Module):
    """8x8 image (64 pixels) -> two hidden layers -> 5 classes."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class DigitsClassifier(L.LightningModule):
    """Cross-entropy training of ``net``. The optimizer gets only the parameters that require grad: all
    of them when pretraining, the adapter's once ``inject_adapter_in_model`` froze the rest. With
    ``adapter_only_checkpoints`` a checkpoint keeps only those trainable tensors."""

    def __init__(self, net: nn.Module, lr: float, adapter_only_checkpoints: bool = False) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.adapter_only_checkpoints = adapter_only_checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapter_only_checkpoints:
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/test splits of the digits 0-4 ("old") and 5-9 ("new"), labels 0-4 in both."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (n, 8, 8)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)

    def subset(xs: torch.Tensor, ys: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.isin(ys, torch.tensor(classes))
        return xs[keep], ys[keep] - min(classes)

    return {"old_train": subset(x_tr, y_tr, OLD), "old_test": subset(x_te, y_te, OLD),
            "new_train": subset(x_tr, y_tr, NEW), "new_test": subset(x_te, y_te, NEW)}


def fit(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float,
        adapter_only_checkpoints: bool = False) -> L.Trainer:
    """Train ``net`` on ``data`` with a Lightning Trainer on the CPU; returns the trainer (to save a checkpoint)."""
    loader = DataLoader(TensorDataset(*data), batch_size=32, shuffle=True)
    net.train()  # Lightning keeps the mode it finds (accuracy() left it in eval mode)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsClassifier(net, lr, adapter_only_checkpoints), loader)
    return trainer


@torch.no_grad()
def accuracy(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    xs, ys = data
    return float((net.eval()(xs).argmax(-1) == ys).float().mean())


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Turn every adapter layer of a plain module on or off (there is no PeftModel.disable_adapter here)."""
    for layer in module.modules():
        if isinstance(layer, (BaseTunerLayer, ModulesToSaveWrapper)):  # what transformers' disable_adapters does
            layer.enable_adapters(enabled)


def save_adapter(module: nn.Module, config: peftkit.LoraConfig, folder: str) -> None:
    """Write the injected adapter as a Hugging Face PEFT folder: adapter_config.json and
    adapter_model.safetensors, its keys prefixed as PeftModel.save_pretrained writes them."""
    config.save_pretrained(folder, inference_mode=True)  # as PEFT saves it: loaded for inference unless asked
    tensors = peftkit.get_peft_model_state_dict(module)
    save_file({PREFIX + k: v.detach().contiguous() for k, v in tensors.items()},
              os.path.join(folder, "adapter_model.safetensors"))


def restore_from_checkpoint(pretrained: nn.Module, config: peftkit.LoraConfig, path: str) -> nn.Module:
    """A copy of the pretrained module with the adapter of an adapter-only Lightning checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module = peftkit.inject_adapter_in_model(config, copy.deepcopy(pretrained))
    result = module.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=False)
    adapter_keys = {name for name, p in module.named_parameters() if p.requires_grad}
    if result.unexpected_keys or adapter_keys & set(result.missing_keys):
        raise RuntimeError(f"The checkpoint does not fit the adapter: {result}")
    return module


def run(out_dir: str, seed: int = 0, epochs: tuple[int, int] = (15, 15), r: int = 4, lr: float = 3e-3
        ) -> dict[str, Any]:
    """Pretrain on 0-4, add LoRA, train it on 5-9, save it into ``out_dir``. Returns the figures and the
    objects (the trained module, a copy of the pretrained base, the tensors before training, the paths)."""
    torch.manual_seed(seed)
    L.seed_everything(seed, verbose=False)
    data = load_splits(seed)
    net = MLP()
    fit(net, data["old_train"], epochs[0], lr)
    pretrained = copy.deepcopy(net)  # the adapter folder loads onto a copy of this
    figures = {"old_pretrained": accuracy(net, data["old_test"]), "new_before": accuracy(net, data["new_test"])}

    config = peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, modules_to_save=[HEAD])
    module = peftkit.inject_adapter_in_model(config, net)  # in place: net is frozen, the adapter trains
    base_before = {k: v.clone() for k, v in peftkit.get_base_model_state_dict(module).items()}
    adapter_before = {k: v.clone() for k, v in peftkit.get_peft_model_state_dict(module).items()}
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    figures.update(trainable=trainable, total=sum(p.numel() for p in module.parameters()))
    trainer = fit(module, data["new_train"], epochs[1], lr, adapter_only_checkpoints=True)
    figures["new_after"] = accuracy(module, data["new_test"])
    set_adapters_enabled(module, False)
    figures["old_adapter_disabled"] = accuracy(module, data["old_test"])
    set_adapters_enabled(module, True)

    folder, checkpoint = os.path.join(out_dir, "adapter"), os.path.join(out_dir, "lora.ckpt")
    save_adapter(module, config, folder)
    trainer.save_checkpoint(checkpoint)
    kept = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    figures.update(checkpoint_tensors=len(kept), module_tensors=len(module.state_dict()),
                   checkpoint_bytes=os.path.getsize(checkpoint))
    restored = restore_from_checkpoint(pretrained, config, checkpoint)
    figures["new_restored"] = accuracy(restored, data["new_test"])
    return {"figures": figures, "module": module.eval(), "pretrained": pretrained, "restored": restored.eval(),
            "config": config, "base_before": base_before, "adapter_before": adapter_before, "data": data,
            "adapter_folder": folder, "checkpoint": checkpoint}


def main() -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: False" banner
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning 2.6 calls what torch 2.13 deprecated
    with tempfile.TemporaryDirectory() as out_dir:
        f = run(out_dir)["figures"]
        print(f"pretrained on digits 0-4: test accuracy {f['old_pretrained']:.3f}")
        print(f"the same network on digits 5-9, before adapting: {f['new_before']:.3f} (chance: 0.2)")
        print(f"trainable: {f['trainable']:,} of {f['total']:,} parameters ({100 * f['trainable'] / f['total']:.1f}%)")
        print(f"after LoRA on digits 5-9: test accuracy {f['new_after']:.3f}")
        print(f"with the adapters disabled, digits 0-4 are still recognised: {f['old_adapter_disabled']:.3f}")
        print(f"adapter-only Lightning checkpoint: {f['checkpoint_tensors']} of the module's {f['module_tensors']} "
              f"tensors ({f['checkpoint_bytes'] / 1024:.1f} KiB with the optimizer state); "
              f"restored from it: test accuracy {f['new_restored']:.3f}")
    print(f"done in {time.perf_counter() - STARTED:.1f} s")


if __name__ == "__main__":
    main()
