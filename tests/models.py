"""Model kinds the property batteries run over: tiny configs built in-process with fixed seeds, plus
the bundled pretrained model. Each case knows how to build the model, make inputs and read the
output tensor to compare."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20, bias=bias)
        self.lin2 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


class CNN(nn.Module):
    """Embedding -> Conv1d, and an image branch Conv2d -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2d_1x1 = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6 * 4 * 4 + 8, 5)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        img = self.conv2d_1x1(torch.relu(self.conv2d(x))).flatten(1)
        seq = self.conv1d(self.emb(tokens).transpose(1, 2)).mean(-1)
        return self.head(torch.cat([img, seq], dim=1))


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed()
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=64, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    _seed()
    cfg = BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=64, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    _seed()
    cfg = T5Config(d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4, vocab_size=64, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    _seed()
    cfg = BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(cfg).eval()


def bundled() -> nn.Module:
    from peftkit import load_model

    return load_model()[0].eval()


def _tokens(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, Any]]  # batch size -> kwargs
    output: Callable[[Any], torch.Tensor]
    targets: Any  # LoRA target_modules for this model
    task_type: Any = None
    lm: bool = False  # has generate()

    def __repr__(self) -> str:
        return self.name


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


CASES = [
    Case("mlp", MLP, lambda b: {"x": torch.randn(b, 10, generator=torch.Generator().manual_seed(2))}, _logits,
         ["lin0", "lin1"]),
    Case("cnn", CNN, lambda b: {"x": torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(2)),
                                "tokens": _tokens(b, 5, 30)}, _logits, ["emb", "conv1d", "conv2d", "conv2d_1x1", "head"]),
    Case("llama", tiny_llama, lambda b: {"input_ids": _tokens(b, 7, 64)}, _logits, "all-linear", "CAUSAL_LM", True),
    Case("gpt2", tiny_gpt2, lambda b: {"input_ids": _tokens(b, 7, 64)}, _logits, ["c_attn", "c_proj", "c_fc"],
         "CAUSAL_LM", True),
    Case("bert", tiny_bert_cls, lambda b: {"input_ids": _tokens(b, 7, 64)}, _logits, ["query", "value", "dense"],
         "SEQ_CLS"),
    Case("t5", tiny_t5, lambda b: {"input_ids": _tokens(b, 7, 64), "decoder_input_ids": _tokens(b, 4, 64, seed=3)},
         _logits, ["q", "k", "v", "o", "wi", "wo"], "SEQ_2_SEQ_LM", True),
    Case("stories260k", bundled, lambda b: {"input_ids": _tokens(b, 9, 512)}, _logits, "all-linear", "CAUSAL_LM",
         True),
]


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1,
                       is_adapter: Optional[Callable[[str], bool]] = None) -> None:
    """Perturb every adapter tensor (trainable or not) so that a no-op cannot pass a merge/disable
    test. ``is_adapter(name)`` picks them (default: LoRA, IA3 and bottleneck tensors)."""
    is_adapter = is_adapter or (lambda name: any(k in name for k in ("lora_", "ia3_", "adapter_")))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.add_(torch.randn(p.shape, generator=g) * std)
