"""Build a tiny random-weight Llama (and its tokenizer) in a local directory.

vLLM tests need a real HF model directory; downloading one is not allowed, so
we train a byte-level BPE tokenizer on a few lines and save a 2-layer Llama
with random weights. Everything is seeded, so two builds give identical files
(and greedy outputs are reproducible across runs).
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_NAME = "tiny-llama"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Byte-level BPE can encode any text; the corpus only decides the merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "NATS JetStream carries requests, work items and tokens between services.",
    "An orchestrator schedules prompts onto workers that run a language model.",
    "Prefill computes the prompt's KV cache; decode produces one token at a time.",
    "Hello, world! How are you today? I am fine, thank you.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \"",
    "user: tell me a story. assistant: once upon a time there was a tiny model.",
]

# Simple chat template: one "role: content" line per message, then the cue.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int) -> int:
    """A byte-level BPE tokenizer (and its config, with the chat template) in `out`;
    returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )
    return int(tok.get_vocab_size())


def build_tiny_llama(out: Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer into `out` (created) and return it.

    head_dim is 32: vLLM's CPU attention backend supports no smaller.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, vocab_size)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init with std 0.02 makes near-uniform logits; scale the output
    # head so greedy picks are decisive and EOS is rarely the argmax.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    ).save_pretrained(str(out))
    return out


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-llama")))
