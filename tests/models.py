"""Tiny models for the tests (no downloads), and helpers shared by the test files."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class TinyMLP(nn.Module):
    """``inp`` -> layers.{0,1} (up/down with a residual) -> ``head``: named like a transformer."""

    def __init__(self, dim: int = 32, hidden: int = 48, out: int = 10):
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.layers = nn.Sequential(Block(dim, hidden), Block(dim, hidden))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        return self.head(self.norm(self.layers(torch.relu(self.inp(x)))))


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": tiny_mlp}


def model_input(kind: str, seed: int = 1, batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, seq, 16, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_lora(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Non-zero values for every LoRA parameter (ours or PEFT's), so B != 0 and the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def bnb_nf4(model: nn.Module, bnb) -> nn.Module:
    """Every nn.Linear but lm_head swapped in place for a bitsandbytes NF4 Linear4bit on CPU (what a
    4-bit load gives, without a download); bnb is the module the caller got from importorskip."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not path.endswith("lm_head"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, module=q)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, q.to("cpu"))
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit load; PEFT dispatches on it
    return model


def load_here(peft_model: nn.Module, kind: str, directory, inputs: dict):
    """The PEFT model's logits, and a fresh BUILDERS[kind] base with the adapter in ``directory`` loaded by
    lora_triton: (model, expected, got, base), got and base being its logits with and without the adapter."""
    import lora_triton

    with torch.no_grad():
        expected = run(peft_model, inputs)
        model = lora_triton.load_adapter(BUILDERS[kind](), str(directory)).eval()
        got = run(model, inputs)
        with lora_triton.disable_adapters(model):
            base = run(model, inputs)
    return model, expected, got, base


def load_in_peft(model: nn.Module, kind: str, directory, inputs: dict):
    """The other way round: ``model``'s logits, and PEFT's PeftModel.from_pretrained of ``directory`` on a
    fresh BUILDERS[kind] base with its logits (PEFT's warnings silenced): (peft_model, expected, got)."""
    import warnings

    import peft

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        expected = run(model, inputs)
        pm = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(directory)).eval()
        got = run(pm, inputs)
    return pm, expected, got
