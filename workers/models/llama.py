"""Llama-family decoder (Llama, Mistral, Qwen2, Granite): pre-norm blocks, GQA attention with rotary, SwiGLU MLP.

Built for this process's pipeline stage (`pipeline_stage`): only the stage's decoder layers, the embedding on the
first stage, the final norm and LM head on the last; a non-last stage's forward returns an `IntermediateState`,
a later stage's takes one. With one stage (the default) the model is the whole model, as before.

Granite is this model plus the scalar multipliers of `ModelSpec` (embedding, residual, attention scale, logits
divisor), which are 1 / default for the other families; the soft-caps of `ModelSpec` (Gemma 2) apply here too.
Qwen3, Olmo2 and Gemma subclass the pieces here (see
`attention_cls`, `mlp_cls`, `norm_cls`, `layer_cls`, `model_cls` and `LlamaAttention.norm_qk`).
"""
from __future__ import annotations

import torch
from torch import nn

from rayinfer import kernels
from rayinfer.workers.layers.attention import AttentionMetadata, PagedAttention
from rayinfer.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from rayinfer.workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from rayinfer.workers.layers.norm import RMSNorm
from rayinfer.workers.layers.rotary import RotaryEmbedding
from rayinfer.workers.model_config import ModelSpec
from rayinfer.workers.models.pipeline import IntermediateState, MissingLayer, stage_layers
from rayinfer.workers.parallel_state import pipeline_stage

RopeTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # cos table, sin table, row per token


def norm_input(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input norm, fused with the previous layer's residual add (the first layer has none): returns
    (normed input, residual stream)."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, bias=spec.qkv_bias
        )
        self.q_size = self.qkv_proj.num_heads * spec.head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * spec.head_dim
        self.head_dim = spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=spec.o_bias)
        self.attn = PagedAttention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            spec.head_dim,
            spec.sliding_windows[layer_index],
            scale=spec.attention_scale,
            soft_cap=spec.attn_logit_softcap,
        )

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for q/k normalisation before rotary; q [T, heads * head_dim], k [T, kv_heads * head_dim]."""
        return q, k

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(q, k)
        tokens = x.shape[0]
        q = q.reshape(tokens, -1, self.head_dim)
        k = k.reshape(tokens, -1, self.head_dim)
        cos, sin, rows = rope
        kernels.rotary_embedding(rows, q, k, cos, sin, True)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.hidden_act != "silu":
            raise ValueError(f"hidden_act {spec.hidden_act!r} is not supported for {spec.architecture}; expected silu")
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [size, size], bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention
    mlp_cls: type[nn.Module] = LlamaMLP
    norm_cls: type[RMSNorm] = RMSNorm

    def __init__(self, spec: ModelSpec, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = self.norm_cls(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = self.attention_cls(spec, layer_index)
        self.post_attention_layernorm = self.norm_cls(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = self.mlp_cls(spec)
        self.residual_multiplier = spec.residual_multiplier

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeTables,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = norm_input(self.input_layernorm, x, residual)
        x = self.self_attn(x, rope, meta)
        if self.residual_multiplier != 1.0:  # Granite: residual + sublayer(x) * residual_multiplier
            x = x * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        return x, residual


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer
    norm_cls: type[RMSNorm] = RMSNorm  # the final norm

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        self.stage = stage = pipeline_stage(spec.num_layers)
        first, last = stage.is_first, stage.is_last
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size) if first else MissingLayer()
        self.embedding_multiplier = spec.embedding_multiplier
        self.layers = stage_layers(stage, spec.num_layers, lambda i: self.layer_cls(spec, i))
        # A plain tuple, not a registered module: the forward walks only these, without slicing per step.
        self.own_layers = tuple(self.layers[stage.first_layer : stage.end_layer])
        self.norm = self.norm_cls(spec.hidden_size, spec.rms_norm_eps) if last else MissingLayer()
        self.rotary_emb = RotaryEmbedding(spec.rope, max_len)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, intermediate: IntermediateState | None = None
    ) -> torch.Tensor | IntermediateState:
        """The final hidden states on the last stage, else this stage's `IntermediateState`; `intermediate` is the
        previous stage's (every stage but the first; the first reads `input_ids`)."""
        rope = self.rotary_emb(meta.positions, meta.rope_lengths)
        if self.stage.is_first:
            x, residual = self.embed_tokens(input_ids), None
            if self.embedding_multiplier != 1.0:
                x = x * self.embedding_multiplier
        elif intermediate is None:
            raise ValueError(f"pipeline stage {self.stage.index} needs the previous stage's IntermediateState")
        else:
            x, residual = intermediate.hidden, intermediate.residual
        for layer in self.own_layers:
            x, residual = layer(x, residual, rope, meta)
        if not self.stage.is_last:
            return IntermediateState(x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    model_cls: type[LlamaModel] = LlamaModel
    supports_pipeline_parallel = True  # builds only its pipeline stage's parts (see LlamaModel)
    # Checkpoint names that land inside one of our merged parameters, and which part of it they fill.
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, max_len: int) -> None:
        super().__init__()
        self.spec = spec
        self.model = self.model_cls(spec, max_len)
        stage = self.model.stage
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size) if stage.is_last else MissingLayer()
        # Checkpoint name (after renames) of the tensor the LM head loads instead of lm_head.weight: with tied
        # embeddings on a last stage that is not also the first, the embedding it would share is not here.
        self.lm_head_source: str | None = None
        if spec.tie_word_embeddings and stage.is_last:
            if stage.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight
            else:
                self.lm_head_source = "model.embed_tokens.weight"

    @property
    def uses_dynamic_rope(self) -> bool:
        return self.model.rotary_emb.is_dynamic

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, intermediate: IntermediateState | None = None
    ) -> torch.Tensor | IntermediateState:
        return self.model(input_ids, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.model.stage.is_last:
            stage = self.model.stage
            raise RuntimeError(f"pipeline stage {stage.index} of {stage.count} has no LM head; the last one has")
        logits = self.lm_head.compute_logits(hidden)
        if self.spec.logits_divisor != 1.0:  # Granite's logits_scaling
            logits = logits / self.spec.logits_divisor
        cap = self.spec.final_logit_softcap
        if cap is not None:  # Gemma 2: elementwise, on the gathered logits
            logits = torch.tanh(logits / cap) * cap
        return logits
