"""Assistant-only loss masks from a checkpoint's own chat template, whatever its markup.

TRL marks assistant tokens through `{% generation %}` blocks, which real checkpoints' templates
(SmolLM2's ChatML with its default system line, Llama-3, Gemma, Mistral) do not carry, and which TRL
adds only to the templates it knows verbatim. Here the template renders the conversation as it would
for inference; each assistant message's content is found in that text, in order, with the end-of-turn
special token right after it; the tokens whose characters fall in those spans are the ones trained.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf.config import RecipeError


class TemplateMismatch(ValueError):
    """The chat template does not render a message's content verbatim (so its tokens cannot be located)."""


def end_of_turn_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special tokens that can close a turn: the EOS and every special added token, longest first."""
    found = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found.update(t for t in (tokenizer.eos_token, *tokenizer.all_special_tokens) if t)
    return sorted(found, key=len, reverse=True)


def assistant_spans(text: str, messages: list[dict[str, Any]], closers: list[str]) -> list[tuple[int, int]]:
    """Character spans of each assistant reply in `text` (the rendered conversation), end-of-turn token included.

    Messages are located in order, so a user message quoting an answer cannot be taken for it.
    Templates that trim content (Llama-3, Gemma) are matched on the stripped content. System
    messages are skipped: some templates (Mistral) move them into a later user turn.
    """
    spans = []
    cursor = 0
    for index, message in enumerate(messages):
        content = message.get("content")
        if message["role"] == "system" or not isinstance(content, str):
            continue
        needle = content.strip()
        start = text.find(needle, cursor)
        if start < 0:
            raise TemplateMismatch(f"message {index} ({message['role']}) is not rendered verbatim by the chat template")
        end = start + len(needle)
        if message["role"] == "assistant":
            after = end + (len(text[end:]) - len(text[end:].lstrip(" \t")))
            closer = next((token for token in closers if text.startswith(token, after)), None)
            if closer is not None:
                end = after + len(closer)
            spans.append((start, end))
        cursor = end
    return spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], chat_template: str | None = None
) -> dict[str, list[int]]:
    """`input_ids` of the templated conversation and `assistant_masks` (1 = trained), as TRL's collator reads them."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template)
    spans = assistant_spans(text, messages, end_of_turn_tokens(tokenizer))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(s < span_end and e > span_start for span_start, span_end in spans)) for s, e in encoded.offset_mapping
    ]
    return {"input_ids": encoded["input_ids"], "assistant_masks": mask}


def check_maskable(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None, where: str = "the chat template"
) -> None:
    """Refuse, before any model loads, a template whose assistant replies cannot be located or do not end a turn."""
    if not tokenizer.is_fast:
        raise RecipeError(
            f"assistant_only_loss: the tokenizer of {tokenizer.name_or_path} has no fast (Rust) version, so token "
            "offsets are unknown; set `assistant_only_loss: false`."
        )
    probe = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    try:
        row = tokenize_conversation(tokenizer, probe, chat_template)
    except TemplateMismatch as error:
        raise RecipeError(
            f"assistant_only_loss: {where} {error}, so assistant tokens cannot be located; set "
            "`assistant_only_loss: false` (loss on whole conversations) or `chat_template_path` to a template that "
            "renders each message's content as written."
        ) from None
    trained = tokenizer.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m])
    if "Blue." not in trained or "Green." not in trained:
        raise RecipeError(f"assistant_only_loss: {where} lost an assistant reply in masking ({trained!r}).")


def tokenize_conversations(dataset, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None):
    """A conversational SFT dataset (`messages`, or conversational `prompt` + `completion`) tokenized with masks."""

    def tokenize(row: dict) -> dict:
        messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
        try:
            return tokenize_conversation(tokenizer, messages, chat_template)
        except TemplateMismatch as error:
            raise RecipeError(f"assistant_only_loss: a training row's {error}: {messages!r:.200}") from None

    return dataset.map(tokenize, remove_columns=dataset.column_names, desc="Masking assistant turns")
