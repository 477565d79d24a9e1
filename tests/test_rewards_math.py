"""Math reward: a table of answer pairs with expected verdicts and scores, extraction, property tests and hostile
inputs (bounded work: each must return under a generous hang guard)."""

import signal
from contextlib import contextmanager
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.math import (
    MathRewardConfig,
    extract_answer,
    is_equivalent,
    math_reward,
    math_reward_range,
    normalize_answer,
    parse_number,
    score_answer,
)
from rewards.tags import render_completion

# (pred, ref, equivalent, score). Scores: 3.0 equivalent, 1.5 stripped, 0.5 / 0.25 ratio bands, -1 wrong,
# -0.5 unparseable.
TABLE = [
    # plain integers, decimals, signs
    ("42", "42", True, 3.0), ("42", "43", False, 0.5), ("0", "0", True, 3.0), ("-7", "-7", True, 3.0),
    ("7", "-7", False, -1.0), ("+5", "5", True, 3.0), ("\u22125", "-5", True, 3.0), ("\u2013 5", "-5", True, 3.0),
    ("- 5", "-5", True, 3.0), ("--5", "5", True, 3.0), ("42.0", "42", True, 3.0), ("42.", "42", True, 3.0),
    ("042", "42", True, 3.0), (".5", "0.5", True, 3.0), ("0.50", "1/2", True, 3.0), ("3.14", "3.14", True, 3.0),
    ("3.14", "3.1416", False, 0.5), ("1", "0", False, -1.0), ("0", "1", False, -1.0), ("0.0", "-0", True, 3.0),
    # whitespace
    ("  42  ", "42", True, 3.0), ("4 2", "42", False, -0.5), ("\n42\n", "42", True, 3.0), ("x + 1", "x+1", True, 3.0),
    ("x+ 1", " x +1 ", True, 3.0), ("1 / 2", "0.5", True, 3.0),
    # trailing period
    ("42.", "42", True, 3.0), ("42..", "42", True, 3.0), ("yes.", "yes", True, 3.0), ("3.5.", "3.5", True, 3.0),
    # currency
    ("$42", "42", True, 3.0), ("\\$42", "42", True, 3.0), ("$ 42.50", "42.5", True, 3.0), ("€12", "12", True, 3.0),
    ("£12.50", "12.5", True, 3.0), ("12 USD", "12", True, 3.0), ("USD 12", "12", True, 3.0),
    ("usd12", "12", True, 3.0), ("12 dollars", "$12", True, 3.0), ("$1,000", "1000", True, 3.0),
    ("$45", "50", False, 0.5), ("12 EUR", "12", True, 3.0), ("12 GBP", "11", False, 0.5),
    # thousands separators
    ("1,234", "1234", True, 3.0), ("1,234,567", "1234567", True, 3.0), ("-1,234", "-1234", True, 3.0),
    ("1,234.5", "1234.5", True, 3.0), ("1{,}234", "1234", True, 3.0), ("1\\,234", "1234", True, 3.0),
    ("1,2", "12", False, -0.5), ("1,2", "1.2", False, -0.5), ("1,2345", "12345", False, -0.5),
    ("12,34", "1234", False, -0.5), ("1,000,00", "100000", False, -0.5), ("10,000", "10000.0", True, 3.0),
    # units
    ("5 cm", "5", True, 3.0), ("5cm", "5", True, 3.0), ("5 kg", "5", True, 3.0), ("12 meters", "12", True, 3.0),
    ("3 hours", "3", True, 3.0), ("30 minutes", "30", True, 3.0), ("7 days", "7", True, 3.0),
    ("9 years", "9", True, 3.0), ("4 square feet", "4", True, 3.0), ("16 cm^2", "16", True, 3.0),
    ("27 m^{3}", "27", True, 3.0), ("60 mph", "60", True, 3.0), ("2.5 lbs", "2.5", True, 3.0),
    ("10 \\text{ cm}", "10", True, 3.0), ("10 \\mbox{cm}", "10", True, 3.0), ("5 cm", "6", False, 0.25),
    ("cm", "5", False, -0.5), ("m", "m", True, 3.0),
    # percentages (a unit) and degrees
    ("50%", "50", True, 3.0), ("50\\%", "50", True, 3.0), ("50 percent", "50", True, 3.0),
    ("50%", "0.5", False, -1.0), ("12.5%", "12.5", True, 3.0), ("90^\\circ", "90", True, 3.0),
    ("90^{\\circ}", "90", True, 3.0), ("90°", "90", True, 3.0), ("90 degrees", "90", True, 3.0),
    ("45 degrees", "90", False, -1.0),
    # \boxed, \text, \mathrm, delimiters
    ("\\boxed{42}", "42", True, 3.0), ("\\boxed{\\frac{1}{2}}", "0.5", True, 3.0),
    ("The answer is \\boxed{7}", "7", True, 3.0), ("\\boxed{1} then \\boxed{2}", "2", True, 3.0),
    ("\\fbox{9}", "9", True, 3.0), ("\\text{42}", "42", True, 3.0), ("\\mathrm{42}", "42", True, 3.0),
    ("\\textbf{42}", "42", True, 3.0), ("\\text{yes}", "yes", True, 3.0), ("$42$", "42", True, 3.0),
    ("\\(42\\)", "42", True, 3.0), ("\\[42\\]", "42", True, 3.0), ("$\\frac{3}{4}$", "0.75", True, 3.0),
    ("\\boxed{\\text{B}}", "B", True, 3.0), ("\\boxed{41}", "42", False, 0.5),
    # fractions
    ("1/2", "0.5", True, 3.0), ("\\frac{1}{2}", "1/2", True, 3.0), ("\\dfrac{1}{2}", "0.5", True, 3.0),
    ("\\tfrac{1}{2}", "0.5", True, 3.0), ("\\frac12", "0.5", True, 3.0), ("\\frac{3}{4}", "0.75", True, 3.0),
    ("\\frac{-3}{4}", "-0.75", True, 3.0), ("-\\frac{3}{4}", "-3/4", True, 3.0), ("6/8", "3/4", True, 3.0),
    ("\\frac{22}{7}", "3.14159", False, 0.5), ("2/3", "0.667", False, 0.5), ("0.333333", "1/3", False, 0.5),
    ("\\frac{1}{3}", "1/3", True, 3.0), ("1/0", "1", False, -0.5), ("\\frac{1}{0}", "0", False, -0.5),
    ("\\frac{\\frac{1}{2}}{2}", "1/4", True, 3.0), ("\\frac{1}{2", "0.5", False, -0.5),
    # \left( \right)
    ("\\left(\\frac{3}{4}\\right)", "0.75", True, 3.0), ("\\left( 5 \\right)", "5", True, 3.0),
    ("\\left[2\\right]", "[2]", True, 3.0),
    # scientific notation
    ("1.5e3", "1500", True, 3.0), ("1.5E3", "1500", True, 3.0), ("1.5e+3", "1500", True, 3.0),
    ("2e-3", "0.002", True, 3.0), ("1.5 \\times 10^{3}", "1500", True, 3.0), ("1.5 \\times 10^3", "1500", True, 3.0),
    ("1.5 x 10^3", "1500", True, 3.0), ("1.5 \\cdot 10^{3}", "1500", True, 3.0), ("1.5×10^3", "1500", True, 3.0),
    ("3 \\times 10^{-2}", "0.03", True, 3.0), ("1e100", "1e100", True, 3.0), ("1.6e3", "1500", False, 0.5),
    ("1e1001", "1", False, -0.5),
    # mixed numbers
    ("2 1/2", "2.5", True, 3.0), ("2 1/2", "5/2", True, 3.0), ("-2 1/2", "-2.5", True, 3.0),
    ("2\\frac{1}{2}", "2.5", True, 3.0), ("3 3/4", "3.75", True, 3.0), ("2 1/0", "2", False, -0.5),
    # x = 5 prefixes
    ("x = 5", "5", True, 3.0), ("x=5", "5", True, 3.0), ("n = 12", "12", True, 3.0), ("f(x) = 3", "3", True, 3.0),
    ("x = 5", "x = 5", True, 3.0), ("x = 4", "5", False, 0.25), ("a = 1, b = 2", "2", False, -0.5),
    ("x = y = 5", "5", False, -0.5),
    # arithmetic, roots, pi (value comparison; floats at rel. tol. 1e-6)
    ("2\\sqrt{2}", "\\sqrt{8}", True, 3.0), ("\\sqrt{4}", "2", True, 3.0), ("\\sqrt2", "1.41421356", True, 3.0),
    ("\\sqrt{2}", "1.414", False, 0.5), ("\\pi", "3.14159265", True, 3.0), ("2\\pi", "6.283185", True, 3.0),
    ("3*4", "12", True, 3.0), ("2^{10}", "1024", True, 3.0), ("2^-1", "0.5", True, 3.0), ("10^{3}", "1000", True, 3.0),
    ("(1+2)*3", "9", True, 3.0), ("(1+2)*3", "1+2*3", False, -1.0), ("\\sqrt{-1}", "1", False, -0.5),
    # stripped matches (1.5): markup around an answer that does not parse as a number
    ("**42**", "42", False, 1.5), ("(B)", "B", False, 1.5), ("b", "B", False, 1.5), ("`yes`", "Yes", False, 1.5),
    ("[C]", "c", False, 1.5), ("\"paris\"", "Paris", False, 1.5), ("Yes!", "yes", False, 1.5),
    # wrong and ratio bands
    ("45", "50", False, 0.5), ("55", "50", False, 0.5), ("44", "50", False, 0.25), ("59", "50", False, 0.25),
    ("39", "50", False, -1.0), ("61", "50", False, -1.0), ("-50", "50", False, -1.0), ("100", "42", False, -1.0),
    ("5", "0", False, -1.0), ("0.9", "1", False, 0.5), ("0.8", "1", False, 0.25), ("1.2", "1", False, 0.25),
    ("0.79", "1", False, -1.0),
    # unparseable and adversarial
    ("abc", "42", False, -0.5), ("42 or 43", "42", False, -0.5), ("42, 43", "42", False, -0.5),
    ("10^10^10", "1", False, -0.5), ("2^{100000}", "1", False, -0.5), ("9^999", "1", False, -1.0),
    ("1e99999", "1", False, -0.5), ("((((1))))", "1", True, 3.0), ("(" * 100 + "1" + ")" * 100, "1", False, 1.5),
    ("\\frac{1}{", "1", False, -0.5), ("}{", "1", False, -0.5), ("\\evil{1}", "1", False, -0.5),
    ("__import__('os')", "1", False, -0.5), ("1 if True else 2", "1", False, -0.5), ("nan", "1", False, -0.5),
    ("inf", "1", False, -0.5), ("1e5000", "1e5000", True, 3.0), ("NaN", "nan", False, 1.5), ("", "42", False, -0.5),
    ("\u00bd", "0.5", False, -0.5), ("x", "y", False, -0.5), ("2x", "2", False, -0.5),
]


def test_table_size_and_forms():
    assert len(TABLE) >= 150
    scores = {s for *_, s in TABLE}
    assert scores == {3.0, 1.5, 0.5, 0.25, -1.0, -0.5}
    assert sum(eq for _, _, eq, _ in TABLE) >= 60 and sum(not eq for _, _, eq, _ in TABLE) >= 60


@pytest.mark.parametrize("pred,ref,equivalent,score", TABLE)
def test_table(pred, ref, equivalent, score):
    assert is_equivalent(pred, ref) is equivalent
    assert score_answer(pred, ref) == score
    # the same verdict through a whole strict completion
    assert math_reward(render_completion("work", pred), ref) == (score if pred.strip() else -0.5)


@pytest.mark.parametrize("text,expected", [
    (render_completion("r", "42"), Fraction(42)), ("1.5e3", Fraction(1500)), ("2 1/2", Fraction(5, 2)),
    ("\\frac{-3}{4}", Fraction(-3, 4)), ("12%", Fraction(12)), ("1,234,567", Fraction(1234567)),
    ("2^-2", Fraction(1, 4)), ("0.1", Fraction(1, 10)), ("-0.125", Fraction(-1, 8)),
])
def test_parse_number_exact(text, expected):
    value = parse_number(extract_answer(text) or text)
    assert isinstance(value, Fraction) and value == expected


def test_parse_number_float_and_none():
    assert parse_number("\\sqrt{2}") == pytest.approx(2 ** 0.5, rel=1e-15)
    assert isinstance(parse_number("\\pi"), float)
    for bad in ["", "abc", "1/0", "10^10^10", "inf", "nan", None, 42]:
        assert parse_number(bad) is None


@pytest.mark.parametrize("text,expected", [
    (render_completion("think", "42"), "42"),
    ("<reasoning>r</reasoning><answer> 1 </answer> trailing", "1"),  # near-strict: text after
    ("<answer>1</answer><answer>2</answer>", "2"),  # last complete block
    ("<reasoning>\\boxed{3}</reasoning><answer>4", "3"),  # no complete block: last \boxed
    ("so \\boxed{\\frac{1}{2}} and \\boxed{5}", "5"),
    ("<answer>\n</answer>", None), ("no answer here", None), ("\\boxed{unclosed", None), ("", None), (None, None),
    ("</answer>7<answer>", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalize_examples():
    assert normalize_answer("\\boxed{\\text{\\$1{,}234.}}") == "1234"
    assert normalize_answer("  x =  2 1/2 cm. ") == "2 1/2"
    assert normalize_answer("\\left( \\dfrac{1}{2} \\right)") == "(\\frac{1}{2})"


def test_custom_config():
    cfg = MathRewardConfig(exact=1.0, stripped=0.5, close=0.2, near=0.1, wrong=-2.0, unparseable=-0.3,
                           missing=-3.0, close_band=(0.95, 1.05), near_band=(0.5, 1.5))
    assert [score_answer(p, "100", cfg) for p in ["100", "**x**", "104", "106", "149", "151", "abc", ""]] == \
        [1.0, -0.3, 0.2, 0.1, 0.1, -2.0, -0.3, -3.0]
    assert math_reward("no tags", "1", cfg) == -3.0
    assert math_reward_range(cfg) == (-3.0, 1.0) and math_reward_range() == (-1.0, 3.0)


# ---- properties and hostile inputs ------------------------------------------------------------------------------

_math_pieces = st.sampled_from(["1", "2", "0", ".", ",", "/", "-", "+", "^", "{", "}", "(", ")", " ", "e", "x",
                                "=", "%", "$", "\\frac", "\\boxed", "\\sqrt", "\\pi", "\\text", "cm", "<answer>",
                                "</answer>", "\\left(", "\\right)", "10", "999"])
_texts = st.one_of(st.text(max_size=120), st.lists(_math_pieces, max_size=25).map("".join))


@settings(max_examples=400, deadline=None)
@given(_texts, _texts)
def test_no_function_raises_and_scores_in_range(pred, ref):
    lo, hi = math_reward_range()
    assert lo <= math_reward(pred, ref) <= hi
    assert lo <= score_answer(pred, ref) <= hi
    assert isinstance(is_equivalent(pred, ref), bool)
    assert isinstance(normalize_answer(pred), str)
    v = parse_number(pred)
    assert v is None or isinstance(v, (Fraction, float))
    extract_answer(pred)


@settings(max_examples=200, deadline=None)
@given(st.fractions(max_denominator=10 ** 6).filter(lambda f: abs(f) < 10 ** 12))
def test_fraction_forms_are_equivalent(f):
    ref = f"{f.numerator}/{f.denominator}"
    assert parse_number(ref) == f
    assert is_equivalent(f"\\frac{{{f.numerator}}}{{{f.denominator}}}", ref)
    assert score_answer(f"\\boxed{{{f.numerator}/{f.denominator}}}", ref) == 3.0


@settings(max_examples=200, deadline=None)
@given(st.integers(-10 ** 15, 10 ** 15))
def test_integer_forms_are_equivalent(n):
    assert is_equivalent(f"{n:,}", str(n)) and is_equivalent(f"${n}", str(n)) and is_equivalent(f"{n}.0", str(n))


@contextmanager
def hang_guard(seconds=5):
    """Fail instead of hanging: a generous SIGALRM guard, not a benchmark."""
    def on_alarm(*_):
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


HOSTILE = {
    "1MB answer": ("<answer>" + "7" * 10 ** 6 + "</answer>", -1.0),
    "1MB text no tags": ("x" * 10 ** 6, -0.5),
    "power tower": ("<answer>10^10^10</answer>", -0.5),
    "huge power": ("<answer>10^{999999999}</answer>", -0.5),
    "nested braces": ("<answer>" + "{" * 10 ** 5 + "1" + "}" * 10 ** 5 + "</answer>", -0.5),
    "nested boxed": ("\\boxed{" * 10 ** 5 + "1" + "}" * 10 ** 5, 3.0),
    "unclosed boxed": ("\\boxed{" * 10 ** 5, -0.5),
    "ones": ("1" * 100000, -0.5),
    "ones answer": ("<answer>" + "1" * 100000 + "</answer>", -1.0),
    "deep parens": ("<answer>" + "(" * 10 ** 5 + "1" + ")" * 10 ** 5 + "</answer>", -0.5),
    "many text wrappers": ("<answer>" + "\\text{" * 5000 + "1" + "}" * 5000 + "</answer>", -0.5),
    "unit spam": ("<answer>5" + " cm" * 10 ** 5 + "</answer>", -0.5),
    "minus spam": ("<answer>" + "-" * 10 ** 5 + "1</answer>", -0.5),
    "exponent chain": ("<answer>" + "9^999*" * 10 ** 4 + "1</answer>", -0.5),
    "spaces": ("<answer>" + " " * 10 ** 6 + "</answer>", -0.5),
    "many answer tags": ("<answer>" * 10 ** 5 + "1" + "</answer>" * 10 ** 5, 3.0),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_return_quickly(name):
    text, score = HOSTILE[name]
    with hang_guard(5):
        assert math_reward(text, "1") == score
        assert is_equivalent(text, text) in (True, False)
        parse_number(text)
