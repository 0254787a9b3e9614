"""Chat messages -> prompt token ids through the tokenizer's chat template, with message content
kept as text.

A template writes role markers as special-token text (ChatML's ``<|im_start|>system``), and
encoding the rendered string turns every such text into the special token - including text a user
typed into a message, which could then forge a system turn. So content that holds special-token
text is encoded apart, with special tokens split into ordinary text, while the template's own
markers stay special. Content without any (nearly all of it) is encoded exactly as the rendered
string always was.
"""

from __future__ import annotations

import re
from typing import Any

from specdec.errors import InvalidRequestError

# A placeholder no template writes and no tokenizer treats as special: where each content goes.
_MARK = "\x00specdec-content-{}\x00"
_MARK_RE = re.compile("\x00specdec-content-(\\d+)\x00")


MAX_MESSAGES = 256  # messages per conversation, whichever API sent it


def check_message_count(count: int) -> None:
    """Refuse a conversation of more than MAX_MESSAGES messages (before any is looked at)."""
    if count > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"at most {MAX_MESSAGES} messages, got {count}")


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The template's text; a template that refuses the conversation (many raise on roles that do
    not alternate, or on a system turn they do not support) is the request's fault, not the server's."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:
        raise InvalidRequestError("messages", f"this model's chat template refused them: {e}") from None


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template (generation prompt added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", "the target's tokenizer has no chat template")
    specials = [t.content for t in tokenizer.added_tokens_decoder.values()]
    forged = [i for i, m in enumerate(messages) if any(s in m["content"] for s in specials)]
    if not forged:
        text = _render(tokenizer, messages)
        return list(tokenizer.encode(text, add_special_tokens=False))
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    text = _render(tokenizer, marked)
    pieces = _MARK_RE.split(text)  # template, index, template, index, ..., template
    indices = [int(i) for i in pieces[1::2]]
    if indices != list(range(len(messages))):
        # The template moved, dropped or changed the content: it cannot be kept apart safely.
        raise InvalidRequestError(
            f"messages[{forged[0]}].content",
            "holds special-token text (such as a role marker), which this model's chat template "
            "cannot keep as plain text",
        )
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            ids += tokenizer.encode(piece, add_special_tokens=False) if piece else []
        else:
            content = messages[int(piece)]["content"]
            ids += (
                tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True)
                if content
                else []
            )
    return ids
