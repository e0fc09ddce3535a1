"""The shapes world's text side: a word-level tokenizer and a tiny T5 encoder, both real transformers classes."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from slimdit.worlds.shapes.prompts import vocabulary

MAX_SEQUENCE_LENGTH = 16  # longest caption is 12 words plus </s>
SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids: pad 0, eos 1, unk 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build a T5-style word-level tokenizer over the grammar's vocabulary (pad 0, ``</s>`` appended)."""
    vocab = {w: i for i, w in enumerate([*SPECIAL, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
    )


def build_text_encoder(vocab_size: int, d_model: int = 64, num_layers: int = 2, num_heads: int = 4) -> T5EncoderModel:
    """Build a tiny randomly initialised T5 encoder (token ids + mask -> hidden states)."""
    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg)
