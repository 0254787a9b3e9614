"""The OpenAI bodies without a server: which fields are taken, refused or no-ops, model ids,
defaults, and the logprob pieces (exact bytes of byte-level tokens)."""

from __future__ import annotations

import copy

import pytest

from specdec.errors import InvalidRequestError
from specdec.request import Mode, TokenLogprob
from specdec.server import openai_protocol as oa
from specdec.testing import tiny_tokenizer
from specdec.tokenization import TokenPieces

MODELS = oa.ServedModels("tiny", (Mode.TARGET, Mode.SPECULATIVE, Mode.DRAFT), Mode.SPECULATIVE)


def _completion(**fields):
    return oa.parse_completion({"model": "tiny", "prompt": "hi", **fields}, MODELS)


def _chat(**fields):
    return oa.parse_chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}, MODELS)


def test_model_ids_pick_the_mode():
    assert MODELS.ids() == ["tiny", "tiny:target", "tiny:speculative", "tiny:draft"]
    assert _completion().mode is Mode.SPECULATIVE
    assert oa.parse_completion({"model": "tiny:draft", "prompt": "a"}, MODELS).mode is Mode.DRAFT
    assert _completion(mode="target").mode is Mode.TARGET  # the served name takes an explicit mode
    with pytest.raises(InvalidRequestError, match="contradicts"):
        oa.parse_completion({"model": "tiny:draft", "prompt": "a", "mode": "target"}, MODELS)
    with pytest.raises(oa.ModelNotFoundError, match="tiny:target"):
        oa.parse_completion({"model": "gpt-4o", "prompt": "a"}, MODELS)
    only_target = oa.ServedModels("t", (Mode.TARGET,), Mode.TARGET)
    assert only_target.ids() == ["t", "t:target"]


def test_defaults_follow_openai():
    parsed = _completion()
    assert parsed.params.temperature == 1.0 and parsed.params.top_p == 1.0  # OpenAI's: sampling
    assert parsed.max_tokens_for(prompt_tokens=10, max_context=100) == 16
    assert parsed.max_tokens_for(prompt_tokens=95, max_context=100) == 5  # capped by the room left
    assert _chat().max_tokens_for(prompt_tokens=10, max_context=100) == 90  # chat: the room left
    assert _chat(max_completion_tokens=7).params.max_new_tokens == 7
    assert _chat(max_tokens=7).params.max_new_tokens == 7
    with pytest.raises(InvalidRequestError, match="not both"):
        _chat(max_tokens=7, max_completion_tokens=8)


@pytest.mark.parametrize(
    "fields",
    [
        {"frequency_penalty": 0}, {"presence_penalty": 0.0}, {"logit_bias": None}, {"logit_bias": {}},
        {"best_of": 1}, {"echo": False}, {"n": 1}, {"user": "u"}, {"top_k": -1}, {"seed": 0},
        {"stop": "x"}, {"stop": ["a", "b"]}, {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": None, "ignore_eos": None}, {"skip_special_tokens": True}, {"min_p": 0},
        {"include_stop_str_in_output": False}, {"use_beam_search": False}, {"priority": 0},
    ],
)  # fmt: skip
def test_no_op_and_implemented_values_are_accepted(fields):
    _completion(**fields)


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"temperature": None, "top_p": "1"}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": True}, "logprobs"),  # an integer on completions
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"json_schema": {}}, "json_schema"),
        ({"user": "u" * 257}, "user"),
        ({"tempreature": 0}, "tempreature"),  # a typo is not silently ignored
        ({"temperature": 10**400}, "temperature"),  # no OverflowError (a 500)
        ({"best_of": True}, "best_of"),  # true is not 1
        ({"frequency_penalty": False}, "frequency_penalty"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
    ],
)
def test_bad_completion_fields_are_refused_by_name(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        _completion(**fields)
    assert e.value.field == param and str(e.value).startswith(param)


def test_a_block_not_in_the_asked_form_is_no_tool_call():
    from specdec.router.tools import ToolCall

    good = ToolCall("w", '{"c": 1}', True)
    bad = ToolCall("", "garbage", False, "not a tool call of the form asked for")
    message, reason = oa.tool_message("<tool_call>garbage</tool_call>", (bad,))
    assert reason is None and "tool_calls" not in message
    message, reason = oa.tool_message("hi <tool_call>x</tool_call>", (good, bad))
    assert reason == "tool_calls" and [c["function"]["name"] for c in message["tool_calls"]] == ["w"]
    assert message["content"] == "hi"


def test_chat_messages_and_parts():
    parsed = oa.parse_chat(
        {"model": "tiny", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": []},
        ]},
        MODELS,
    )  # fmt: skip
    assert parsed.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]
    named = oa.parse_chat(
        {"model": "tiny", "messages": [{"role": "user", "content": "a", "name": "bob"}]}, MODELS
    )
    assert named.messages == [{"role": "user", "content": "a", "name": "bob"}]  # for templates that use it
    for bad, where in (
        ({"role": ["user"], "content": "a"}, "messages[0].role"),  # no TypeError (a 500)
        ({"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}, "messages[0].tool_calls[0]"),
        ({"role": "user", "content": "", "tool_calls": [{"id": "x"}]}, "messages[0].tool_calls"),
        ({"role": "user", "content": "a", "name": 3}, "messages[0].name"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            oa.parse_chat({"model": "tiny", "messages": [bad]}, MODELS)
        assert e.value.field == where
    with pytest.raises(InvalidRequestError) as e:
        _chat(logprobs=True, top_logprobs=21)
    assert e.value.field == "top_logprobs"
    assert _chat(logprobs=True, top_logprobs=3).params.top_logprobs == 3
    assert _chat(logprobs=True).params.logprobs and _chat().params.logprobs is False
    assert _chat(prediction={"type": "content", "content": "the answer"}).prediction == "the answer"


def test_core_errors_name_the_field_the_client_sent():
    parsed = _chat(max_completion_tokens=5)
    core = InvalidRequestError("max_new_tokens", "900 exceeds the room left: max_new_tokens must be <= 100")
    translated = parsed.wire_field(core)
    assert translated.field == "max_completion_tokens"
    assert (
        str(translated)
        == "max_completion_tokens: 900 exceeds the room left: max_completion_tokens must be <= 100"
    )
    assert _completion().wire_field(InvalidRequestError("external_draft", "x")).field == "prediction"
    assert _completion().wire_field(InvalidRequestError("temperature", "x")).field == "temperature"


def test_choice_seeds_differ_and_reproduce():
    assert [oa.choice_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert oa.choice_seed(None, 2) is None
    assert oa.choice_seed(2**63 - 1, 1) == 0  # wraps inside the seed range


def test_token_pieces_give_exact_bytes_of_partial_characters():
    tokenizer = tiny_tokenizer()
    pieces = TokenPieces(tokenizer)
    assert pieces.byte_level
    text = "naïve café ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(pieces.bytes(i) for i in ids) == text.encode()
    logprobs = [TokenLogprob(i, -0.5, [(i, -0.5), (3, float("-inf"))]) for i in ids]
    chat = oa.chat_logprobs(pieces, logprobs)
    assert bytes(b for entry in chat for b in entry["bytes"]).decode() == text
    assert chat[0]["top_logprobs"][1]["logprob"] == -9999.0  # JSON has no -inf
    legacy = oa.completion_logprobs(pieces, logprobs, offset=4)
    assert legacy["text_offset"][0] == 4 and legacy["text_offset"] == sorted(legacy["text_offset"])


def test_a_chat_template_that_refuses_the_conversation_is_a_bad_request():
    from specdec.chat import encode_chat

    tokenizer = copy.deepcopy(tiny_tokenizer())  # the shared one must keep its template
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(InvalidRequestError) as e:
        encode_chat(tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert e.value.field == "messages" and "alternate" in str(e.value)
