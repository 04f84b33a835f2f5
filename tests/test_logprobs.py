"""rlhf.logprobs: response log-probabilities with the output layer run only where a response token is predicted."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from rlhf.logprobs import pack_prompts_and_responses, response_forward, response_logprobs


class LlamaWithoutLogitsToKeep(LlamaForCausalLM):
    """A causal LM whose forward does not take `logits_to_keep` (as some remote-code models): logits everywhere."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states=None, **kwargs):
        assert "logits_to_keep" not in kwargs
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
        )


def _batch() -> tuple[torch.Tensor, torch.Tensor, int]:
    pairs = [([5, 6, 7], [8, 9, 10, 11]), ([4, 5, 6, 7, 8], [9, 10])]
    ids, mask, context_length, _ = pack_prompts_and_responses(pairs, pad_token_id=0)
    return ids, mask, context_length


def _full_logits_reference(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, context_length: int):
    """The log-probs the slow way: logits at every position, then the response positions taken."""
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, context_length - 1 : -1]
    return torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, context_length:, None]).squeeze(-1)


def test_the_output_layer_runs_only_on_positions_that_predict_a_response_token(tiny_sft_checkpoint: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint).eval()
    ids, mask, context_length = _batch()
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    with torch.no_grad():
        logprobs, logits = response_logprobs(model, ids, mask, context_length, temperature=0.7)
        expected = _full_logits_reference(model, ids, mask, context_length)
    hook.remove()
    response_width = ids.shape[1] - context_length
    assert widths[0] == response_width + 1  # the last position predicts nothing and is dropped after the layer
    assert widths[1] == ids.shape[1]  # the reference pass above
    assert logits.shape == (2, response_width, model.config.vocab_size)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)


def test_a_lora_policy_and_a_model_without_logits_to_keep_give_the_same_log_probs(
    tiny_sft_checkpoint: Path, tmp_path: Path
):
    ids, mask, context_length = _batch()
    plain = AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint).eval()
    fallback = LlamaWithoutLogitsToKeep.from_pretrained(tiny_sft_checkpoint).eval()
    torch.manual_seed(0)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_sft_checkpoint),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    with torch.no_grad():
        for model in (plain, fallback, lora):
            logprobs, _ = response_logprobs(model, ids, mask, context_length, temperature=0.7)
            expected = _full_logits_reference(model, ids, mask, context_length)
            torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
        hidden = response_forward(lora, ids, mask, context_length, hidden=True).hidden_states
    assert hidden[-1].shape[1] == ids.shape[1]  # hidden states stay whole: a value head picks its positions
