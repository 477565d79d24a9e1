"""Math answer reward: answer extraction, normalisation, exact numeric parsing and the recipe's score cascade.

Model output is untrusted text. Nothing here calls `eval` or a CAS: numbers are read by a small hand-written
arithmetic parser (numbers, + - * / ^, parentheses, \\sqrt, \\pi) whose work is bounded: an answer is cut to its
last `MAX_ANSWER_CHARS` characters before normalisation, parentheses nest at most `MAX_DEPTH` deep, exponents are
integers with |e| <= `MAX_EXPONENT`, and exact results larger than `MAX_BITS` bits are refused (so `10^10^10`,
`1e99999` or a 1 MB answer return at once as unparseable).

Extraction (`extract_answer`): the content of the last complete `<answer>...</answer>` block (the last
`<answer>` followed by a `</answer>`, up to the first such `</answer>`); with no complete
block, the content of the last `\\boxed{...}` anywhere in the text (models often box the final answer in the
reasoning); else None.

Normalisation (`normalize_answer`), in order: last \\boxed{} / \\fbox{} unwrapped; \\text{}, \\mathrm{}, \\textbf{},
\\mathbf{}, \\mbox{}, \\textrm{}, \\operatorname{} unwrapped; \\left / \\right and LaTeX spacing (\\, \\; \\: \\! `\\ `)
dropped, `{,}` -> `,`; \\dfrac / \\tfrac -> \\frac; math delimiters ($, \\( \\), \\[ \\]) and currency ($, €, £,
USD, EUR, GBP) dropped; unicode minus / dashes -> `-`, × and · -> `*`, ÷ -> `/`; a single `name = value` prefix
(`x = 5`) dropped; trailing periods dropped; trailing unit words after a number dropped (the `UNITS` list,
including `%`, `percent`, degrees and `^\\circ`, optionally squared/cubed); thousands separators removed where the
groups are exactly 3 digits (`1,234,567` but not `1,2` or `1,2345`); whitespace collapsed, and removed except
between two alphanumerics. Percent is a unit: `50%` equals `50` (not `0.5`), as the recipe's references are bare
numbers.

Numbers (`parse_number`): integers, decimals, `1.5e3`, `1.5 \\times 10^{3}`, `1.5 x 10^3`, fractions `a/b`,
`\\frac{a}{b}`, `\\frac12`, mixed numbers `2 1/2` and `2\\frac{1}{2}`, signs (`-`, `+`, unicode minus), and
arithmetic on those. The result is an exact `Fraction`, or a `float` only when \\sqrt or \\pi is involved.

Equivalence (`is_equivalent`): equal normalised strings, or both parse and are equal: exactly as Fractions when
both are exact, else as floats with relative tolerance `REL_TOL` = 1e-6.

Score cascade (`math_reward`, values in `MathRewardConfig`, docs/recipe.md#rewards):
    equivalent (normalised string match or equal value) -> 3.0. Numeric equality counts as exact: "0.5", "1/2"
                  and "\\frac{1}{2}" are the same answer, and scoring them differently would only add noise to the
                  group advantages.
    stripped match, only when one side is not a number (case-insensitive, markup removed: `*_` quotes,
                  brackets, `:;!?`) -> 1.5 (e.g. "**42**" for 42, "(B)" for "b"). Two numbers are always
                  judged by value, so "(1+2)*3" never stripped-matches "1+2*3".
    both numbers: ratio pred/ref in [0.9, 1.1] -> 0.5, in [0.8, 1.2] -> 0.25, else (or ref 0) -> -1.0
    anything else (no number on either side)    -> -0.5; no answer extracted -> `missing` (-0.5)
Range with the defaults: [-1.0, 3.0] (`math_reward_range`).
"""

import dataclasses
import math
import re
from fractions import Fraction

from rewards.tags import ANSWER_END, ANSWER_START

MAX_ANSWER_CHARS = 1000
MAX_DEPTH = 64
MAX_EXPONENT = 1000
MAX_BITS = 20000
REL_TOL = 1e-6

UNITS = (
    "%", "percent", "percentage", "degrees", "degree", "deg", "°", "^\\circ", "^{\\circ}", "\\circ",
    "dollars", "dollar", "cents", "cent", "euros", "euro", "pounds", "pound", "usd", "eur", "gbp",
    "mm", "cm", "km", "m", "meters", "meter", "metres", "metre", "kilometers", "kilometres", "centimeters",
    "inches", "inch", "in", "feet", "foot", "ft", "yards", "yard", "yd", "miles", "mile", "mi",
    "mg", "g", "kg", "grams", "gram", "kilograms", "lb", "lbs", "oz", "ounces", "ounce", "tons", "ton",
    "ml", "l", "liters", "liter", "litres", "litre", "gallons", "gallon", "cups", "cup",
    "s", "sec", "secs", "seconds", "second", "min", "mins", "minutes", "minute", "h", "hr", "hrs", "hours", "hour",
    "days", "day", "weeks", "week", "months", "month", "years", "year",
    "mph", "km/h", "kmh", "m/s", "units", "unit", "sq", "square", "cubic", "people", "persons", "items",
)
_UNIT_RE = re.compile(
    r"(?<=[\d.)}\s])\s*(?:" + "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
    + r")(?:\^\{?[23]\}?|²|³)?\s*$", re.IGNORECASE)
_WRAPPERS = ("\\text", "\\textbf", "\\textrm", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname")
_CURRENCY_RE = re.compile(r"\b(?:usd|eur|gbp)(?![a-z])|[$€£]", re.IGNORECASE)
_PREFIX_RE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9_']{0,15}(?:\([A-Za-z]\))?\s*=\s*(?=\S)")
_THOUSANDS_RE = re.compile(r"(?<![\d,.])(\d{1,3}(?:,\d{3})+)(?![\d,]|\.\d*,)")
_TIMES_TEN_RE = re.compile(r"(?<=[\d.])\s*[xX]\s*(?=10\s*\^)")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)(?:\s+|\\frac)\{?(\d+)\}?(?:\s*/\s*|\{)(\d+)\}?$")


@dataclasses.dataclass(frozen=True)
class MathRewardConfig:
    exact: float = 3.0
    stripped: float = 1.5
    close: float = 0.5  # ratio within close_band
    near: float = 0.25  # ratio within near_band
    wrong: float = -1.0
    unparseable: float = -0.5
    missing: float = -0.5  # no answer could be extracted
    close_band: tuple[float, float] = (0.9, 1.1)
    near_band: tuple[float, float] = (0.8, 1.2)


def math_reward_range(cfg: MathRewardConfig = MathRewardConfig()) -> tuple[float, float]:
    vals = (cfg.exact, cfg.stripped, cfg.close, cfg.near, cfg.wrong, cfg.unparseable, cfg.missing)
    return min(vals), max(vals)


def _matching_brace(s: str, open_idx: int) -> int:
    """Index of the `}` closing the `{` at open_idx, or -1. Linear scan, no recursion."""
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _last_command_arg(s: str, names: tuple[str, ...]) -> str | None:
    """Content of the last `\\name{...}` in s for any of names (balanced braces), or None."""
    best = -1
    for name in names:
        best = max(best, s.rfind(name + "{"))
    if best < 0:
        return None
    open_idx = s.index("{", best)
    close = _matching_brace(s, open_idx)
    return s[open_idx + 1:close] if close > 0 else None


def extract_answer(text: str) -> str | None:
    """The answer block's content (stripped), else the last \\boxed{} content, else None (module docstring)."""
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_END)
    start = text.rfind(ANSWER_START, 0, end) if end >= 0 else -1
    if start >= 0:  # the last <answer> that is closed, up to its first </answer>
        end = text.find(ANSWER_END, start)
        ans = text[start + len(ANSWER_START):end].strip()
    else:
        ans = (_last_command_arg(text, ("\\boxed", "\\fbox")) or "").strip()
    return ans or None


def _unwrap_all(s: str, names: tuple[str, ...]) -> str:
    """Replace every `\\name{X}` by ` X ` (innermost first is not needed: each pass removes one wrapper)."""
    for _ in range(MAX_DEPTH):
        idx = max(s.rfind(n + "{") for n in names)
        if idx < 0:
            return s
        open_idx = s.index("{", idx)
        close = _matching_brace(s, open_idx)
        if close < 0:
            return s
        s = s[:idx] + " " + s[open_idx + 1:close] + " " + s[close + 1:]
    return s


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer (module docstring lists the steps). Never raises on a str."""
    if not isinstance(s, str):
        return ""
    s = s[-MAX_ANSWER_CHARS:].strip()
    boxed = _last_command_arg(s, ("\\boxed", "\\fbox"))
    if boxed is not None:
        s = boxed
    s = _unwrap_all(s, _WRAPPERS)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", " "), ("{,}", ","), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\$", "$"),
                     ("\\%", "%"), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""), ("\u2212", "-"),
                     ("\u2013", "-"), ("\u2012", "-"), ("\u2014", "-"), ("\u00d7", "*"), ("\u00b7", "*"),
                     ("\\times", "*"), ("\\cdot", "*"), ("\u00f7", "/"), ("\\div", "/")):
        s = s.replace(old, new)
    s = _CURRENCY_RE.sub(" ", s)
    if s.count("=") == 1:
        s = _PREFIX_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    for _ in range(3):
        t = _UNIT_RE.sub("", s).strip().rstrip(".").strip()
        if t == s or not t:
            break
        s = t
    s = _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r"(?<![A-Za-z0-9]) | (?![A-Za-z0-9])", "", s)


_MARKUP_RE = re.compile(r"[*_`()\[\]{}\"'!?:;]")


def _strip_markup(normalized: str) -> str:
    """The 1.5 tier's form: lower case with markup characters (emphasis, brackets, quotes, `:;!?`) removed.
    Spaces are kept: normalisation already removed those not between two alphanumerics."""
    return _MARKUP_RE.sub("", normalized.lower())


# ---- bounded arithmetic parser (no eval) -----------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d{1,6}))?"  # number, optional e-exponent
    r"|(\\frac|\\sqrt|\\pi|sqrt|pi)|([-+*/^(){}]))")


class _ParseError(Exception):
    pass


def _tokenize(s: str) -> list[tuple[str, object]]:
    """(kind, value) tokens: ("num", Fraction) | ("name", str) | ("op", str). Raises _ParseError."""
    out, pos, n = [], 0, len(s)
    while pos < n:
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            if s[pos:].strip():
                raise _ParseError(s[pos:pos + 10])
            break
        pos = m.end()
        mant, exp, name, op = m.groups()
        if mant is not None:
            if exp is not None and abs(int(exp)) > MAX_EXPONENT:
                raise _ParseError("exponent too large")
            out.append(("num", Fraction(mant) * Fraction(10) ** int(exp or 0)))
        else:
            out.append(("name", name.lstrip("\\")) if name else ("op", op))
    return out


def _check(v):
    """Reject non-finite floats and exact values too big to be an answer (bounded work downstream)."""
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _ParseError("non-finite")
    elif max(v.numerator.bit_length(), v.denominator.bit_length()) > MAX_BITS:
        raise _ParseError("too large")
    return v


def _binop(op: str, a, b):
    try:
        if op == "+":
            return _check(a + b)
        if op == "-":
            return _check(a - b)
        if op == "*":
            return _check(a * b)
        if op == "/":
            if b == 0:
                raise _ParseError("division by zero")
            return _check(a / b)
        return _power(a, b)
    except (OverflowError, ZeroDivisionError) as e:
        raise _ParseError(str(e)) from None


def _power(a, b):
    if isinstance(b, Fraction) and b.denominator == 1:
        e = b.numerator
        if abs(e) > MAX_EXPONENT:
            raise _ParseError("exponent too large")
        if isinstance(a, Fraction):
            if a == 0 and e < 0:
                raise _ParseError("division by zero")
            size = max(a.numerator.bit_length(), a.denominator.bit_length())
            if size * abs(e) > MAX_BITS:
                raise _ParseError("power too large")
        return _check(a ** e)
    if abs(float(b)) > MAX_EXPONENT or float(a) < 0:
        raise _ParseError("bad exponent")
    return _check(math.pow(float(a), float(b)))


def _sqrt(v):
    if v < 0:
        raise _ParseError("sqrt of negative")
    if isinstance(v, Fraction):
        rn, rd = math.isqrt(v.numerator), math.isqrt(v.denominator)
        if rn * rn == v.numerator and rd * rd == v.denominator:
            return Fraction(rn, rd)
    return _check(math.sqrt(float(v)))


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary | implicit-product)*;
    unary := ('-'|'+') unary | power; power := atom ('^' unary-atom)?;
    atom := num | '(' expr ')' | '{' expr '}' | pi | sqrt group | frac group group.
    A second '^' (`10^10^10`) is a parse error on purpose."""

    def __init__(self, tokens):
        self.toks, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, op):
        if self.take() != ("op", op):
            raise _ParseError(f"expected {op}")

    def parse(self):
        v = self.expr()
        if self.peek()[0] != "end":
            raise _ParseError("trailing tokens")
        return v

    def expr(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ParseError("too deep")
        v = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            v = _binop(self.take()[1], v, self.term())
        self.depth -= 1
        return v

    def term(self):
        v = self.unary()
        while True:
            kind, val = self.peek()
            if (kind, val) in (("op", "*"), ("op", "/")):
                self.take()
                v = _binop(val, v, self.unary())
            elif kind == "name" or (kind, val) in (("op", "("), ("op", "{")):
                v = _binop("*", v, self.power())  # implicit product: 2\sqrt{3}, 2\pi, 3(4)
            else:
                return v

    def unary(self):
        if self.peek() in (("op", "-"), ("op", "+")):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _ParseError("too deep")
            sign = self.take()[1]
            v = self.unary()
            self.depth -= 1
            return -v if sign == "-" else v
        return self.power()

    def power(self):
        v = self.atom()
        if self.peek() == ("op", "^"):
            self.take()
            sign = -1 if self.peek() == ("op", "-") else 1
            if self.peek() in (("op", "-"), ("op", "+")):
                self.take()
            v = _binop("^", v, sign * self.atom())
            if self.peek() == ("op", "^"):
                raise _ParseError("power tower")
        return v

    def group(self):
        kind, val = self.peek()
        if kind == "num" and val.denominator == 1 and 0 <= val < 10:  # \frac12, \sqrt2: one-digit shorthand
            self.take()
            return val
        return self.atom()

    def atom(self):
        kind, val = self.take()
        if kind == "num":
            return val
        if kind == "op" and val in "({":
            v = self.expr()
            self.expect(")" if val == "(" else "}")
            return v
        if kind == "name" and val == "pi":
            return math.pi
        if kind == "name" and val == "sqrt":
            return _sqrt(self.group())
        if kind == "name" and val == "frac":
            num = self.group()
            return _binop("/", num, self.group())
        raise _ParseError(f"unexpected {val!r}")


def _split_digit_group(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}` (the tokenizer would read `12` as one number)."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)


def _parse_normalized(n: str) -> Fraction | float | None:
    if not n:
        return None
    m = _MIXED_RE.match(n)
    if m:
        sign, whole, num, den = m.groups()
        if int(den) == 0:
            return None
        v = int(whole) + Fraction(int(num), int(den))
        return -v if sign == "-" else v
    n = _TIMES_TEN_RE.sub("*", _split_digit_group(n))
    try:
        return _Parser(_tokenize(n)).parse()
    except (_ParseError, ValueError, OverflowError, ZeroDivisionError, RecursionError):
        return None


def parse_number(s: str) -> Fraction | float | None:
    """The number an answer denotes (exact Fraction, or float with \\sqrt / \\pi), or None. Never raises."""
    if not isinstance(s, str):
        return None
    return _parse_normalized(normalize_answer(s))


def _values_equal(a, b) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=0.0)
    except OverflowError:
        return False


def is_equivalent(pred: str, ref: str) -> bool:
    """Same normalised string, or same value (exact for Fractions, rel. tol. REL_TOL for floats)."""
    if not isinstance(pred, str) or not isinstance(ref, str):
        return False
    npred, nref = normalize_answer(pred), normalize_answer(ref)
    if npred and npred == nref:
        return True
    return _values_equal(_parse_normalized(npred), _parse_normalized(nref))


def math_correct(completion: str, reference) -> bool:
    """The math-accuracy metric (training logs and evaluation alike): the completion's extracted answer is
    equivalent to the reference."""
    return is_equivalent(extract_answer(completion), str(reference))


def _in_band(ratio, band) -> bool:
    if isinstance(ratio, Fraction):  # compare exactly with the decimal band ends: 45/50 is in [0.9, 1.1]
        return Fraction(str(band[0])) <= ratio <= Fraction(str(band[1]))
    return band[0] <= ratio <= band[1]


def score_answer(pred: str | None, ref: str, cfg: MathRewardConfig = MathRewardConfig()) -> float:
    """The cascade of the module docstring on an already extracted answer."""
    if not isinstance(pred, str) or not pred.strip():
        return float(cfg.missing)
    ref = ref if isinstance(ref, str) else ""
    npred, nref = normalize_answer(pred), normalize_answer(ref)
    a, b = _parse_normalized(npred), _parse_normalized(nref)
    if (npred and npred == nref) or _values_equal(a, b):
        return float(cfg.exact)
    if a is None or b is None:
        sp = _strip_markup(npred)
        return float(cfg.stripped if sp and sp == _strip_markup(nref) else cfg.unparseable)
    if b == 0:
        return float(cfg.wrong)
    try:
        ratio = a / b if isinstance(a, Fraction) and isinstance(b, Fraction) else float(a) / float(b)
    except (OverflowError, ZeroDivisionError):
        return float(cfg.wrong)
    if _in_band(ratio, cfg.close_band):
        return float(cfg.close)
    if _in_band(ratio, cfg.near_band):
        return float(cfg.near)
    return float(cfg.wrong)


def math_reward(completion: str, reference: str, cfg: MathRewardConfig = MathRewardConfig()) -> float:
    """Score a completion's extracted answer against the reference answer (range: `math_reward_range`)."""
    return score_answer(extract_answer(completion), reference, cfg)
