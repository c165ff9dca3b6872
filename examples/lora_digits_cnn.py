"""LoRA on a small CNN (no transformers): pretrain on digits 0-4, adapt to digits 5-9 with LoRA.

The data is scikit-learn's 8x8 handwritten digits (it ships with scikit-learn, no download). A CNN is
trained in full on the classes 0-4; then it is frozen, LoRA adapters are put on its two convolutions
and its hidden linear layer, a new output head is trained in full (``modules_to_save``), and only
those train on the classes 5-9. Prints the accuracies, the trainable share, and the time taken.

    pip install -e ".[examples]" && python examples/lora_digits_cnn.py
"""

from __future__ import annotations

import time

import torch
from torch import nn


def main() -> None:
    start = time.perf_counter()
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("This example needs scikit-learn: pip install -e '.[examples]'") from None
    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (n, 1, 8, 8)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.head = nn.Linear(64, 5)

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv1(inp))
            h = self.pool(torch.relu(self.conv2(h)))
            return self.head(torch.relu(self.fc1(h.flatten(1))))

    def subset(xs, ys, classes):
        keep = torch.isin(ys, torch.tensor(classes))
        return xs[keep], ys[keep] - min(classes)

    def fit(model, xs, ys, epochs, lr):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(len(xs))
            for i in range(0, len(xs), 32):
                idx = perm[i:i + 32]
                loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

    @torch.no_grad()
    def accuracy(model, xs, ys):
        return float((model(xs).argmax(-1) == ys).float().mean())

    old_tr, old_te = subset(x_tr, y_tr, [0, 1, 2, 3, 4]), subset(x_te, y_te, [0, 1, 2, 3, 4])
    new_tr, new_te = subset(x_tr, y_tr, [5, 6, 7, 8, 9]), subset(x_te, y_te, [5, 6, 7, 8, 9])

    model = CNN()
    fit(model, *old_tr, epochs=15, lr=3e-3)
    print(f"pretrained on digits 0-4: test accuracy {accuracy(model.eval(), *old_te):.3f}")
    print(f"the same network on digits 5-9, before adapting: {accuracy(model, *new_te):.3f} (chance: 0.2)")

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "fc1"], modules_to_save=["head"])
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    fit(peft_model.train(), *new_tr, epochs=15, lr=3e-3)
    print(f"after LoRA on digits 5-9: test accuracy {accuracy(peft_model.eval(), *new_te):.3f}")
    with peft_model.disable_adapter():
        print(f"with the adapter disabled, digits 0-4 are still recognised: {accuracy(peft_model, *old_te):.3f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
