"""The built-in tokenizer: a byte-level BPE trained deterministically on a fixed text, its special tokens and
chat template, and `build_tokenizer`, which saves it in a form transformers 4.x and 5 both load."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is heavy; import it only when a tokenizer is actually built
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)  # ids 0..5, in this order
TINY_VOCAB_SIZE = 512

# Roles are checked so a bad message fails loudly; the assistant turn ends with EOS so generation stops there.
# With `tools`, the system turn lists them and asks for calls in hermes' form (`<tool_call>{"name": ...,
# "arguments": {...}}</tool_call>`, what `--tool-call-parser hermes` reads); an assistant's calls are written back in
# that form and a tool's result goes in a user turn inside `<tool_response>`. Without tools or tool turns the text
# is what it always was (the demo model was trained on it).
TOOLS_PREAMBLE = "# Tools\n\nYou may call these functions:\n<tools>"  # terse: a 512-token context holds them
TOOLS_INSTRUCTIONS = (
    "\n</tools>\n\nTo call one, write:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ " + repr(TOOLS_PREAMBLE) + " }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson(separators=(',', ':'))) }}{% endfor %}"
    "{{ " + repr(TOOLS_INSTRUCTIONS) + " + eos_token + '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (expected system, user, assistant or tool)') }}"
    "{% endif %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|>\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' + eos_token + '\\n' }}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|assistant|>\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}"
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


def _train_backend_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None) -> Any:
    """Trains the byte-level BPE on `corpus` (the built-in lines by default); merges are ordered by (count, pair),
    so training is deterministic."""
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
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    # Like Llama: plain encodes start with BOS (chat templates write it themselves and encode without specials).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = TINY_VOCAB_SIZE,
    pad_to: int | None = None,
    corpus: Iterable[str] | None = None,
    model_max_length: int = 512,
) -> "PreTrainedTokenizerFast":
    """Trains the built-in tokenizer, saves it to `out_dir` (tokenizer.json + config files) and returns it.

    `pad_to` fills the vocabulary up with plain tokens `<|extra_N|>`, for model shapes with a large vocabulary
    (a random model draws every id; each must decode to text). `corpus` replaces the built-in training lines
    (the demo model's tokenizer is trained on its own corpus)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend_tokenizer(vocab_size, corpus),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
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
