"""Random-weight models with the exact shapes of Qwen2.5-{0.5B,1.5B,3B}-Instruct, built offline.

Same parameter count, FLOPs and memory as the released models (valid for speed and memory, not
accuracy). The tokenizer is a byte-level BPE trained on the MATH problems at hand, padded to
Qwen's vocabulary size, so prompts have realistic lengths and every sampled id decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

# From the public config.json of each Qwen2.5-*-Instruct model, and of Qwen2.5-Math-7B (the
# paper's model: untied embeddings, a 152,064-token vocabulary, a 4,096-token context).
QWEN_VOCAB = 151_936
QWEN25_SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152_064,
               tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10_000.0),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 32_000, pad_to: int = QWEN_VOCAB):
    """Byte-level BPE on `texts`, its vocabulary padded with never-produced tokens to `pad_to`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), pad_to):
        vocab[f"<|pad_{i}|>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_random_qwen(shape: str, out_dir: str | Path, texts: list[str], seed: int = 0) -> Path:
    """Save a bf16 random-init Qwen2 model of the given shape with a trained tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    shape_cfg = {"vocab_size": QWEN_VOCAB, "max_position_embeddings": 32768, "rope_theta": 1e6,
                 "tie_word_embeddings": True, **QWEN25_SHAPES[shape]}
    tok = train_tokenizer(texts, pad_to=shape_cfg["vocab_size"])
    cfg = Qwen2Config(rms_norm_eps=1e-6, torch_dtype="bfloat16", eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, **shape_cfg)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    # Qwen2.5-Instruct's sampling defaults: the engines must ignore them.
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def math_texts(data_dir: str | Path) -> list[str]:
    rows = []
    for split in ("train", "test"):
        path = Path(data_dir) / f"{split}.jsonl"
        if path.exists():
            rows += [json.loads(line) for line in path.open()]
    return [r["problem"] + "\n" + r.get("solution", "") for r in rows]
