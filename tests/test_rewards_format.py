"""Format reward: strict contract and the recipe's partial credits on tricky layouts, exact scores."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.format import FormatConfig, format_reward, format_reward_range, is_strict, strict_blocks
from rewards.tags import render_completion

R0, R1, A0, A1 = "<reasoning>", "</reasoning>", "<answer>", "</answer>"

CASES = [  # (text, strict?, score with the default config)
    (render_completion("think", "42"), True, 3.0),
    (f"{R0}think{R1}{A0}42{A1}", True, 3.0),  # no whitespace at all
    (f"  \n{R0} think \n{R1}\n\n\t{A0} 42 {A1}\n \n", True, 3.0),  # whitespace variants
    (f"{R0}a\nb\nc{R1}\r\n{A0}x = 5{A1}\u00a0", True, 3.0),  # CRLF and a no-break space are whitespace
    (f"{R0}think{R1}{A0}42{A1}<eos>", False, 1.5),  # a literal stop piece is trailing text
    (f"{R0}think{R1}{A0}42{A1} done", False, 1.5),  # text after </answer>
    (f"Sure! {R0}think{R1}{A0}42{A1}", False, 2.0),  # text before <reasoning>
    (f"{R0}think{R1} so {A0}42{A1}", False, 2.0),  # text between the blocks
    (f"{R0}{R0}think{R1}{R1}{A0}42{A1}", False, 0.0),  # nested reasoning tags
    (f"{R0}think{A0}inner{A1}{R1}{A0}42{A1}", False, 0.0),  # answer block nested in the reasoning
    (f"{R0}a{R1}{A0}1{A1}{R0}b{R1}{A0}2{A1}", False, -2.0),  # everything repeated
    (f"{R0}a{R1}{A0}1{A1}{A0}2{A1}", False, 0.0),  # answer repeated
    (f"{R0}think{R1}{A0}42", False, 1.0),  # missing closing answer tag
    (f"{R0}think{A0}42{A1}", False, 1.0),  # missing closing reasoning tag
    (f"{A0}42{A1}", False, 0.0),  # no reasoning
    ("42", False, -2.0),  # no tags at all
    ("", False, -2.0),
    ("<REASONING>think</REASONING><ANSWER>42</ANSWER>", False, -2.0),  # tags in upper case
    (f"<Reasoning>think</Reasoning>{A0}42{A1}", False, 0.0),  # reasoning tags in another case
    (f"{R0}think <Answer>41</Answer>{R1}{A0}42{A1}", False, 2.0),  # a mixed-case tag inside breaks strictness
    (f"{R0}   {R1}{A0}42{A1}", False, 2.0),  # empty reasoning
    (f"{R0}think{R1}{A0}\n{A1}", False, 2.0),  # empty answer
    (f"{A0}42{A1}{R0}think{R1}", False, 1.5),  # blocks in the wrong order: reasoning is text after </answer>
    (f"{R0}think{R1}{A0}42{A1}{A1}", False, 1.0),  # repeated closing tag, nothing else after it
    (f"{R0}think{R1}{A0}42{A1}x{A1}", False, 1.0),  # repeated closing tag with text between
    (f"{R0}think{R1}{A0}42{A1} extra {R1}", False, 0.5),  # repeated tag and trailing text
]


@pytest.mark.parametrize("text,strict,score", CASES)
def test_format_cases(text, strict, score):
    assert is_strict(text) is strict
    assert format_reward(text) == score


def test_render_completion_round_trips_to_strict():
    for reasoning, answer in [("a", "b"), ("  multi\nline  ", " 3/4 "), ("x" * 1000, "\\boxed{5}")]:
        text = render_completion(reasoning, answer)
        assert strict_blocks(text) == (reasoning.strip(), answer.strip())
        assert format_reward(text) == 3.0


def test_custom_config_and_range():
    cfg = FormatConfig(strict=1.0, tag_once=0.25, tag_bad=-1.0, trailing=-2.0)
    assert format_reward(render_completion("a", "b"), cfg) == 1.0
    assert format_reward(f"{R0}a{R1}{A0}b{A1} tail", cfg) == 4 * 0.25 - 2.0
    assert format_reward("nothing", cfg) == -4.0
    assert format_reward_range(cfg) == (-6.0, 1.0)
    assert format_reward_range() == (-2.5, 3.0)


def test_non_string_input_scores_as_empty():
    assert format_reward(None) == -2.0 and is_strict(None) is False and format_reward(b"<answer>") == -2.0


_pieces = st.sampled_from([R0, R1, A0, A1, "<Answer>", " ", "\n", "42", "think", "<", ">", "/", "\u00a0"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_pieces, max_size=20).map("".join)))
def test_format_never_raises_and_stays_in_range(text):
    lo, hi = format_reward_range()
    score = format_reward(text)
    assert lo <= score <= hi
    assert (score == 3.0) == is_strict(text)


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_render_is_strict_unless_the_text_holds_tags(reasoning, answer):
    text = render_completion(reasoning, answer)
    has_tag = any(t in (reasoning + answer).lower() for t in (R0, R1, A0, A1))
    expected = bool(reasoning.strip()) and bool(answer.strip()) and not has_tag
    assert is_strict(text) is expected
