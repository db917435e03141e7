"""Tiny random-weight causal LMs of real architectures (from_config, deterministic) and an in-memory tokenizer."""

from __future__ import annotations

import torch
import transformers

VOCAB = 160

# Shared by every family: 2 layers, hidden 64, 4 query heads over 2 KV heads (GQA), head dim 16.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # Larger than the usual 0.02 so that attention is far from uniform and the logits depend on the cache.
    initializer_range=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(head_dim=16)),
    # sliding_window smaller than the sequences of the tests, so the window matters.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(head_dim=16, sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(use_sliding_window=False)),  # q/k/v bias
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),  # q/k RMSNorm
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict()),  # fused qkv, head dim 16
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
}


def tiny_config(family: str = "llama", **overrides):
    config_cls, _, extra = FAMILIES[family]
    return config_cls(**{**_COMMON, **extra, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "saw_int4", dtype=torch.float32, **overrides):
    """A deterministic tiny model in eval mode, float32 unless `dtype` says otherwise."""
    _, model_cls, _ = FAMILIES[family]
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a cache keeps the keys and values of every token",
    "four bits per number are enough for many models",
    "hello how are you today",
    "i am fine thank you and you",
    "the model reads the cache and writes a new token",
    "tell me a story about a small red fox",
    "once upon a time there was a tiny model",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast built in memory (no hub), with pad/bos/eos and a chat template.

    Its vocabulary has exactly VOCAB entries (the words of SENTENCES, then fillers), so every id a tiny model
    samples decodes to a word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    words = list(dict.fromkeys(w for s in SENTENCES for w in s.split()))
    words += [f"w{i}" for i in range(VOCAB - len(specials) - len(words))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[4:]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    assert len(fast) == VOCAB
    return fast
