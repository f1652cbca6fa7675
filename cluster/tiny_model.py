"""Built-in tiny checkpoints: a real byte-level BPE tokenizer and random-weight models of every supported family.

Everything is built offline and deterministically, so tests and examples never need the model hub and the same
arguments always give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayinfer.configs.cache_dir import cache_root

if TYPE_CHECKING:  # transformers is heavy; import it only when a checkpoint is actually built
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SUPPORTED_TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "gemma", "gemma2")
SUPPORTED_TINY_ARCHS += ("qwen2_moe", "mixtral")  # mixtures of experts
SUPPORTED_TINY_ARCHS += ("phi3", "starcoder2", "olmo", "stablelm", "cohere")
# Learned-position / ALiBi LayerNorm families: their configs take none of the Llama keys (rope, rms_norm_eps, KV heads).
_LAYER_NORM_ARCHS = ("gpt2", "gpt_bigcode", "opt", "bloom")
SUPPORTED_TINY_ARCHS += _LAYER_NORM_ARCHS
# LayerNorm families with partial rotary and parallel attention + MLP blocks (see _parallel_residual_kwargs).
PARALLEL_RESIDUAL_TINY_ARCHS = ("gptj", "gpt_neox", "falcon", "phi")
SUPPORTED_TINY_ARCHS += PARALLEL_RESIDUAL_TINY_ARCHS

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order
TINY_VOCAB_SIZE = 512
# Bumped whenever the recipe changes, so default_tiny_model_dir never serves a stale cached build.
TINY_FORMAT_VERSION = 1

# Roles are checked so a bad message fails loudly; the assistant turn ends with EOS so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (expected system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his curious daughter.
Every morning she walked to the harbor, counted the boats, and wrote their names in a little blue notebook.
Machine learning models turn text into tokens, tokens into vectors, and vectors back into words.
An inference engine schedules requests, batches them together, and keeps a cache of keys and values.
Paged attention stores the cache in fixed-size blocks, so memory is shared and never wasted.
What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany.
How many legs does a spider have? A spider has eight legs; an insect has six.
Please write a short poem about the moon. The moon is bright tonight, silver over the quiet hills.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5
for i in range(10): total += i * i
{"name": "Alice", "age": 30, "city": "London"} [1, 2, 3, 4, 5] (x + y) * z = 42
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159 -7 +12 50% $19.99 #1 @home
Punctuation!? Yes... no; maybe: "quoted" 'single' (paren) [bracket] {brace} <angle> a/b a\\b a|b ~tilde `tick`
She said, "I'm sure it's fine," but he wasn't convinced. They'd left before we'd arrived.
Weather report: sunny in the morning, clouds in the afternoon, and light rain in the evening.
The recipe needs two cups of flour, one egg, a pinch of salt, and a spoonful of honey.
Rivers flow to the ocean; mountains rise toward the sky; forests breathe in the summer heat.
A café serves a naïve crêpe à la mode; the façade of the hôtel is jaune et rosé. Ça va? Über schön, señor!
日本語のテキストです。東京は大きな都市です。中文文本：你好，世界！한국어 텍스트: 안녕하세요.
Emoji time 🙂🚀 and more 🎉🔥👍 — also a long dash – and “curly quotes” plus ellipsis…
Русский текст: привет, мир. Ελληνικά: γειά σου κόσμε. العربية: مرحبا بالعالم.
"""

_SUBJECTS = ("The cat", "A teacher", "My friend", "The engine", "Our team", "The robot", "A student", "The river")
_VERBS = ("reads", "builds", "finds", "writes", "sees", "moves", "likes", "tests")
_OBJECTS = ("a book", "the bridge", "new ideas", "long stories", "every token", "the garden", "small models")
_ENDINGS = ("today.", "again!", "slowly.", "with care.", "before noon?", "in the rain.")


def _corpus() -> list[str]:
    """A few KB of varied text: literal paragraphs plus a fixed grid of templated sentences (no randomness)."""
    lines = [line for line in _PARAGRAPHS.splitlines() if line]
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            obj = _OBJECTS[(i + j) % len(_OBJECTS)]
            end = _ENDINGS[(i * 3 + j) % len(_ENDINGS)]
            lines.append(f"{subject} {verb} {obj} {end}")
    return lines


def _train_backend_tokenizer(vocab_size: int) -> Any:
    """Trains the byte-level BPE; merges are ordered by (count, pair) so training is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token, so nothing is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like Llama: plain encodes start with BOS (chat templates write it themselves and encode without specials).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_tokenizer(
    out_dir: str | Path, vocab_size: int = TINY_VOCAB_SIZE, pad_to: int | None = None
) -> "PreTrainedTokenizerFast":
    """Trains the built-in tokenizer, saves it to `out_dir` (tokenizer.json + config files) and returns it.

    `pad_to` fills the vocabulary up with plain tokens `<|extra_N|>`, for model shapes with a large vocabulary
    (a random model draws every id; each must decode to text)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if pad_to is not None and pad_to > len(tokenizer):
        tokenizer.add_tokens([f"<|extra_{i}|>" for i in range(pad_to - len(tokenizer))])
    tokenizer.save_pretrained(str(out))
    _write_compat_tokenizer_files(out)
    return tokenizer


def _write_compat_tokenizer_files(out: Path) -> None:
    """Makes the folder loadable by transformers 4.x too, which the engine's requirements still allow.

    transformers 5 names the class `TokenizersBackend`, keeps the chat template only in chat_template.jinja,
    calls extra specials `extra_special_tokens`, and writes no special_tokens_map.json; 4.x needs the old forms.
    """
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config["additional_special_tokens"] = list(ROLE_TOKENS)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": list(ROLE_TOKENS)}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# "tiny" keeps tests fast; "small" is big enough that batching/paging effects show up in benchmarks.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688
    ),
    # The CPU benchmark shape (issue 7): about 56M parameters, a Llama-2-sized vocabulary.
    "llama-56m": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408,
        vocab_size=32000,
    ),
    # Llama-3-8B's shape (8.0B parameters) for GPU benchmarks: build it with dtype bfloat16 on the GPU.
    "llama3-8b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}
# Preset keys that are not plain config kwargs: the vocabulary sizes the tokenizer; rope_theta goes into
# rope_parameters.
_PRESET_ONLY_KEYS = ("vocab_size", "rope_theta")

# Per-matrix gains for std = gain / sqrt(fan_in), so every size behaves alike. Sharper-than-default q/k make
# attention pick out particular earlier tokens, so outputs depend on context and KV-cache bugs change tokens;
# much sharper (gain 3) amplifies float32 rounding 10x, and a large o_proj over diffuse attention makes loops.
_GAINS = {"q_proj": 1.5, "k_proj": 1.5, "v_proj": 1.5, "o_proj": 1.0, "lm_head": 2.0}
# Mixture-of-experts routers: logits of std ~2 give each token a clear top-k (no near-ties that rounding could
# flip) while different tokens still pick different experts.
_ROUTER_GAIN = 2.0
_GAINS["qkv_proj"] = 1.5  # Phi-3's fused q/k/v
# Fused q/k/v projections (GPT-2's and GPT-BigCode's c_attn, GPT-NeoX's and Falcon's query_key_value) as q/k/v.
_GAINS.update(c_attn=1.5, query_key_value=1.5)
# Sharper query_key_value for Bloom (ALiBi is its only position signal) and GPT-NeoX (rotary on a quarter of each
# head): their random greedy outputs otherwise settle into short loops.
_MODEL_TYPE_GAINS = {"bloom": {"query_key_value": 2.0}, "gpt_neox": {"query_key_value": 2.0}}


def _gain(model_type: str, leaf: str) -> float:
    return _MODEL_TYPE_GAINS.get(model_type, {}).get(leaf) or _GAINS.get(leaf, _DEFAULT_GAIN)
_DEFAULT_GAIN = 1.0
_BIAS_STD = 0.2  # non-zero biases and norm weights, so forgetting to load one of them changes the output
_NORM_STD = 0.2
_QK_NORM_CENTER = 2.0
_EMBED_STD = 1.0
_SCALED_TIED_EMBED_SHRINK = 16.0  # see _spread_init: tied heads of models that scale their embeddings (Gemma)
_TIED_FINAL_NORM_STD = 1.0
_EOS_ROW_SCALE = 0.05  # EOS logit ~0 while the top logit is ~3 std up: random generations rarely stop early
_PER_HEAD_QK_NORM = "_layernorm.norms."  # StableLM's per-head q/k LayerNorms (q_layernorm.norms.<h>)
INITIALIZER_RANGE = 0.1  # recorded in config.json; the weights themselves come from _spread_init


def _make_config(arch: str, size: str, vocab_size: int, special_ids: dict[str, int], overrides: dict[str, Any]) -> Any:
    """Builds the transformers config; `overrides` win over the size preset (e.g. num_key_value_heads=1)."""
    from transformers import (
        CohereConfig,
        FalconConfig,
        Gemma2Config,
        GemmaConfig,
        GPTJConfig,
        GPTNeoXConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Olmo2Config,
        OlmoConfig,
        Phi3Config,
        PhiConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        StableLmConfig,
        Starcoder2Config,
    )

    if arch not in SUPPORTED_TINY_ARCHS:
        raise ValueError(f"Unknown tiny arch {arch!r}; choose one of {SUPPORTED_TINY_ARCHS}")
    if size not in SIZES:
        raise ValueError(f"Unknown tiny size {size!r}; choose one of {tuple(SIZES)}")
    if arch in _LAYER_NORM_ARCHS:
        return _make_layer_norm_config(arch, size, vocab_size, special_ids, overrides)
    preset = SIZES[size]
    kwargs: dict[str, Any] = dict(
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(preset.get("rope_theta", 10000.0))},
        **special_ids,
    )
    kwargs.update({k: v for k, v in preset.items() if k not in _PRESET_ONLY_KEYS}, vocab_size=vocab_size)
    if arch == "mistral":
        kwargs["sliding_window"] = None  # a 4096 window over a 512 context is a no-op; override to exercise it
    if arch in ("qwen2", "qwen3") and overrides.get("sliding_window") is not None:
        kwargs["use_sliding_window"] = True  # Qwen2 ignores sliding_window unless this flag is on
        kwargs["max_window_layers"] = 0  # ...and only applies it to layers >= max_window_layers
    if arch in ("gemma", "gemma2"):
        # Gemma's defaults are the 256-wide heads of the real models and tied embeddings (its checkpoints tie).
        head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        kwargs.update(head_dim=head_dim, tie_word_embeddings=True)
        if arch == "gemma2":  # its 4096 window is a no-op over a 512 context: override sliding_window to exercise it
            # Not head_dim, so a scale taken from head_dim shows; the sharper attention also keeps outputs varied.
            kwargs.update(query_pre_attn_scalar=head_dim // 2)
    if arch == "qwen2_moe":  # 4 experts, top-2, narrow routed experts beside a wider shared one and dense layers
        width = kwargs["intermediate_size"]
        kwargs.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=width // 4,
            shared_expert_intermediate_size=width // 2,
        )
    if arch == "mixtral":  # 4 experts of half the dense width, top-2; sliding_window stays null unless overridden
        kwargs.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=kwargs["intermediate_size"] // 2)
    if arch in ("starcoder2", "olmo", "stablelm", "cohere"):
        del kwargs["rms_norm_eps"]  # LayerNorm families: their own eps key (norm_epsilon, layer_norm_eps) or none
    if "rope_scaling" in overrides:  # legacy spelling: fold it into rope_parameters (transformers 5 style)
        scaling = dict(overrides.pop("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], **scaling}
    if "rope_theta" in overrides:
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "rope_theta": float(overrides.pop("rope_theta"))}
    if arch in PARALLEL_RESIDUAL_TINY_ARCHS:
        kwargs = _parallel_residual_kwargs(arch, kwargs)
    kwargs.update(overrides)
    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "granite": GraniteConfig,
        "olmo2": Olmo2Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "qwen2_moe": Qwen2MoeConfig,
        "mixtral": MixtralConfig,
        "phi3": Phi3Config,
        "starcoder2": Starcoder2Config,
        "olmo": OlmoConfig,
        "stablelm": StableLmConfig,
        "cohere": CohereConfig,
        "gptj": GPTJConfig,
        "gpt_neox": GPTNeoXConfig,
        "falcon": FalconConfig,
        "phi": PhiConfig,
    }[arch]
    return cls(**kwargs)


def _make_layer_norm_config(
    arch: str, size: str, vocab_size: int, special_ids: dict[str, int], overrides: dict[str, Any]
) -> Any:
    """GPT-2, GPT-BigCode, OPT and Bloom configs from the size preset (their own defaults otherwise: tied heads,
    GPT-2's n_inner None = 4 * hidden, BigCode's multi_query); `overrides` use each family's own keys."""
    from transformers import BloomConfig, GPT2Config, GPTBigCodeConfig, OPTConfig

    preset = SIZES[size]
    kwargs: dict[str, Any] = dict(
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_hidden_layers"],
        num_attention_heads=preset["num_attention_heads"],
        vocab_size=vocab_size,
        initializer_range=INITIALIZER_RANGE,
        **special_ids,
    )
    if arch != "bloom":  # ALiBi: no position table
        kwargs["max_position_embeddings"] = 512
    if arch == "opt":
        kwargs["ffn_dim"] = preset["intermediate_size"]
    cls = {"gpt2": GPT2Config, "gpt_bigcode": GPTBigCodeConfig, "opt": OPTConfig, "bloom": BloomConfig}[arch]
    for common, native in getattr(cls, "attribute_map", {}).items():
        if native in overrides:  # an override in the family's spelling (n_head=5) replaces the preset's value
            kwargs.pop(common, None)
    kwargs.update(overrides)
    return cls(**kwargs)


def _parallel_residual_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The common preset in each family's own config keys; Llama-only keys are dropped.

    Defaults exercise partial rotary (a quarter or half of each head) and untied heads; GQA/MQA, the residual
    styles and Falcon's layouts come from overrides."""
    kwargs = dict(kwargs)
    kv_heads = kwargs.pop("num_key_value_heads")
    kwargs.pop("rms_norm_eps")
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    if arch == "gptj":  # n_* names; theta is fixed at 10000; rotary_dim counts features, GPT-J interleaved
        kwargs.pop("rope_parameters")
        renames = dict(
            hidden_size="n_embd", num_hidden_layers="n_layer", num_attention_heads="n_head",
            intermediate_size="n_inner", max_position_embeddings="n_positions",
        )
        kwargs = {renames.get(k, k): v for k, v in kwargs.items()}
        kwargs.update(rotary_dim=head_dim // 4, layer_norm_epsilon=1e-5)  # a quarter, as GPT-J 6B (64 of 256)
    elif arch == "gpt_neox":
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "partial_rotary_factor": 0.25}
        kwargs.update(layer_norm_eps=1e-5)
    elif arch == "falcon":  # the new decoder architecture (GQA, ln_attn + ln_mlp); overrides select the old one
        kwargs["ffn_hidden_size"] = kwargs.pop("intermediate_size")
        kwargs.update(
            new_decoder_architecture=True, num_kv_heads=kv_heads, multi_query=True, parallel_attn=True, bias=False,
            alibi=False, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        )
    elif arch == "phi":
        kwargs["rope_parameters"] = {**kwargs["rope_parameters"], "partial_rotary_factor": 0.5}
        kwargs.update(num_key_value_heads=kv_heads, layer_norm_eps=1e-5)
    return kwargs


def _spread_init(model: Any, eos_id: int) -> None:
    """Re-initialises every weight so greedy decoding wanders, depends on context, and has clear argmaxes.

    HF's default (std 0.02, unit norms, zero biases) gives near-flat logits that loop on one or two tokens.
    """
    import torch

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, _EMBED_STD)
            elif isinstance(module, torch.nn.Linear):
                if leaf == "lm_head" and tied:
                    if module.bias is not None:  # GPT-J, Phi: the head's own bias is not shared
                        module.bias.normal_(0.0, _BIAS_STD)
                    continue  # shares the embedding; scaled below
                gain = _gain(model.config.model_type, leaf)
                module.weight.normal_(0.0, gain / math.sqrt(module.in_features))
                if module.bias is not None:
                    module.bias.normal_(0.0, _BIAS_STD)
            elif leaf == "experts" and isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
                # transformers' stacked experts: [E, 2I, H] gate/up and [E, H, I] down, fan-in last.
                for param in (module.gate_up_proj, module.down_proj):
                    param.normal_(0.0, _DEFAULT_GAIN / math.sqrt(param.shape[-1]))
            elif leaf == "gate" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
                module.weight.normal_(0.0, _ROUTER_GAIN / math.sqrt(module.weight.shape[1]))  # an MoE router
            elif type(module).__name__ == "Conv1D":  # GPT-2's linear, weight stored [in, out]
                module.weight.normal_(0.0, _gain(model.config.model_type, leaf) / math.sqrt(module.weight.shape[0]))
                module.bias.normal_(0.0, _BIAS_STD)
            elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                # q/k norms (Qwen3, Olmo2, Phi, StableLM's per-head ones) undo the q/k gains above; larger weights
                # restore the sharp attention.
                qk_norm = leaf in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") or _PER_HEAD_QK_NORM in name
                center = _QK_NORM_CENTER if qk_norm else 1.0
                offset = 1.0 if type(module).__name__.startswith("Gemma") else 0.0  # Gemma scales by 1 + weight
                module.weight.normal_(center - offset, _NORM_STD * center)
                if getattr(module, "bias", None) is not None:  # LayerNorm: a bias left unloaded must show
                    module.bias.normal_(0.0, _BIAS_STD)
        head = model.get_output_embeddings().weight
        if tied and model.config.model_type in PARALLEL_RESIDUAL_TINY_ARCHS:
            # The input embeddings of these LayerNorm models are the whole residual stream's start: shared rows as
            # large as the head needs make the head echo the current token. Shrink them further and scale the
            # final LayerNorm up by as much, so the logits keep their spread.
            shrink = _SCALED_TIED_EMBED_SHRINK
            head.mul_(_GAINS["lm_head"] / math.sqrt(head.shape[1]) / shrink)
            final_norm = _final_layer_norm(model)
            final_norm.weight.mul_(shrink)
            final_norm.bias.mul_(shrink)
        elif tied:  # unit-std rows would give logits of std sqrt(hidden): far too peaked for sampling tests
            head.mul_(_GAINS["lm_head"] / math.sqrt(head.shape[1]))
            # Gemma multiplies the embeddings by sqrt(hidden): so large an input makes the tied head echo the
            # current token (greedy output loops on it). Shrink the shared rows (beyond undoing that factor) and
            # grow the final norm's scale by as much, so the logits keep their spread.
            embed_scale = float(getattr(model.get_input_embeddings(), "scalar_embed_scale", 1.0))
            final_norm = getattr(model.base_model, "norm", None)
            if embed_scale != 1.0 and final_norm is not None:
                shrink = embed_scale * _SCALED_TIED_EMBED_SHRINK
                head.div_(shrink)
                offset = 1.0 if type(final_norm).__name__.startswith("Gemma") else 0.0
                final_norm.weight.add_(offset).mul_(shrink).sub_(offset)
            if model.config.model_type in _EXTRA_SHRUNK_TIED_EMBED_MODEL_TYPES and final_norm is not None:
                _shrink_tied_embeddings(head, final_norm)
            # Bloom normalises the embeddings, so the residual stream carries the current token's (tied) row at
            # full scale and the head echoes it. Final-norm weights of random sign break that alignment.
            embed_norm = getattr(model.base_model, "word_embeddings_layernorm", None)
            if embed_norm is not None:
                model.base_model.ln_f.weight.normal_(0.0, _TIED_FINAL_NORM_STD)
        head[eos_id].mul_(_EOS_ROW_SCALE)


# Tied Phi-3, Starcoder2 and StableLM models loop on a token or two even with the shrunk shared rows above: shrink
# them further (a smaller input embedding) and grow the final norm by as much, so the logits keep their spread.
_EXTRA_SHRUNK_TIED_EMBED_MODEL_TYPES = ("phi3", "starcoder2", "stablelm")
_TIED_EMBED_EXTRA_SHRINK = 4.0


def _shrink_tied_embeddings(head: Any, final_norm: Any) -> None:
    head.div_(_TIED_EMBED_EXTRA_SHRINK)
    final_norm.weight.mul_(_TIED_EMBED_EXTRA_SHRINK)
    if getattr(final_norm, "bias", None) is not None:
        final_norm.bias.mul_(_TIED_EMBED_EXTRA_SHRINK)


def _final_layer_norm(model: Any) -> Any:
    """The LayerNorm before the head, under each parallel-residual family's own name."""
    base = model.base_model
    for name in ("ln_f", "final_layer_norm", "final_layernorm"):
        if hasattr(base, name):
            return getattr(base, name)
    raise ValueError(f"{type(model).__name__}: no final LayerNorm found")


def build_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    **config_overrides: Any,
) -> Path:
    """Writes a complete HF checkpoint folder (config, safetensors, tokenizer, generation config) and returns it.

    dtype / device: where the random weights are made and how they are saved (a GPU benchmark's 8B checkpoint is
    drawn on the GPU in bfloat16: on a CPU in float32 it would take minutes and 32 GB)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, pad_to=config_overrides.get("vocab_size", SIZES.get(size, {}).get("vocab_size")))
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = _make_config(arch, size, len(tokenizer), special_ids, dict(config_overrides))
    rng_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # seed our weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        _spread_init(model, tokenizer.eos_token_id)
    model.generation_config = GenerationConfig(**special_ids)
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **save_kwargs)
    return out


def default_tiny_model_dir(arch: str = "llama") -> Path:
    """Returns the cached default tiny checkpoint, building it once (into a temp dir, then an atomic rename)."""
    target = cache_root() / f"tiny-{arch}-v{TINY_FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=target.parent))
    try:
        build_tiny_checkpoint(tmp, arch=arch)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its complete copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny %s checkpoint at %s", arch, target)
    return target


def ensure_model_dir(model: str) -> None:
    """Builds the default tiny checkpoint where `model` names it but this node lacks it (a fresh cluster node)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return
    for arch in SUPPORTED_TINY_ARCHS:
        if path == cache_root() / f"tiny-{arch}-v{TINY_FORMAT_VERSION}":
            default_tiny_model_dir(arch)
