"""The chat format of every model the pipeline makes: Granite-style role tokens, the Jinja chat
template stored with the tokenizer, and a conversation's token ids with its assistant loss mask.

A turn is ``<|start_of_role|>ROLE<|end_of_role|>CONTENT<|end_of_text|>`` then a newline;
``add_generation_prompt`` ends with ``<|start_of_role|>assistant<|end_of_role|>``. The three role
tokens are special tokens of the pipeline's tokenizer (``train_tokenizer`` adds them), so the text
between two of them is tokenized on its own: encoding a conversation part by part
(``conversation_ids``) gives exactly the ids of encoding the template's rendered text in one go,
which is what ``transformers``' ``apply_chat_template`` does with an export (tested).

Loss: on every assistant turn's content and its closing ``<|end_of_text|>`` (the model must learn
to stop); never on a role header, the newline between turns, a system or user turn, or the EOD
that ends the conversation in a packed sequence.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

START_ROLE = "<|start_of_role|>"
END_ROLE = "<|end_of_role|>"
END_TURN = "<|end_of_text|>"
ROLE_TOKENS = (START_ROLE, END_ROLE, END_TURN)
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '" + START_ROLE + "' + message['role'] + '" + END_ROLE + "' + message['content'] + '"
    + END_TURN + "\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + START_ROLE + "assistant" + END_ROLE + "' }}{%- endif %}"
)


def render(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The template's text, in Python (tests compare it with the Jinja template's)."""
    text = "".join(f"{START_ROLE}{m['role']}{END_ROLE}{m['content']}{END_TURN}\n" for m in messages)
    return text + (f"{START_ROLE}assistant{END_ROLE}" if add_generation_prompt else "")


def missing_role_tokens(tokenizer: Any) -> list[str]:
    """The role tokens a ``tokenizers.Tokenizer`` lacks ([] when it can encode chats)."""
    return [t for t in ROLE_TOKENS if tokenizer.token_to_id(t) is None]


def conversation_ids(tokenizer: Any, messages: Sequence[dict[str, str]],
                     add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of ``render(messages)`` and a loss mask of the same length (1 on the assistant
    turns' content and closing token). ``tokenizer`` is a ``tokenizers.Tokenizer``."""
    missing = missing_role_tokens(tokenizer)
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token(s); train it with "
                         "train_tokenizer's chat_roles: true (the default) to fine-tune on chats")
    start, end_role, end_turn = (tokenizer.token_to_id(t) for t in ROLE_TOKENS)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        head = [start, *enc(m["role"]), end_role]
        body = [*enc(m["content"]), end_turn]
        learn = 1 if m["role"] == "assistant" else 0
        newline = enc("\n")
        ids += head + body + newline
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(newline)
    if add_generation_prompt:
        head = [start, *enc("assistant"), end_role]
        ids += head
        mask += [0] * len(head)
    return ids, mask


def sample_digest(messages: Sequence[dict[str, str]]) -> str:
    """A conversation's identity: sha256 of its canonical JSON (roles and contents only)."""
    canon = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
