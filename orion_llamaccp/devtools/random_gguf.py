"""Write a llama-architecture GGUF with random weights.

Compute cost does not depend on the weights' values, so a random model of a given shape
decodes exactly as fast as a trained one of that shape. Tests use a tiny one (a few hundred
kB, thousands of tokens/s on a CPU: GPU-like rates that expose per-token costs of the
relay); the GPU benchmark writes a realistic one on the device machine.

    python -m orion_llamaccp.devtools.random_gguf out.gguf [--n-embd 64 --layers 2 ...]
"""

from __future__ import annotations

import argparse
import itertools
import string
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _pieces() -> Iterator[str]:
    """Word pieces, shortest first: enough for a realistic vocabulary (tens of thousands)."""
    letters = string.ascii_lowercase
    for length in (1, 2, 3, 4):
        for combo in itertools.product(letters, repeat=length):
            word = "".join(combo)
            yield "\u2581" + word
            yield word


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """An SPM vocabulary: control tokens, the 256 byte tokens, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(gguf.TokenType.BYTE)
    for piece in _pieces():
        if len(tokens) >= size:
            break
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, [int(t) for t in types]


def write_random_llama(
    path: Path,
    *,
    n_embd: int = 64,
    n_layers: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    vocab: int = 512,
    n_ctx: int = 2048,
    f16: bool = False,
    seed: int = 0,
) -> Path:
    """Write the model to ``path`` and return it."""
    rng = np.random.default_rng(seed)
    dtype = np.float16 if f16 else np.float32
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("orion-random-llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = _vocab(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name: str, *shape: int, norm: bool = False) -> None:
        data = np.ones(shape, dtype=np.float32) if norm else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, data.astype(np.float32 if norm else dtype))

    n_vocab = len(tokens)
    tensor("token_embd.weight", n_vocab, n_embd)
    tensor("output_norm.weight", n_embd, norm=True)
    tensor("output.weight", n_vocab, n_embd)
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", n_embd, norm=True)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{name}.weight", n_embd, n_embd)
        tensor(f"blk.{i}.ffn_norm.weight", n_embd, norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n-ff", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--f16", action="store_true")
    args = parser.parse_args(argv)
    path = write_random_llama(
        args.out,
        n_embd=args.n_embd,
        n_layers=args.layers,
        n_head=args.heads,
        n_ff=args.n_ff,
        vocab=args.vocab,
        n_ctx=args.ctx,
        f16=args.f16,
    )
    print(f"{path} {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
