"""RL data: converters on small files in each real schema (open-rs parquet, LitBench-Train parquet with its
timestamp and int64 columns, RLPR-Train verl parquet with list<struct> prompt and struct reward_model, recipe
CSV), with exact records, drop counts, numeric-answer classification, Easy:Hard stratification and budgets."""

import csv
import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.filters import Drop, prompt_text
from data.rl import DEFAULT_SYSTEM_PROMPT, MATH_SYSTEM_PROMPT, numeric_answer, prepare_rl, stratify, system_prompt_for

OPEN_RS, LITBENCH, RLPR = "knoveleng/open-rs", "SAA-Lab/LitBench-Train", "openbmb/RLPR-Train-Dataset"


def rl(question, answer, domain, rm, source, canon=None, a_type=None, level=None):
    return {"question": question, "answer": answer, "answer_canon": canon, "domain": domain,
            "reward_model_type": rm, "answer_type": a_type, "system": system_prompt_for(domain), "source": source,
            "level": level}


def dropped(report):
    assert report["read"] == report["kept"] + sum(report["dropped"].values())
    return {k: v for k, v in report["dropped"].items() if v}


NUMERIC = [("42", ("42", "integer")), ("-7", ("-7", "integer")), ("+3", ("3", "integer")),
           ("1,000", ("1000", "integer")), ("$\\boxed{12}$", ("12", "integer")), ("00.50", ("0.5", "decimal")),
           ("-.5", ("-0.5", "decimal")), ("3.0", ("3", "decimal")), ("3/6", ("1/2", "fraction")),
           ("\\frac{2}{4}", ("1/2", "fraction")), ("-\\dfrac{3}{1}", ("-3", "fraction")),
           ("\\tfrac{-1}{2}", ("-1/2", "fraction"))]
NOT_NUMERIC = [("[1,2]", "answer_interval"), ("(0, \\infty)", "answer_interval"), ("1, 2", "answer_multiple"),
               ("3 \\pm 1", "answer_multiple"), ("2 or 3", "answer_multiple"), ("2\\sqrt{3}", "answer_expression"),
               ("x+1", "answer_expression"), ("\\pi", "answer_expression"), ("3/0", "answer_expression"),
               ("30^\\circ", "answer_expression"), ("50\\%", "answer_expression"), ("1.2.3", "answer_expression"),
               ("\\text{Monday}", "answer_text"), ("yes", "answer_text")]


def test_numeric_answer_table():
    assert [numeric_answer(a) for a, _ in NUMERIC] == [want for _, want in NUMERIC]
    reasons = []
    for a, _ in NOT_NUMERIC:
        with pytest.raises(Drop) as e:
            numeric_answer(a)
        reasons.append(e.value.reason)
    assert reasons == [want for _, want in NOT_NUMERIC]


def test_system_prompts():
    assert system_prompt_for("math") == MATH_SYSTEM_PROMPT and system_prompt_for("creative") == DEFAULT_SYSTEM_PROMPT
    assert "<answer>" in MATH_SYSTEM_PROMPT and "</answer>" in MATH_SYSTEM_PROMPT
    assert "only the final number" in MATH_SYSTEM_PROMPT and "number" not in DEFAULT_SYSTEM_PROMPT
    assert "<reasoning>" in DEFAULT_SYSTEM_PROMPT and "</answer>" in DEFAULT_SYSTEM_PROMPT


OPEN_RS_ROWS = [
    ("What is 6 times 7?", "42", "Easy"),
    ("Compute 1/2 + 1/4.", "\\frac{3}{4}", "Hard"),
    ("What is 0.5 + 0.25?", "0.75", "hard"),
    ("Solve (x-1)(x-3) <= 0.", "[1, 3]", "Hard"),
    ("Find all roots of x^2 - 5x + 6.", "2, 3", "Hard"),
    ("Simplify sqrt(12).", "2\\sqrt{3}", "Hard"),
    ("Which day follows Sunday?", "\\text{Monday}", "Easy"),
    ("What is 9 + 10?", "19", "Medium"),
    ("What is 8 + 8?", None, "Easy"),
    ("what is 6  times 7?", "42", "Easy"),
    ("How many grams are in a kilogram?", "1,000", "Hard"),
    ("Evaluate 3/6.", "3/6", "Hard"),
    ("   ", "5", "Easy"),
]
OPEN_RS_KEPT = [
    rl("What is 6 times 7?", "42", "math", "math", OPEN_RS, "42", "integer", "Easy"),
    rl("Compute 1/2 + 1/4.", "\\frac{3}{4}", "math", "math", OPEN_RS, "3/4", "fraction", "Hard"),
    rl("What is 0.5 + 0.25?", "0.75", "math", "math", OPEN_RS, "0.75", "decimal", "Hard"),
    rl("How many grams are in a kilogram?", "1,000", "math", "math", OPEN_RS, "1000", "integer", "Hard"),
    rl("Evaluate 3/6.", "3/6", "math", "math", OPEN_RS, "1/2", "fraction", "Hard"),
]


def _write_open_rs(path):
    pq.write_table(pa.table({"problem": [p for p, _, _ in OPEN_RS_ROWS],
                             "solution": [f"Solution {i}." for i in range(len(OPEN_RS_ROWS))],
                             "answer": pa.array([a for _, a, _ in OPEN_RS_ROWS], pa.string()),
                             "level": [lv for _, _, lv in OPEN_RS_ROWS]}), path)


def test_open_rs_records_drops_and_stratification(tmp_path):
    path = tmp_path / "open_rs.parquet"
    _write_open_rs(path)
    records, report = prepare_rl(path, kind="open_rs", easy_hard=None)
    assert records == OPEN_RS_KEPT
    expected = {"answer_interval": 1, "answer_multiple": 1, "answer_expression": 1, "answer_text": 1,
                "bad_level": 1, "null": 1, "duplicate": 1, "empty_question": 1}
    assert dropped(report) == expected
    # 1 Easy, 4 Hard -> exactly 1:3, one Hard left out (which one depends only on the seed).
    records, report = prepare_rl(path, kind="open_rs", seed=0)
    assert dropped(report) == {**expected, "stratified_out": 1}
    assert [r["level"] for r in records] == ["Easy", "Hard", "Hard", "Hard"]
    assert all(r in OPEN_RS_KEPT for r in records)
    assert records == prepare_rl(path, kind="open_rs", seed=0)[0]


def test_stratify_exact_ratio_and_seed():
    records = [{"level": "Easy", "i": i} for i in range(10)] + [{"level": "Hard", "i": i} for i in range(10, 30)]
    out, n_out = stratify(records, (1, 3), seed=5)
    assert (sum(r["level"] == "Easy" for r in out), sum(r["level"] == "Hard" for r in out), n_out) == (6, 18, 6)
    assert [r["i"] for r in out] == sorted(r["i"] for r in out)
    assert out == stratify(records, (1, 3), seed=5)[0] and out != stratify(records, (1, 3), seed=6)[0]


def _ts(day):
    return datetime.datetime(2023, 1, day, 12, 0)


def test_litbench_top_n_by_upvotes(tmp_path):
    rows = [  # prompt, chosen_story, chosen_upvotes
        ("[WP] A dragon opens a bakery.", "The dragon baked bread at dawn.", 50),
        ("[WP] A dragon opens a bakery.", "Smoke rose from the ovens as the dragon hummed.", 80),
        ("[EU] Harry Potter works at a bank.", "Harry counted galleons all day.", 80),
        ("A robot learns to paint.", "Its first brushstroke was crooked.", 10),
        ("The moon disappears.", "Nobody noticed until the tides stopped.", 30),
        ("A silent city.", None, 70),
        ("A lost key.", "", 99),
        ("Upvotes went missing.", "A story without votes.", None),
    ]
    schema = pa.schema([("prompt", pa.string()), ("chosen_story", pa.string()), ("rejected_story", pa.string()),
                        ("chosen_timestamp", pa.timestamp("ns")), ("rejected_timestamp", pa.timestamp("ns")),
                        ("chosen_upvotes", pa.int64()), ("rejected_upvotes", pa.int64())])
    table = pa.table({"prompt": [r[0] for r in rows], "chosen_story": [r[1] for r in rows],
                      "rejected_story": ["A worse story."] * len(rows),
                      "chosen_timestamp": [_ts(i + 1) for i in range(len(rows))],
                      "rejected_timestamp": [_ts(i + 2) for i in range(len(rows))],
                      "chosen_upvotes": [r[2] for r in rows], "rejected_upvotes": [3] * len(rows)}, schema=schema)
    path = tmp_path / "litbench.parquet"
    pq.write_table(table, path)
    records, report = prepare_rl(path, kind="litbench", top_n=3)
    assert records == [
        rl("A dragon opens a bakery.", "Smoke rose from the ovens as the dragon hummed.", "creative", "prob", LITBENCH),
        rl("Harry Potter works at a bank.", "Harry counted galleons all day.", "creative", "prob", LITBENCH),
        rl("The moon disappears.", "Nobody noticed until the tides stopped.", "creative", "prob", LITBENCH),
    ]
    assert dropped(report) == {"duplicate": 1, "not_selected": 1, "null": 2, "empty_answer": 1}
    assert len(prepare_rl(path, kind="litbench")[0]) == 4  # no top_n: every distinct prompt


def test_rlpr_verl_parquet(tmp_path):
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("data_source", pa.string()), ("prompt", pa.list_(msg)), ("ability", pa.string()),
                        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
                        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())]))])
    their_system = {"role": "system", "content": "A conversation between User and Assistant. Use <think> tags."}
    prompts = [[their_system, {"role": "user", "content": "What is the chemical symbol for gold?"}],
               [{"role": "user", "content": "Which planet is the largest?"}],
               [their_system], None, [{"role": "user", "content": "Q4"}],
               [{"role": "user", "content": "Q5"}], [{"role": "user", "content": "Q6"}], []]
    rewards = [{"ground_truth": "Au", "style": "rule"}, {"ground_truth": "Jupiter", "style": "rule"},
               {"ground_truth": "x", "style": "rule"}, {"ground_truth": "x", "style": "rule"}, None,
               {"ground_truth": None, "style": "rule"}, {"ground_truth": "  ", "style": "rule"},
               {"ground_truth": "x", "style": "rule"}]
    n = len(prompts)
    table = pa.table({"data_source": ["WebInstruct-verified"] * n, "prompt": prompts, "ability": ["Chemistry"] * n,
                      "reward_model": rewards, "extra_info": [{"index": i, "split": "train"} for i in range(n)]},
                     schema=schema)
    path = tmp_path / "rlpr.parquet"
    pq.write_table(table, path)
    records, report = prepare_rl(path, kind="rlpr")
    assert records == [rl("What is the chemical symbol for gold?", "Au", "general", "prob", RLPR),
                       rl("Which planet is the largest?", "Jupiter", "general", "prob", RLPR)]
    assert dropped(report) == {"bad_conversation": 2, "null": 3, "empty_answer": 1}


def test_recipe_csv_rl(tmp_path):
    path = tmp_path / "rl.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "answer_canon", "domain", "reward_model_type", "answer_type"])
        w.writerows([("What is 12 divided by 4?", "3", "3", "math", "", "integer"),
                     ("Write a haiku about rain.", "Rain taps on the roof,\nsoft drums.", "", "", "", ""),
                     ("What is the boiling point of water in Celsius?", "100", "", "Science", "MATH", ""),
                     ("Rate this essay.", "Good.", "", "general", "judge", ""),
                     ("What is 2 + 2?", "", "", "math", "", "")])
        f.write("only,three,fields\n")
    records, report = prepare_rl(path, kind="recipe_csv")
    assert records == [
        rl("What is 12 divided by 4?", "3", "math", "math", "recipe_csv", "3", "integer"),
        rl("Write a haiku about rain.", "Rain taps on the roof,\nsoft drums.", "general", "prob", "recipe_csv"),
        rl("What is the boiling point of water in Celsius?", "100", "science", "math", "recipe_csv"),
    ]
    assert dropped(report) == {"bad_value": 1, "empty_answer": 1, "bad_csv_row": 1}
    # Only the required columns, math by default.
    plain = tmp_path / "plain.csv"
    plain.write_text("question,answer\nWhat is 5 + 5?,10\n")
    assert prepare_rl(plain, kind="recipe_csv", default_domain="math")[0] == \
        [rl("What is 5 + 5?", "10", "math", "math", "recipe_csv")]


def test_prompt_and_answer_budgets_with_tokenizer(tokenizer):
    def count(text):
        return len(tokenizer.encode(text))

    short, long_q = "What is 2 plus 2?", "What is 2 plus 2? " * 30
    limit = count(prompt_text(MATH_SYSTEM_PROMPT, short))
    assert count(prompt_text(MATH_SYSTEM_PROMPT, long_q)) > limit
    rows = [{"problem": short, "answer": "4", "level": "Easy"}, {"problem": long_q, "answer": "4", "level": "Hard"}]
    records, report = prepare_rl(rows, kind="open_rs", count_tokens=count, prompt_budget=limit, easy_hard=None)
    assert [r["question"] for r in records] == [short]  # exactly at the limit: kept
    assert dropped(report) == {"too_long_prompt": 1}
    stories = [{"prompt": "A cat named Tom.", "chosen_story": "Tom slept.", "chosen_upvotes": 5},
               {"prompt": "A fox.", "chosen_story": "The quick brown fox jumps over the lazy dog. " * 10,
                "chosen_upvotes": 9}]
    records, report = prepare_rl(stories, kind="litbench", count_tokens=count, answer_budget=count("Tom slept."))
    assert [r["answer"] for r in records] == ["Tom slept."]
    assert dropped(report) == {"too_long_answer": 1}
    with pytest.raises(ValueError, match="count_tokens"):
        prepare_rl(rows, kind="open_rs", prompt_budget=10)
