"""Scores against hand-computed values."""

from __future__ import annotations

import pytest

from mctp.eval import error_rate, normalize_answer, normalize_text, qa_answers, qa_match


def test_wer_by_hand():
    # "the cat sat" vs "the cat sat down": 1 insertion; "hello world" vs "hello": 1 deletion
    out = error_rate(["The cat sat.", "Hello, world!"], ["the cat sat down", "hello"])
    assert out["metric"] == "wer"
    assert (out["errors"], out["units"], out["n"]) == (2, 5, 2)
    assert out["value"] == pytest.approx(2 / 5)
    # one substitution out of four words; case, punctuation and spacing do not count
    out = error_rate(["It's a  nice day"], ["its a nice DAY!"])
    assert out["value"] == pytest.approx(1 / 4)
    assert error_rate(["Hello, World!"], ["hello world"])["value"] == 0.0


def test_cer_for_chinese_by_hand():
    out = error_rate(["你好，世界。"], ["你好视界"])
    assert out["metric"] == "cer"
    assert (out["errors"], out["units"]) == (1, 4)  # 视 for 世 out of 你好世界
    assert out["value"] == pytest.approx(0.25)
    # forced CER on Latin text counts characters without spaces: "abc" vs "abd"
    assert error_rate(["a b c"], ["abd"], chinese=True)["value"] == pytest.approx(1 / 3)


def test_error_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="2 references but 1"):
        error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="nothing"):
        error_rate([], [])
    with pytest.raises(ValueError, match="empty"):
        error_rate(["?!"], ["x"])


def test_normalisation():
    assert normalize_text("  Don't STOP, 'now'! ") == "don't stop now"
    assert normalize_text("你好， 世界！", chinese=True) == "你好世界"
    assert normalize_answer("The Eiffel-Tower, an icon.") == "eiffel tower icon"


def test_qa_match_rule():
    assert qa_match("I think the answer is Paris.", ["paris"])
    assert not qa_match("Parisian food is great", ["Paris"])  # whole words only
    assert qa_match("It was the Beatles", ["The Beatles"])  # articles dropped on both sides
    assert qa_match("george washington was first", ["Washington", "G. Washington"])
    assert not qa_match("", ["paris"])


def test_qa_answers_in_the_three_layouts():
    assert qa_answers({"question": "q", "answer": "Paris"}) == ["Paris"]  # LlamaQuestions
    assert qa_answers({"answers": ["Jamaica", "Jamaican"]}) == ["Jamaica", "Jamaican"]  # WebQ
    trivia = {"answer": {"value": "Sun", "aliases": ["Sun", "The Sun", "Sol"]}}
    assert qa_answers(trivia) == ["Sun", "The Sun", "Sol"]  # TriviaQA
    with pytest.raises(ValueError, match="no answer"):
        qa_answers({"question": "q"})
