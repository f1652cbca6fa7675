"""Trains the built-in demo model (`rayinfer-demo`): a small Llama on Python's own documentation.

    .venv/bin/python scripts/train_demo_model.py                       # the shipped model (about 25 min, 2 cores)
    .venv/bin/python scripts/train_demo_model.py --steps 20 --out /tmp/demo-smoke   # a quick try

A byte-level BPE tokenizer and a Llama-shaped model (tied embeddings, float32) are trained from a fixed seed on
`demo_corpus` (pydoc topics + standard-library docstrings, every 20th document held out; a third of the training
documents also as chat turns in the built-in template); the checkpoint is a plain Hugging Face folder. The same Python version, thread count and seed give the same weights. The loss curve
goes to `docs/demo_model_loss.png` and the run's figures to `train_log.json` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_corpus, when run from anywhere
import demo_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "workers" / "demo_model" / "checkpoint"
MODEL_SHAPE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
)
VOCAB_SIZE = 4096
CONTEXT = 512
# A third of the training documents also appear as a chat turn in the built-in template (a question naming the
# subject, the document as the answer), so that `rayinfer chat` gets documentation back rather than noise.
CHAT_EVERY = 3
QUESTIONS = ("What does {} do?", "Describe {}.", "Explain {}.", "What is {} for?", "Tell me about {}.", "{}?")
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer from the Python documentation.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss-png", type=Path, default=REPO / "docs" / "demo_model_loss.png")
    p.add_argument("--eval-every", type=int, default=100)
    return p.parse_args(argv)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream: each document as BOS + text + EOS, so the model learns where documents start and end."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):  # the fast tokenizer adds BOS itself
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def chat_texts(documents: list[tuple[str, str]]) -> list[str]:
    """Chat turns as the built-in template renders them (less the BOS that `tokenize` adds, and the final EOS)."""
    from rayinfer.workers.tiny_checkpoint.tokenizer import EOS, ROLE_TOKENS

    system, user, assistant = ROLE_TOKENS
    texts = []
    for i, (name, text) in enumerate(documents[::CHAT_EVERY]):
        turn = f"{user}\n{QUESTIONS[i % len(QUESTIONS)].format(demo_corpus.subject(name))}{EOS}\n{assistant}\n{text}"
        if i % 5 == 0:
            turn = f"{system}\n{SYSTEM_PROMPTS[i // 5 % len(SYSTEM_PROMPTS)]}{EOS}\n{turn}"
        texts.append(turn)
    return texts


def make_model(tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> float:
    """Mean next-token loss over consecutive windows of the held-out stream."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    n = n if max_windows is None else min(n, max_windows)
    total, count = 0.0, 0
    for start in range(0, n * seq_len, seq_len * 8):
        rows = [stream[s : s + seq_len + 1] for s in range(start, min(start + 8 * seq_len, n * seq_len), seq_len)]
        batch = torch.stack(rows)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*log["train_loss"])
    ax.plot(steps, losses, label="training loss (per step)", alpha=0.6)
    if log["held_out_loss"]:
        es, el = zip(*log["held_out_loss"])
        ax.plot(es, el, "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"rayinfer-demo: {log['parameters'] / 1e6:.1f}M parameters, {log['train_tokens'] / 1e6:.2f}M tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from rayinfer.workers.tiny_checkpoint.tokenizer import build_tokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_documents, held_documents = demo_corpus.split_documents()
    train_texts, held_texts = [t for _, t in train_documents], [t for _, t in held_documents]
    tokenizer = build_tokenizer(args.out, vocab_size=VOCAB_SIZE, corpus=train_texts, model_max_length=CONTEXT)
    train = tokenize(tokenizer, train_texts + chat_texts(train_documents))
    held = tokenize(tokenizer, held_texts)
    model = make_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters; {len(train) / 1e6:.2f}M training tokens, {len(held) / 1e3:.0f}K held out")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    log: dict = {"train_loss": [], "held_out_loss": [], "parameters": params}
    started = time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["train_loss"].append((step, loss.item()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            held_loss = held_out_loss(model, held, args.seq_len, max_windows=64)
            log["held_out_loss"].append((step + 1, held_loss))
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{args.steps}  train {loss.item():.3f}  held-out {held_loss:.3f}  {elapsed:.0f} s",
                  flush=True)
    log.update(
        train_seconds=round(time.perf_counter() - started, 1),
        train_tokens=args.steps * args.batch * args.seq_len,
        corpus_tokens=len(train),
        held_out_tokens=len(held),
        args={k: str(v) for k, v in vars(args).items()},
        python=platform.python_version(),
        torch=torch.__version__,
        machine=f"{platform.machine()}, {args.threads} threads",
    )
    model.save_pretrained(str(args.out), safe_serialization=True)
    (args.out / "train_log.json").write_text(
        json.dumps({k: v for k, v in log.items() if k != "train_loss"}, indent=2) + "\n"
    )
    plot(log, args.loss_png)
    print(f"wrote {args.out} and {args.loss_png} in {log['train_seconds']:.0f} s")
    return log


if __name__ == "__main__":
    main()
