"""Tiny random encoder checkpoints (BERT, ModernBERT) and reward models trained from them, built once per session.

Import the fixtures into a test module (`from tests.encoders import ...`). The tokenizers are real
WordPiece tokenizers trained with `tokenizers` on the synthetic world's text, saved with
`save_pretrained` and loaded back by path, as a user's checkpoint would be:
BERT's is a `BertTokenizer` (token type ids, as the originals); ModernBERT's a plain fast tokenizer
whose pair template is `[CLS] A [SEP] B [SEP]` and which returns no token type ids, as ModernBERT's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from tests.conftest import FAST_TRAINING, write_recipe

SPECIAL_TOKENS = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
HIDDEN_SIZE = 32
MAX_POSITIONS = 128
# The reward stage's max_length and max_eval_samples below; TRL drops pairs longer than max_length.
REWARD_MAX_LENGTH = 96
MAX_EVAL_SAMPLES = 64


def word_piece(vocab_size: int = 600) -> Tokenizer:
    """A lower-casing WordPiece tokenizer trained on the synthetic world's text."""
    from rlhf.data.synthetic import corpus_for_tokenizer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(corpus_for_tokenizer(), trainer)
    return tokenizer


def build_bert(path: Path) -> Path:
    """A random BertForSequenceClassification (one label) with a BertTokenizer, saved to `path`."""
    vocab = word_piece().get_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=MAX_POSITIONS)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=1,
        pad_token_id=vocab["[PAD]"],
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_modernbert(path: Path) -> Path:
    """A random ModernBertForSequenceClassification (one label) with a plain fast WordPiece tokenizer."""
    tokenizer = word_piece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=MAX_POSITIONS,
    )
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        num_labels=1,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
        cls_token_id=cls_id,
        sep_token_id=sep_id,
        bos_token_id=cls_id,
        eos_token_id=sep_id,
    )
    ModernBertForSequenceClassification(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def preference_files(root: Path) -> dict[str, Path]:
    """Train/test jsonl of the synthetic world's refusal and greeting pairs (facts need knowledge a random
    encoder lacks)."""
    from rlhf.data.synthetic import classify_prompt, make_synthetic_dataset

    files = {}
    for split, rows in (("train", 600), ("test", 120)):
        pairs = make_synthetic_dataset("preference", rows, seed=0, split=split)
        pairs = pairs.filter(lambda r: classify_prompt(r["prompt"][0]["content"]) != "fact")
        files[split] = root / f"{split}.jsonl"
        pairs.to_json(files[split])
    return files


def train_encoder_reward(base: Path, root: Path, **keys) -> Path:
    """The reward stage run on an encoder `base` over `preference_files`; returns the output directory."""
    from rlhf.stages import reward

    files = preference_files(root)
    out = root / "reward"
    settings = {
        "clean_deduplicate": False,
        "max_eval_samples": MAX_EVAL_SAMPLES,
        "max_length": REWARD_MAX_LENGTH,
        "num_train_epochs": 2,
        "learning_rate": 3e-3,
        "reward_stats_samples": 64,
        **FAST_TRAINING,
        "per_device_train_batch_size": 16,
    }
    recipe = write_recipe(
        root / "reward.yaml",
        stage="reward",
        model_name_or_path=str(base),
        dataset_name=str(files["train"]),
        eval_dataset_name=str(files["test"]),
        output_dir=str(out),
        **{**settings, **keys},
    )
    reward.main([str(recipe)])
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny BERT sequence classifier (hidden 32, 2 layers) with its WordPiece tokenizer, on disk."""
    return build_bert(tmp_path_factory.mktemp("bert") / "base")


@pytest.fixture(scope="session")
def tiny_modernbert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ModernBERT sequence classifier (hidden 32, 2 layers) with its WordPiece tokenizer, on disk."""
    return build_modernbert(tmp_path_factory.mktemp("modernbert") / "base")


@pytest.fixture(scope="session")
def bert_reward_checkpoint(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained by the reward stage from the tiny BERT on refusal/greeting pairs."""
    return train_encoder_reward(tiny_bert, tmp_path_factory.mktemp("bert_reward"))
