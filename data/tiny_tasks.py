"""Deterministic generator of the embedded default's data: small reasoning tasks a tiny model can learn on a CPU.

Two domains, as in the recipe:
- math: multi-step arithmetic word problems with numeric answers that must be computed (two operations each,
  never a number copied from the question), scored by answer correctness;
- general: two-step word-list, swap and calendar tasks with string answers (two list operations in a row, what a
  person holds after two swaps, the weekday after two waits), scored during GRPO by the RLPR probability reward
  only. As for math, the long trace writes the state after each step and the short one only states the result,
  so writing the work out is what makes the reference answer likely for a tiny model.

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


# The list operations of the general word-list task, each written the same way in the question and in the steps.
LIST_OPS = {
    "move the first word to the end": lambda w: w[1:] + w[:1],
    "move the last word to the front": lambda w: w[-1:] + w[:-1],
    "swap the first two words": lambda w: [w[1], w[0], *w[2:]],
    "swap the last two words": lambda w: [*w[:-2], w[-1], w[-2]],
    "reverse the words": lambda w: w[::-1],
}


def _list_item(rng):
    """Two list operations in a row on 3-4 words: the long form writes the list after each one."""
    while True:
        words = rng.sample(WORDS, rng.randint(3, 4))
        op1, op2 = rng.sample(sorted(LIST_OPS), 2)
        mid = LIST_OPS[op1](words)
        end = LIST_OPS[op2](mid)
        if end != words:  # the answer is never the question's own list
            break
    q = f"Start with {' '.join(words)}. First {op1}, then {op2}. What are the words now?"
    r = f"{op1.capitalize()}: {' '.join(mid)}. {op2.capitalize()}: {' '.join(end)}."
    return q, r, f"The words become {' '.join(end)}.", " ".join(end)


def _swap_item(rng):
    """Three people swap what they hold twice (two different pairs); the question asks what one ends with."""
    people, things = rng.sample(NAMES, 3), rng.sample(ITEMS, 3)
    held = dict(zip(people, things))
    q_start = ", ".join(f"{p} has the {t}" for p, t in held.items())
    first, second = rng.sample([(0, 1), (0, 2), (1, 2)], 2)
    steps = []
    for i, j in (first, second):
        a, b = people[i], people[j]
        held[a], held[b] = held[b], held[a]
        steps.append(f"{a} and {b} swap: " + ", ".join(f"{p} {held[p]}" for p in people) + ".")
    who = rng.choice(people)
    (a1, b1), (a2, b2) = [(people[i], people[j]) for i, j in (first, second)]
    q = f"{q_start}. {a1} and {b1} swap, then {a2} and {b2} swap. What does {who} have?"
    steps.append(f"So {who} has the {held[who]}.")
    return q, " ".join(steps), f"{who} has the {held[who]}.", held[who]


def _calendar_item(rng):
    """A weekday after two waits in a row: the long form names the day after each wait."""
    name, day, k1 = rng.choice(NAMES), rng.randrange(7), rng.randint(1, 9)
    k2 = rng.choice([k for k in range(1, 10) if (k1 + k) % 7])  # never back on the question's own day
    mid, end = DAYS[(day + k1) % 7], DAYS[(day + k1 + k2) % 7]
    q = f"Today is {DAYS[day]}. {name} leaves in {k1} days and comes back {k2} days later. " \
        f"On which day does {name} come back?"
    r = f"Counting {k1} days from {DAYS[day]} gives {mid}. Counting {k2} days from {mid} gives {end}."
    return q, r, f"{name} comes back on {end}.", end


def _general_item(rng):
    """One general task with a string answer: (question, reasoning, short reasoning, answer). Each needs two
    steps; the long form writes the state after each, the short form only states the result (as for math)."""
    return [_list_item, _swap_item, _calendar_item][rng.randrange(3)](rng)


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


CORPUS_SOLUTION = "\nSolution:\n"  # what stands between a corpus question and its worked solution (corpus_lines)
CORPUS_ANSWER = "\nAnswer:\n"  # what stands between a corpus solution and its answer (corpus_lines)


def corpus_lines(items):
    """Plain-prose pre-training text: the model learns the language and arithmetic, not yet the output tags.

    The solution and the answer each start a line, as they do in the completion ("<reasoning>\nCounting ...",
    "<answer>\nTuesday\n"). The tokenizer, like Gemma's, adds no dummy space, so a word at a line start is other
    tokens than the same word after a space ("T", "uesday" against "▁Tuesday"). When the corpus wrote answers only
    after a space ("The answer is Tuesday."), the tiny model never learned to copy a word from its reasoning into the
    answer block; when it wrote "Solution: Counting ...", it learned to work a task out only after a space, and at
    the reasoning block's line start it solved 0.025 of the calendar tasks it solved 1.000 of after a space."""
    return [f"Question: {it['question']}{CORPUS_SOLUTION}{it['reasoning']}{CORPUS_ANSWER}{it['answer']}"
            for it in items]


def write_all(out_dir, *, seed=0, n_sft=2000, n_rl=1000, n_eval=200, n_corpus=20000, long_share=0.2):
    """Write corpus.txt, sft_train.csv, sft_eval.csv, rl_train.csv, rl_eval.csv into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    taken = set()
    for split, n in [("eval", n_eval), ("rl", n_rl), ("sft", n_sft)]:
        items = []
        for domain in ("math", "general"):
            # Half as many general items to train on (math is the bigger half of the recipe's data); the held-out
            # split has as many of each, so both domains' accuracies are measured on 200 items.
            k = n if domain == "math" or split == "eval" else n // 2
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
        # The teacher's traces: exactly round(long_share * n) of each domain's n items get the long (step-by-step)
        # chain of thought, the others the short one (a single line). Its own RNG, so the questions (and corpus,
        # tokenizer, base) do not depend on it.
        form_rng = random.Random(f"form-{seed}-{name}")
        long_rows = set()
        for domain in ("math", "general"):
            rows = [i for i, it in enumerate(items) if it["domain"] == domain]
            long_rows.update(form_rng.sample(rows, round(long_share * len(rows))))
        with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "assistant", "domain", "system"])
            for i, it in enumerate(items):
                reasoning = it["reasoning"] if i in long_rows else it["short_reasoning"]
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
