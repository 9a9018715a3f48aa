"""LoraEmbedding: LoRA on ``nn.Embedding`` as PEFT defines it, computed as a gather of r-vectors.

y = E[ids] + s * A^T[ids] B^T with ``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B``
[dim, r] (PEFT's names and layout). The adapter rows are looked up with the base's own embedding
options (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse), exactly as PEFT does: with
max_norm the r-vectors of the looked-up ids are renormalised in place, like the base table's rows.
No dense [num_embeddings, dim] delta is built except for merging. lora_dropout never applies to
embeddings (as in PEFT). An ``embed_scale`` on the base (Gemma-style scaled embeddings) scales the
adapter output too. Pure PyTorch: runs on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layer import AdapterLayer
from .dora_layers import DoraHooks


class LoraEmbedding(DoraHooks, AdapterLayer):  # DoraHooks: use_dora (nn/dora_layers.py)
    param_dicts = ("lora_embedding_A", "lora_embedding_B")
    setting_dicts = ("scaling", "r", "lora_alpha", "use_rslora")

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 8, lora_alpha: float = 8,
                 use_rslora: bool = False, init_lora_weights=True, lora_bias: bool = False, use_dora: bool = False):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.add_adapter(adapter_name, r, lora_alpha, use_rslora, init_lora_weights, lora_bias, use_dora)
        self.active_adapters = [adapter_name]

    @staticmethod
    def adapter_shapes(base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        num, dim = base_layer.weight.shape
        return {"lora_embedding_A": (r, num), "lora_embedding_B": (dim, r)}

    def add_adapter(self, name: str, r: int, lora_alpha: float, use_rslora: bool = False, init_lora_weights=True,
                    lora_bias: bool = False, use_dora: bool = False) -> None:
        self._check_new(name)
        if lora_bias:
            raise ValueError("lora_bias=True is not supported on nn.Embedding (PEFT refuses it too)")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        kw = dict(device=self.base_layer.weight.device, dtype=self.adapter_dtype())
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, self.num_embeddings, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.zeros(self.embedding_dim, r, **kw))
        self.r[name], self.lora_alpha[name], self.use_rslora[name] = r, lora_alpha, use_rslora
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        if init_lora_weights is False:
            with torch.no_grad():  # PEFT leaves both factors random (torch.randn) when not initialised
                self.lora_embedding_A[name].normal_()
                self.lora_embedding_B[name].normal_()
        elif init_lora_weights in (True, "gaussian"):
            with torch.no_grad():  # PEFT: A = 0, B ~ N(0, 1) like nn.Embedding's default
                self.lora_embedding_B[name].normal_()
        else:
            raise NotImplementedError(f"init_lora_weights={init_lora_weights!r} is not supported on embeddings")
        self.attach_variant(name, use_dora)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self.dora_tensors(name, {"lora_embedding_A": self.lora_embedding_A[name],
                                        "lora_embedding_B": self.lora_embedding_B[name]})

    def _embed_scale(self):
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            raise ValueError(f"embed_scale of the base embedding must be a scalar, got shape {tuple(scale.shape)}")
        return scale

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s A^T[ids] B^T [* embed_scale], the plain LoRA term (DoRA rescales it: nn/dora_layers.py)."""
        base = self.base_layer
        # The gather of r-vectors: [..., r]; then a tiny [r, dim] expand.
        u = F.embedding(x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)
        out = (u @ self.lora_embedding_B[name].t()) * self.scaling[name]
        scale = self._embed_scale()
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # E[ids] is a fresh tensor that the embedding's backward never reads, so s * U B^T goes into it
        # in place (one addmm_, none of the [M, dim] temporaries of the generic path). A DoRA adapter
        # (``DoraHooks`` routes it: it rescales the result), a scaled embedding, another dtype or a
        # non-contiguous result takes the generic path.
        b = self.lora_embedding_B[name]
        if (name in self.lora_variant or self._embed_scale() is not None or result.dtype != b.dtype
                or not result.is_contiguous()):
            return super().add_adapter_output(name, x, result)
        base = self.base_layer
        u = F.embedding(x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)
        result.view(-1, result.shape[-1]).addmm_(u.reshape(-1, u.shape[-1]), b.t(), alpha=self.scaling[name])
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self.merge_value(self.lora_embedding_A[name])
        b = self.merge_value(self.lora_embedding_B[name])
        return (b @ a).t() * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names())
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, adapters=[{ranks}]"
