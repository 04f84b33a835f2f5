"""Attention heatmaps and top attended tokens of the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from trl import ModelConfig

from rlhf.config import RecipeError
from rlhf.interpret import attention_maps, main, top_attended
from rlhf.modeling import load_causal_lm, load_tokenizer

TEXT = "What color is the zorp?"


def test_attention_grid_per_layer_and_top_tokens(tiny_checkpoint: Path, tmp_path: Path):
    main([str(tiny_checkpoint), "--text", TEXT, "--output", str(tmp_path / "all")])
    main([str(tiny_checkpoint), "--text", TEXT, "--output", str(tmp_path / "two"), "--layers", "1", "--heads", "0,2"])
    # tiny_checkpoint: 2 layers × 4 heads → one PNG per layer, heads side by side.
    assert sorted(p.name for p in (tmp_path / "all").glob("*.png")) == ["layer_0.png", "layer_1.png"]
    assert [p.name for p in (tmp_path / "two").glob("*.png")] == ["layer_1.png"]
    height, width = matplotlib.image.imread(tmp_path / "all" / "layer_0.png").shape[:2]
    two_height, two_width = matplotlib.image.imread(tmp_path / "two" / "layer_1.png").shape[:2]
    assert width / height == pytest.approx(4 * height / height, rel=0.25)
    assert two_width / two_height == pytest.approx(2, rel=0.25)

    summary = json.loads((tmp_path / "two" / "top_tokens.json").read_text())
    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(tiny_checkpoint)))
    assert "".join(summary["tokens"]) == tokenizer.decode(tokenizer(TEXT)["input_ids"])
    assert list(summary["layers"]) == ["1"] and list(summary["layers"]["1"]) == ["0", "2"]
    top = summary["layers"]["1"]["2"]
    assert len(top) == 5
    assert [t["weight"] for t in top] == sorted((t["weight"] for t in top), reverse=True)
    assert all(summary["tokens"][t["index"]] == t["token"] for t in top)


def test_attention_rows_are_distributions_and_top_tokens_follow_them(tiny_checkpoint: Path):
    args = ModelConfig(model_name_or_path=str(tiny_checkpoint), attn_implementation="eager")
    model, tokenizer = load_causal_lm(args), load_tokenizer(args)
    tokens, attentions = attention_maps(model, tokenizer, TEXT)
    assert attentions.shape == (2, 4, len(tokens), len(tokens))
    assert torch.allclose(attentions.sum(-1), torch.ones(2, 4, len(tokens)), atol=1e-4)
    assert torch.all(attentions.triu(1) == 0)  # causal: no attention to later tokens
    one_hot = torch.zeros(3, 3)
    one_hot[:, 0] = 1.0  # every query attends only to the first token
    assert top_attended(one_hot, ["a", "b", "c"], k=1) == [{"index": 0, "token": "a", "weight": 1.0}]


def test_bad_layer_index_is_a_recipe_error(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(RecipeError, match="layers"):
        main([str(tiny_checkpoint), "--text", TEXT, "--output", str(tmp_path / "x"), "--layers", "7"])
    assert not (tmp_path / "x").exists()
