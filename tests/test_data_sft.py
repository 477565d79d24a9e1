"""SFT data: converters on small files in each real schema (glaive parquet/JSONL, Bespoke-Stratos parquet with its
list<struct> conversations, recipe CSV) with exact records and drop counts, token budgets with the test tokenizer,
the English heuristic, long:short and domain mixing, the stage-2 filter and the train/eval split."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.filters import english_stats, is_english, normalize_prompt
from data.mix import domain_counts, mix_domains, mix_long_short, stage2_filter, train_eval_split
from data.sft import SFTBudgets, prepare_sft, sft_completion

GLAIVE = "glaiveai/reasoning-v1-20m"
BESPOKE = "bespokelabs/Bespoke-Stratos-17k"


def rec(prompt, reasoning, answer, domain, source, system=None):
    return {"prompt": prompt, "reasoning": reasoning, "answer": answer, "domain": domain, "source": source,
            "system": system}


def dropped(report):
    """Only the non-zero drop counts, and check the accounting adds up."""
    assert report["read"] == report["kept"] + sum(report["dropped"].values())
    return {k: v for k, v in report["dropped"].items() if v}


GLAIVE_ROWS = [
    ("What is the capital of France? Answer in one word please.",
     "<think>\nThe capital of France is Paris.\n</think>\n\nParis"),
    ("Explain why the sky is blue.", "<think>Rayleigh scattering of sunlight.</think>Air scatters blue light more."),
    ("What is 2 plus 2?", "<think>no close tag. The answer is 4"),                      # unbalanced
    ("What is 3 plus 3?", "<think>a</think><think>b</think>6"),                          # duplicated tags
    ("What is 4 plus 4?", "<think>Add them up.</think>   "),                             # empty answer
    ("What is 5 plus 5?", "<think>  </think>10"),                                        # empty reasoning
    ("Explica por qué el cielo parece azul durante el día y rojo al atardecer.",
     "<think>Dispersión.</think>Rayleigh"),                                               # Spanish prompt
    ("Why is the sky blue?", "<think>Scattering.</think>天空是蓝色的因为散射"),                 # Chinese answer
    ("what is the capital of  France? answer in one word PLEASE.", "<think>Paris.</think>Paris"),  # duplicate
    ("Name a prime number.", None),                                                      # null
    ("What is 6 plus 6?", "<think>x</think><answer>12</answer>"),                        # contract tag inside
    ("What is 7 plus 7?", "Sure! <think>x</think> 14"),                                  # text before reasoning
    ("What is 8 plus 8?", "</think>x<think>16"),                                         # wrong order
]


def test_glaive_parquet_records_and_drops(tmp_path):
    path = tmp_path / "glaive.parquet"
    pq.write_table(pa.table({"prompt": pa.array([p for p, _ in GLAIVE_ROWS], pa.string()),
                             "response": pa.array([r for _, r in GLAIVE_ROWS], pa.string())}), path)
    records, report = prepare_sft(path, kind="glaive", batch_size=4)
    assert records == [
        rec("What is the capital of France? Answer in one word please.", "The capital of France is Paris.", "Paris",
            "general", GLAIVE),
        rec("Explain why the sky is blue.", "Rayleigh scattering of sunlight.", "Air scatters blue light more.",
            "general", GLAIVE),
    ]
    assert report["read"] == 13 and report["kept"] == 2
    assert dropped(report) == {"bad_tags": 5, "empty_answer": 1, "empty_reasoning": 1, "non_english": 2,
                               "duplicate": 1, "null": 1}
    assert sft_completion(records[0]) == \
        "<reasoning>\nThe capital of France is Paris.\n</reasoning>\n<answer>\nParis\n</answer>"
    assert "glaive.parquet: row 2" in report["examples"]["bad_tags"][0]


def test_glaive_jsonl_wrong_types_missing_keys_bad_lines(tmp_path):
    path = tmp_path / "glaive.jsonl"
    path.write_text('{"prompt": 12, "response": "<think>a</think>b"}\n'
                    '{"prompt": "Tell me a fact about cats."}\n'
                    '{"prompt": "Tell me a fact about dogs.", "response": ["<think>a</think>b"]}\n'
                    '{"prompt": "Tell me a fact about owls.", "response": "<think>They hunt.</think>Owls\n'
                    '{"prompt": "Tell me a fact about owls.", "response": "<think>They hunt.</think>Owls fly."}\n')
    records, report = prepare_sft(path, kind="glaive")
    assert records == [rec("Tell me a fact about owls.", "They hunt.", "Owls fly.", "general", GLAIVE)]
    assert dropped(report) == {"wrong_type": 2, "missing_column": 1, "bad_json": 1}
    # A parquet file without a required column is a wrong file, not a bad row.
    bad = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["x"]}), bad)
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['prompt', 'response'\]"):
        prepare_sft(bad, kind="glaive")


BESPOKE_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic long "
                  "thinking process before providing the final precise and accurate solutions.")


def _bespoke(thought, solution):
    return (f"<|begin_of_thought|>\n\n{thought}\n\n<|end_of_thought|>\n\n"
            f"<|begin_of_solution|>\n\n{solution}\n\n<|end_of_solution|>")


def _turns(user, assistant):
    return [{"from": "user", "value": user}, {"from": "assistant", "value": assistant}]


MATH_Q = "Return your final response within \\boxed{}. What is the sum of the first 10 positive integers?"
CODE_Q = "Generate an executable Python function generated from the given prompt. Read n and print n squared."
SCI_Q = "Why does ice float on water? Explain the physics briefly."


def test_bespoke_parquet_records_and_drops(tmp_path):
    conv = [
        _turns(MATH_Q, _bespoke("Use n(n+1)/2 = 55.", "The sum is \\boxed{55}.")),
        _turns(CODE_Q, _bespoke("Read an int and square it.", "```python\nn = int(input())\nprint(n * n)\n```")),
        _turns(SCI_Q, _bespoke("Ice is less dense than water.", "Ice is less dense, so it floats.")),
        _turns("What is 1 plus 1?", "<|begin_of_solution|>2<|end_of_solution|><|begin_of_thought|>x"
                                    "<|end_of_thought|>"),                                    # markers out of order
        _turns("What is 2 plus 1?", "<|begin_of_thought|>x<|end_of_thought|><|begin_of_solution|>3"),  # unbalanced
        _turns("What is 3 plus 1?", _bespoke("x", "4")) + [{"from": "user", "value": "more"}],  # three turns
        None,                                                                                 # null
        [{"from": "user", "value": "What is 4 plus 1?"}, {"from": "assistant", "value": None}],  # null value
        _turns("What is 5 plus 1?", _bespoke("Add one.", "  ")),                              # empty solution
        [{"from": "assistant", "value": "hi"}, {"from": "user", "value": "What is 6 plus 1?"}],  # roles swapped
    ]
    schema = pa.schema([("system", pa.string()),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
    path = tmp_path / "bespoke.parquet"
    pq.write_table(pa.table({"system": [BESPOKE_SYSTEM] * len(conv), "conversations": conv}, schema=schema), path)
    records, report = prepare_sft(path, kind="bespoke")
    assert records == [
        rec(MATH_Q, "Use n(n+1)/2 = 55.", "The sum is \\boxed{55}.", "math", BESPOKE),
        rec(CODE_Q, "Read an int and square it.", "```python\nn = int(input())\nprint(n * n)\n```", "code", BESPOKE),
        rec(SCI_Q, "Ice is less dense than water.", "Ice is less dense, so it floats.", "science", BESPOKE),
    ]
    assert dropped(report) == {"bad_tags": 2, "bad_conversation": 2, "null": 2, "empty_answer": 1}


def test_recipe_csv_records_and_drops(tmp_path):
    path = tmp_path / "sft.csv"
    rows = [
        ("What is 7 times 6?", "<reasoning>\n7 * 6 = 42.\n</reasoning>\n<answer>\n42\n</answer>", "math", ""),
        ("Name a primary color.", "<think>Red is a primary color.</think>\nRed", "", "Be brief."),
        ("What is 10 minus 3?", "<think>10 - 3 = 7</think><answer>7</answer>", "Math", ""),
        ("What is 9 minus 3?", "<reasoning>r</reasoning><answer>6</answer> extra", "math", ""),
        ("What is 9 minus 4?", "<reasoning>r</reasoning><answer>5</answer><answer>6</answer>", "math", ""),
        ("What is 9 minus 5?", "Just 4.", "math", ""),
        ("What is 9 minus 6?", "<reasoning>r\n<answer>3</answer>", "math", ""),
        ("What is 9 minus 7?", "<reasoning>It is 2.</reasoning><answer> </answer>", "math", ""),
        ("What is 9 minus 8?", "<answer>1</answer><reasoning>r</reasoning>", "math", ""),
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "assistant", "domain", "system"])
        w.writerows(rows)
        f.write("a row,with only two fields\n")
    records, report = prepare_sft(path, kind="recipe_csv")
    assert records == [
        rec("What is 7 times 6?", "7 * 6 = 42.", "42", "math", "recipe_csv"),
        rec("Name a primary color.", "Red is a primary color.", "Red", "general", "recipe_csv", "Be brief."),
        rec("What is 10 minus 3?", "10 - 3 = 7", "7", "math", "recipe_csv"),
    ]
    assert dropped(report) == {"bad_tags": 5, "empty_answer": 1, "bad_csv_row": 1}
    plain = tmp_path / "plain.csv"
    plain.write_text('user,assistant\nWhat is 5 + 5?,"<reasoning>5 + 5 = 10.</reasoning><answer>10</answer>"\n')
    assert prepare_sft(plain, kind="recipe_csv", default_domain="math")[0] == \
        [rec("What is 5 + 5?", "5 + 5 = 10.", "10", "math", "recipe_csv")]


def test_token_budgets_with_tokenizer(tokenizer):
    def count(text):
        return len(tokenizer.encode(text))

    step = "Reasoning step by step about numbers. "
    rows = {"A": ("What is 2 plus 2?", "2 plus 2 is 4.", "4"),
            "B": ("What is 2 plus 2? " * 20, "2 plus 2 is 4.", "4"),
            "C": ("What is 3 plus 3?", step * 20, "6"),
            "D": ("What is 4 plus 4? " * 3, step * 3, "8")}
    n = {k: (count(p), count(sft_completion(rec(p, r, a, "math", "x")))) for k, (p, r, a) in rows.items()}
    budgets = SFTBudgets(prompt=max(n["A"][0], n["C"][0], n["D"][0]), completion=max(n["A"][1], n["D"][1]),
                         total=sum(n["A"]))
    # The rows are built so that each hits exactly one limit (checked here, so the test means what it says).
    assert n["B"][0] > budgets.prompt and n["C"][1] > budgets.completion and sum(n["D"]) > budgets.total
    rows_in = [{"prompt": p, "response": f"<think>{r}</think>{a}"} for p, r, a in rows.values()]
    records, report = prepare_sft(rows_in, kind="glaive", count_tokens=count, budgets=budgets)
    assert [r["prompt"] for r in records] == ["What is 2 plus 2?"]  # exactly at the total limit: kept
    assert dropped(report) == {"too_long_prompt": 1, "too_long_completion": 1, "too_long_total": 1}
    with pytest.raises(ValueError, match="count_tokens"):
        prepare_sft(rows_in, kind="glaive", budgets=budgets)


def test_english_heuristic_table():
    english = ["Explain why the sky appears blue during the day and red at sunset.",
               "Solve 3x + 5 = 11.",
               "Return your final response within \\boxed{}. Let $f(x) = 3x^2 - 5x + 2$. Compute $f(f(1))$ and "
               "simplify the result.",
               "Generate an executable Python function generated from the given prompt. Given an array A of N "
               "integers, find the maximum sum of a contiguous subarray."]
    other = ["Explica por qué el cielo parece azul durante el día y rojo al atardecer en la tarde.",
             "Explique pourquoi le ciel parait bleu pendant la journee et rouge au coucher du soleil.",
             "Erklaere warum der Himmel am Tag blau und bei Sonnenuntergang rot aussieht, bitte kurz.",
             "Jelaskan mengapa langit tampak biru pada siang hari dan merah saat matahari terbenam.",
             "解释为什么天空在白天是蓝色的", "Объясните, почему небо голубое днём и красное на закате."]
    assert [is_english(t) for t in english] == [True] * 4
    assert [is_english(t) for t in other] == [False] * 6
    assert english_stats("The cat is on the mat today, and the dog is not.") == (1.0, 8 / 12, 12)
    assert english_stats("东京 is big")[0] == pytest.approx(5 / 7)


def _records(n, domain, reasoning="Short.", prefix="p"):
    return [rec(f"{prefix} {domain} {i}", reasoning, "a", domain, "s") for i in range(n)]


def test_mix_long_short_exact_ratio_and_determinism(tokenizer):
    def count(text):
        return len(tokenizer.encode(text))

    long_reasoning = "Reasoning step by step about numbers. " * 40
    assert count(long_reasoning) > 64 >= count("Short.")
    records = _records(7, "math", long_reasoning, "long") + _records(30, "math", "Short.", "short")
    mixed = mix_long_short(records, count_tokens=count, long_threshold=64, seed=0)
    n_long = sum(r["reasoning"] == long_reasoning for r in mixed)
    assert (n_long, len(mixed) - n_long) == (7, 28)
    assert mixed == mix_long_short(records, count_tokens=count, long_threshold=64, seed=0)
    assert mixed != mix_long_short(records, count_tokens=count, long_threshold=64, seed=1)
    assert [records.index(r) for r in mixed] == sorted(records.index(r) for r in mixed)  # input order kept
    few_long = records[4:]  # 3 long, 30 short
    assert len(mix_long_short(few_long, count_tokens=count, long_threshold=64)) == 15
    capped = mix_long_short(few_long, count_tokens=count, long_threshold=64, ratio=(1, 4), max_records=10)
    assert sum(r["reasoning"] == long_reasoning for r in capped) == 2 and len(capped) == 10


def test_mix_domains_exact_counts():
    records = _records(40, "math") + _records(30, "code") + _records(10, "general") + _records(5, "science")
    mixed = mix_domains(records, {"math": 0.5, "code": 0.3, "general": 0.2}, seed=3)
    assert {d: sum(r["domain"] == d for r in mixed) for d in ("math", "code", "general", "science")} == \
        {"math": 25, "code": 15, "general": 10, "science": 0}
    assert mixed == mix_domains(records, {"math": 0.5, "code": 0.3, "general": 0.2}, seed=3)
    assert domain_counts({"a": 100, "b": 100, "c": 100}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, total=10) == \
        {"a": 4, "b": 3, "c": 3}
    with pytest.raises(ValueError, match="sum to 1"):
        mix_domains(records, {"math": 0.5, "code": 0.3})
    with pytest.raises(ValueError, match=r"\['chat'\] with no records"):
        mix_domains(records, {"math": 0.5, "chat": 0.5})


def test_stage2_filter_length_and_math_share(tokenizer):
    def count(text):
        return len(tokenizer.encode(text))

    too_long = "Reasoning step by step about numbers. " * 200
    assert count(too_long) > 1024
    records = (_records(10, "math") + _records(2, "math", too_long, "long") + _records(30, "code")
               + _records(5, "general", too_long, "long"))
    out = stage2_filter(records, count_tokens=count, max_completion_tokens=1024, math_share=0.5, seed=0)
    assert all(count(sft_completion(r)) <= 1024 for r in out)
    assert (sum(r["domain"] == "math" for r in out), len(out)) == (10, 20)
    out = stage2_filter(records, count_tokens=count, math_share=0.8, seed=0)
    assert (sum(r["domain"] == "math" for r in out), len(out)) == (10, 12)
    assert out == stage2_filter(records, count_tokens=count, math_share=0.8, seed=0)


def test_train_eval_split_disjoint_and_deterministic():
    records = [rec(f"Prompt number {i % 25}" if i < 25 else f"  prompt NUMBER {i % 25} ", "r", "a", "math", "s")
               for i in range(50)]
    train, evals = train_eval_split(records, 0.2, seed=0)
    assert (len(train), len(evals)) == (40, 10)
    assert not {normalize_prompt(r["prompt"]) for r in train} & {normalize_prompt(r["prompt"]) for r in evals}
    assert sorted(map(id, train + evals)) == sorted(map(id, records))
    assert (train, evals) == train_eval_split(records, 0.2, seed=0)
    assert evals != train_eval_split(records, 0.2, seed=1)[1]
    assert train_eval_split(records, 0.0) == (records, [])
