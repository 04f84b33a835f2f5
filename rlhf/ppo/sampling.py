"""Sampling: prompts encoded once, the order an update draws them in, responses generated and decoded."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from rlhf.ppo.core import response_mask


def encode_prompts(tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> list[dict[str, Any]]:
    """Tokenize prompts once (chat template with the generation prompt for conversational ones)."""
    rows = []
    for row in dataset:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": list(ids), "row": row})
    return rows


class PromptOrder:
    """Which prompts each update uses: a seeded shuffle per epoch, sliced per process.

    Its position (the next update) is its whole state, so `Accelerator.save_state` checkpoints it
    through `state_dict` and a resumed run continues with the same prompts.
    """

    def __init__(self, num_prompts: int, batch_size: int, local_batch_size: int, process_index: int, seed: int) -> None:
        self.num_prompts, self.batch_size, self.local_batch_size = num_prompts, batch_size, local_batch_size
        self.process_index, self.seed = process_index, seed
        self.batches_per_epoch = num_prompts // batch_size
        self.next_update = 0

    def indices(self, update: int) -> list[int]:
        """This process's prompt indices for 0-based `update`."""
        epoch, position = divmod(update, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_prompts, generator=generator).tolist()
        start = position * self.batch_size + self.process_index * self.local_batch_size
        return order[start : start + self.local_batch_size]

    def next_indices(self) -> list[int]:
        """The prompt indices of the next update; advances the position."""
        indices = self.indices(self.next_update)
        self.next_update += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"next_update": self.next_update}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_update = state["next_update"]


def left_pad(sequences: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's generation starts at the same column."""
    tensors = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="left")
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    policy: PreTrainedModel,
    prompt_ids: list[list[int]],
    *,
    pad_token_id: int,
    stop_token_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    do_sample: bool,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Generate responses; returns (prompt+response ids, attention mask that ends at the stop token, prompt length)."""
    queries, query_mask = left_pad(prompt_ids, pad_token_id, device)
    context_length = queries.shape[1]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if not stop_token_ids else None,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        eos_token_id=stop_token_ids or None,
        pad_token_id=pad_token_id,
        use_cache=True,
        # Weights that blew up give NaN logits; sampling from them would crash with a traceback before
        # the trainer's checks see the non-finite log-probabilities and stop cleanly.
        remove_invalid_values=True,
    )
    was_training = policy.training
    policy.eval()
    chunks = []
    for start in range(0, queries.shape[0], batch_size):
        output = policy.generate(
            input_ids=queries[start : start + batch_size],
            attention_mask=query_mask[start : start + batch_size],
            generation_config=config,
        )
        response = output[:, context_length:]
        if response.shape[1] < max_new_tokens:  # every sequence stopped early
            filler = response.new_full((response.shape[0], max_new_tokens - response.shape[1]), pad_token_id)
            response = torch.cat([response, filler], dim=1)
        chunks.append(response)
    policy.train(was_training)
    responses = torch.cat(chunks)
    mask = response_mask(responses, stop_token_ids)
    responses = responses.masked_fill(~mask, pad_token_id)
    return torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1), context_length


def completion_texts(tokenizer: PreTrainedTokenizerBase, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Decoded responses, up to and including the stop token, without special tokens."""
    return [tokenizer.decode(r[m].tolist(), skip_special_tokens=True).strip() for r, m in zip(responses, mask.bool())]
