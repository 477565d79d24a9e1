"""Deterministic generator of the embedded default's data: small reasoning tasks a tiny model can learn on a CPU.

Two domains, as in the recipe:
- math: multi-step arithmetic word problems with numeric answers that must be computed (two operations each,
  never a number copied from the question), scored by answer correctness;
- general: word-list and calendar tasks with string answers (reverse a list, pick the alphabetically first word,
  the day k days after a weekday), scored by the RLPR probability reward.

Every item comes with a worked reasoning, so the same generator yields a pre-training corpus (plain prose), SFT
traces (`user, assistant` CSV with the reasoning/answer tags) and RL prompts (`question, answer, domain,
reward_model_type` CSV). Items are unique by question text, and the held-out split shares no question with training.

    python -m data.tiny_tasks --out bundled/data        # writes the CSVs and corpus.txt
"""

import argparse
import csv
import os
import random

from rewards.tags import render_completion

NAMES = ["Tom", "Ana", "Ben", "Mia", "Sam", "Eva", "Leo", "Zoe", "Max", "Ivy"]
ITEMS = ["apple", "book", "coin", "pen", "card", "shell", "stone", "cup", "egg", "key"]
WORDS = ["red", "blue", "green", "cat", "dog", "fox", "sun", "moon", "tree", "fish", "bird", "star", "rock", "lake"]
# Short domain system prompts (the recipe's are ~100 tokens for this tokenizer: three times the question). SFT and
# RL rows carry the same one, so the model sees at RL time exactly the prompt format it was fine-tuned on.
SYSTEM = {"math": "Solve it step by step, then give the number.", "general": "Think step by step, then answer."}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _math_item(rng):
    """One two-step arithmetic word problem: (question, reasoning, answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    # Small numbers (results mostly under 30): a 2M-parameter model can learn this arithmetic in minutes.
    if kind == 0:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}s. {name} gets {b} more and then gives away {c}. How many {item}s are left?"
        r = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
        return q, r, f"{a} + {b} - {c} = {a + b - c}.", str(a + b - c)
    if kind == 1:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        c = rng.randint(1, a * b - 1)
        q = f"There are {a} boxes with {b} {item}s in each box. {c} {item}s are lost. How many {item}s are left?"
        r = f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}."
        return q, r, f"{a} * {b} - {c} = {a * b - c}.", str(a * b - c)
    if kind == 2:
        b, each = rng.randint(2, 5), rng.randint(2, 5)
        c = rng.randint(1, 9)
        a = b * each
        q = f"{name} shares {a} {item}s equally among {b} friends. Each friend then finds {c} more. " \
            f"How many {item}s does each friend have?"
        r = f"{a} / {b} = {each}. {each} + {c} = {each + c}."
        return q, r, f"{a} / {b} + {c} = {each + c}.", str(each + c)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    c = a * b + rng.randint(1, 9)
    q = f"One {item} costs {a} dollars. {name} buys {b} {item}s and pays with {c} dollars. How much change is there?"
    r = f"{a} * {b} = {a * b}. {c} - {a * b} = {c - a * b}."
    return q, r, f"{c} - {a} * {b} = {c - a * b}.", str(c - a * b)


def _general_item(rng):
    """One word-list or calendar task with a string answer: (question, reasoning, answer)."""
    kind = rng.randrange(3)
    if kind == 0:
        words = rng.sample(WORDS, rng.randint(3, 4))
        q = f"Reverse the order of these words: {' '.join(words)}"
        r = f"The words are {', '.join(words)}. From last to first they are {', '.join(reversed(words))}."
        return q, r, f"Reversed they are {', '.join(reversed(words))}.", " ".join(reversed(words))
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(3, 4))
        while len({w[0] for w in words}) < len(words):  # distinct first letters: the reasoning below suffices
            words = rng.sample(WORDS, len(words))
        first = min(words)
        q = f"Which word comes first in alphabetical order: {', '.join(words)}?"
        r = f"The first letters are {', '.join(w[0] for w in words)}. The earliest is {first[0]}, so it is {first}."
        return q, r, f"It is {first}.", first
    name, day, k = rng.choice(NAMES), rng.randrange(7), rng.randint(1, 9)
    if rng.random() < 0.5:
        q = f"Today is {DAYS[day]}. {name} will travel in {k} days. On which day will {name} travel?"
    else:
        q = f"{name} starts a trip on {DAYS[day]}. The trip lasts {k} days. On which day does the trip end?"
    steps = ", ".join(DAYS[(day + i) % 7] for i in range(1, k + 1))
    r = f"Counting {k} days after {DAYS[day]}: {steps}."
    return q, r, f"{k} days after {DAYS[day]} is {DAYS[(day + k) % 7]}.", DAYS[(day + k) % 7]


def make_items(n, domain, seed, exclude=frozenset()):
    """n unique items of one domain, skipping questions in `exclude`. Deterministic for (n, domain, seed)."""
    rng = random.Random(f"{domain}-{seed}")
    make = _math_item if domain == "math" else _general_item
    seen, items = set(exclude), []
    for _ in range(200 * n):
        if len(items) == n:
            break
        q, r, short, a = make(rng)
        if q not in seen:
            seen.add(q)
            items.append({"question": q, "reasoning": r, "short_reasoning": short, "answer": a, "domain": domain})
    if len(items) < n:
        raise ValueError(f"only {len(items)} unique {domain} items exist for this generator; asked for {n}")
    return items


def corpus_lines(items):
    """Plain-prose pre-training text: the model learns the language and arithmetic, not yet the output tags."""
    return [f"Question: {it['question']}\nSolution: {it['reasoning']} The answer is {it['answer']}." for it in items]


def write_all(out_dir, *, seed=0, n_sft=2000, n_rl=1000, n_eval=200, n_corpus=20000, long_share=0.2):
    """Write corpus.txt, sft_train.csv, sft_eval.csv, rl_train.csv, rl_eval.csv into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    taken = set()
    for split, n in [("eval", n_eval), ("rl", n_rl), ("sft", n_sft)]:
        items = []
        for domain in ("math", "general"):
            # Half the general items: the evaluation's main number is math accuracy.
            k = n if domain == "math" else n // 2
            new = make_items(k, domain, f"{seed}-{split}", exclude=frozenset(taken))
            taken.update(it["question"] for it in new)
            items += new
        random.Random(f"shuffle-{seed}-{split}").shuffle(items)
        splits[split] = items
    corpus_items = make_items(n_corpus, "math", f"{seed}-corpus", exclude=frozenset(taken))
    corpus_items += make_items(n_corpus // 2, "general", f"{seed}-corpus", exclude=frozenset(taken))
    random.Random(f"corpus-{seed}").shuffle(corpus_items)
    with open(os.path.join(out_dir, "corpus.txt"), "w") as f:
        f.write("\n\n".join(corpus_lines(corpus_items)) + "\n")
    for name, items in [("sft_train", splits["sft"]), ("sft_eval", splits["eval"])]:
        # The teacher's traces: a long (step-by-step) chain of thought with probability long_share, else a short
        # one (a single line). Its own RNG, so the questions (and corpus, tokenizer, base) do not depend on it.
        form_rng = random.Random(f"form-{seed}-{name}")
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "assistant", "domain", "system"])
            for it in items:
                reasoning = it["reasoning"] if form_rng.random() < long_share else it["short_reasoning"]
                w.writerow([it["question"], render_completion(reasoning, it["answer"]), it["domain"],
                            SYSTEM[it["domain"]]])
    for name, items in [("rl_train", splits["rl"]), ("rl_eval", splits["eval"])]:
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "answer", "domain", "reward_model_type", "system"])
            for it in items:
                w.writerow([it["question"], it["answer"], it["domain"], "math" if it["domain"] == "math" else "prob",
                            SYSTEM[it["domain"]]])
    return {k: len(v) for k, v in splits.items()} | {"corpus": len(corpus_items)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bundled/data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_all(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
