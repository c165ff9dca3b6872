"""LoRA fine-tune of the bundled stories260k model on bundled text; prints the loss going down and
saves the adapter. Data: the bundled TinyStories sample. Runs offline in well under a minute on a laptop CPU.

    python examples/quickstart_lora.py [output_dir]
"""

import sys
import time

import torch

from peftkit import LoraConfig, get_peft_model, load_model
from peftkit.assets import ASSETS_DIR

def main(out_dir: str = "runs/quickstart-lora") -> None:
    start = time.time()
    torch.manual_seed(0)
    model, tok = load_model()
    text = (ASSETS_DIR / "data" / "tinystories_sample.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[0]
    block = 128
    blocks = ids[: len(ids) // block * block].view(-1, block)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(60):
        batch = blocks[torch.randint(0, len(blocks), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.save_pretrained(out_dir)
    print(f"adapter saved to {out_dir} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(*sys.argv[1:])
