"""Every supported dataset layout converts to what the TRL trainers take."""

from __future__ import annotations

import pytest
from datasets import Dataset

from rlhf.config import RecipeError
from rlhf.data.formats import convert, hh_to_messages

HH_CHOSEN = "\n\nHuman: What color is the zorp?\n\nAssistant: The zorp is red."
HH_REJECTED = "\n\nHuman: What color is the zorp?\n\nAssistant: The zorp is blue."


def test_hh_strings_become_explicit_prompt_preference():
    data = Dataset.from_list([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    row = convert(data, "preference")[0]
    assert row["prompt"] == [{"role": "user", "content": "What color is the zorp?"}]
    assert row["chosen"] == [{"role": "assistant", "content": "The zorp is red."}]
    assert row["rejected"] == [{"role": "assistant", "content": "The zorp is blue."}]


def test_ultrafeedback_implicit_prompt_lists():
    user = {"role": "user", "content": "Hi"}
    data = Dataset.from_list(
        [
            {
                "prompt": "Hi",
                "chosen": [user, {"role": "assistant", "content": "Hello!"}],
                "rejected": [user, {"role": "assistant", "content": "Go away."}],
                "score_chosen": 9.0,
            }
        ]
    )
    row = convert(data, "preference")[0]
    assert row["prompt"] == [user]
    assert row["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert set(row) == {"prompt", "chosen", "rejected"}


def test_explicit_plain_preference_passes_through():
    data = Dataset.from_list([{"prompt": "Q", "chosen": "good", "rejected": "bad", "id": 1}])
    assert convert(data, "preference")[0] == {"prompt": "Q", "chosen": "good", "rejected": "bad"}


def test_sft_layouts():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert convert(Dataset.from_list([{"messages": messages, "x": 1}]), "sft").column_names == ["messages"]
    pc = convert(Dataset.from_list([{"prompt": "a", "completion": "b"}]), "sft")
    assert pc[0] == {"prompt": "a", "completion": "b"}
    sharegpt = Dataset.from_list(
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    )
    assert convert(sharegpt, "sft")[0]["messages"] == messages
    hh = convert(Dataset.from_list([{"text": HH_CHOSEN}]), "sft")[0]["messages"]
    assert hh == hh_to_messages(HH_CHOSEN) and hh[1]["role"] == "assistant"


def test_language_modeling_and_prompt_only():
    assert convert(Dataset.from_list([{"prompt": "a ", "completion": "b"}]), "language_modeling")[0] == {"text": "a b"}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt_only = convert(Dataset.from_list([{"messages": messages}]), "prompt_only")[0]
    assert prompt_only == {"prompt": [{"role": "user", "content": "Hi"}]}
    from_pairs = convert(Dataset.from_list([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), "prompt_only")[0]
    assert from_pairs["prompt"][0]["content"] == "What color is the zorp?"


def test_missing_columns_name_the_fix():
    with pytest.raises(RecipeError, match=r"columns \['question', 'answer'\] do not fit.*dataset_rename_columns"):
        convert(Dataset.from_list([{"question": "q", "answer": "a"}]), "sft")
    with pytest.raises(RecipeError, match="`chosen`\\+`rejected`"):
        convert(Dataset.from_list([{"prompt": "q", "completion": "a"}]), "preference")


def test_implicit_prompt_pair_with_an_empty_side_converts():
    """trl's extract_prompt fails on an empty side; the pair passes through for cleaning to drop and count."""
    data = Dataset.from_list(
        [{"chosen": "", "rejected": "Q: hi A: no"}, {"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}]
    )
    rows = convert(data, "preference").to_list()
    assert rows[0] == {"prompt": "", "chosen": "", "rejected": "Q: hi A: no"}
    assert rows[1] == {"prompt": "Q: hi A:", "chosen": " yes", "rejected": " no"}
