"""GSM8K: loading, the seeded test subset, the study's four prompt strategies, answer extraction,
scoring, and the safe calculator for `<<expr=result>>` annotations."""
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

from nanogsm.generate import generate
from nanogsm.report import progress, wilson_interval

CONFIGS = ("main", "socratic")
SPLITS = ("train", "test")
SUBSET_SEED = 1234  # the seeded 256-problem test subset: same ids every run
SUBSET_SIZE = 256
HUB_DATASET = "openai/gsm8k"

INSTRUCTION = ("You are a helpful math assistant. Please provide a step-by-step derivation and end your answer "
               "with the final numerical result in the format '#### <number>'.")
STRATEGIES = ("zero-shot", "one-shot", "zero-shot-instruct", "one-shot-instruct")
STOP_STRINGS = ("\nQuestion:",)  # a base model goes on to invent the next problem

# The one-shot example: the first train record (Natalia's clips).
ONE_SHOT_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?")
ONE_SHOT_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def resolve_data_dir(path=None):
    path = path or os.environ.get("NANOGSM_DATA_DIR")
    return None if path is None else Path(path)


def load_gsm8k(config="main", split="test", data_dir=None):
    """Records {id, question, answer, gold} of one split; id is the index in the split's file.

    Reads `{split}.jsonl` / `{split}_socratic.jsonl` from the data folder (argument or
    NANOGSM_DATA_DIR); without one, or when the folder lacks the file (train_socratic ships only
    on the Hub), the Hub's parquet file for openai/gsm8k.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown GSM8K config {config!r}; expected one of {CONFIGS}")
    if split not in SPLITS:
        raise ValueError(f"unknown GSM8K split {split!r}; expected one of {SPLITS}")
    folder = resolve_data_dir(data_dir)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"GSM8K data folder {folder} does not exist (--data-dir / NANOGSM_DATA_DIR)")
    name = f"{split}.jsonl" if config == "main" else f"{split}_socratic.jsonl"
    if folder is not None and (folder / name).is_file():
        path = folder / name
        lines = [(f"{path}:{i + 1}", line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        rows = []
        for where, line in lines:
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    else:
        rows = hub_rows(config, split)
    return [make_record(i, where, row) for i, (where, row) in enumerate(rows)]


def hub_rows(config, split):
    from huggingface_hub import hf_hub_download
    import pyarrow.parquet as pq
    file = f"{config}/{split}-00000-of-00001.parquet"
    try:
        path = hf_hub_download(HUB_DATASET, file, repo_type="dataset")
    except Exception as e:  # offline, or the Hub refused
        raise ValueError(f"GSM8K {config}/{split}: no local file and the Hub download of {file} failed "
                         f"({type(e).__name__}); set --data-dir / NANOGSM_DATA_DIR") from None
    table = pq.read_table(path).to_pylist()
    return [(f"{HUB_DATASET}/{file} row {i}", row) for i, row in enumerate(table)]


def make_record(index, where, row):
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'question' and 'answer'")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r} is missing or empty")
    gold = extract_answer(row["answer"])
    if gold is None:
        raise ValueError(f"{where}: answer has no '#### <number>' line")
    return {"id": index, "question": row["question"], "answer": row["answer"], "gold": gold}


def seeded_subset(records, n=SUBSET_SIZE, seed=SUBSET_SEED):
    """The seeded subset of n records (sorted by id); all records when n is None."""
    if n is None:
        return records
    if n > len(records):
        raise ValueError(f"--n {n} is larger than the split ({len(records)} problems)")
    ids = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in ids]


def heldout_subset(train_records, n_trained, train_seed, n=SUBSET_SIZE):
    """n seeded train records outside the subset that `--max-examples n_trained --seed train_seed`
    trained on: a held-out slice of train for choosing hyperparameters without the test set."""
    trained = {r["id"] for r in seeded_subset(train_records, n_trained, train_seed)}
    return seeded_subset([r for r in train_records if r["id"] not in trained], n)


def build_prompt(question, strategy="one-shot-instruct", chat=False, tokenizer=None):
    """The study's prompt text; for instruction-tuned models wrapped in the chat template (the
    instruction goes in the user turn: Gemma has no system role)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; expected one of {STRATEGIES} or 'all'")
    text = f"Question: {question}\nAnswer:"
    if strategy.startswith("one-shot"):
        text = f"Question: {ONE_SHOT_QUESTION}\nAnswer: {ONE_SHOT_ANSWER}\n\n" + text
    if strategy.endswith("instruct"):
        text = f"{INSTRUCTION}\n\n" + text
    return tokenizer.chat(text) if chat else text


# ---- answers -----------------------------------------------------------------------------------

NUMBER = r"-?\s*(?:\\?\$)?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
STRICT = re.compile(r"####\s*(-)?\s*(?:\\?\$)?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")


def to_number(text):
    digits = text.replace(",", "")
    try:
        return float(digits)
    except ValueError:
        return None


def extract_answer(text):
    """The number right after the first '####' (tolerates $, \\$, thousands commas, %, a trailing
    period, a leading minus, decimals); None when there is none. '#### $1,234.50.' -> 1234.5"""
    head, sep, tail = text.partition("####")
    if not sep:
        return None
    m = STRICT.match("####" + tail)
    if not m or not m.group(2).strip(","):
        return None
    value = to_number(m.group(2))
    return None if value is None else (-value if m.group(1) else value)


def extract_last_number(text):
    """Flexible mode: the last number anywhere in the text (reported apart from the strict score)."""
    matches = re.findall(r"(-?)\s?\$?(\d[\d,]*(?:\.\d+)?)", text)
    for sign, digits in reversed(matches):
        value = to_number(digits)
        if value is not None:
            return -value if sign else value
    return None


def same_number(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def is_correct(completion, gold_answer):
    """Strict exact match: the number after '####' equals the gold number (a string or a float)."""
    gold = extract_answer(gold_answer) if isinstance(gold_answer, str) else gold_answer
    return same_number(extract_answer(completion), gold)


# ---- evaluation --------------------------------------------------------------------------------

def evaluate(model, tok, records, strategy="one-shot-instruct", chat=False, batch_size=16, max_new_tokens=256,
             samples=1, temperature=0.0, seed=0, calculator=False):
    """Generate for every record (k = samples per problem) and score; returns one row per problem.
    All prompts go to one `generate` call that decodes batch_size of them at a time, refilling
    finished rows (continuous batching)."""
    k = samples
    prompts = [tok.encode(build_prompt(r["question"], strategy, chat, tok)) for r in records for _ in range(k)]
    bar = progress(range(len(prompts)), desc=strategy)  # advanced as answers finish
    next(bar, None)
    outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids,
                    stop_strings=STOP_STRINGS, tokenizer=tok, seed=seed, calculator=calculator,
                    batch_size=batch_size, on_finish=lambda i: next(bar, None))
    return [score(r, [finish(t, tok, max_new_tokens) for t in outs[i * k:(i + 1) * k]]) for i, r in enumerate(records)]


def finish(tokens, tok, max_new_tokens):
    """(text cut at the first stop string, whether generation hit the token budget without stopping)."""
    text = tok.decode(tokens)
    cut = min([text.index(s) for s in STOP_STRINGS if s in text], default=None)
    stopped = cut is not None or (tokens and tokens[-1] in tok.stop_ids)
    return (text if cut is None else text[:cut]), (not stopped and len(tokens) >= max_new_tokens)


def score(record, samples):
    texts = [t for t, _ in samples]
    answers = [extract_answer(t) for t in texts]
    correct = [same_number(a, record["gold"]) for a in answers]
    votes = Counter(a for a in answers if a is not None).most_common(1)
    majority = votes[0][0] if votes else None
    text, truncated = samples[0]
    if correct[0]:
        kind = "correct"
    elif truncated:
        kind = "truncated at max tokens"
    elif "####" not in text:
        kind = "no ####"
    elif answers[0] is None:
        kind = "unparsable after ####"
    else:
        kind = "wrong number"
    row = {"id": record["id"], "question": record["question"], "gold": record["gold"], "completion": text,
           "extracted": answers[0], "correct": correct[0], "flexible_correct": same_number(extract_last_number(text),
                                                                                          record["gold"]),
           "kind": kind}
    if len(samples) > 1:
        row.update(completions=texts, extracted_all=answers, maj_correct=same_number(majority, record["gold"]),
                   pass_correct=any(correct), sample_accuracy=sum(correct) / len(correct))
    return row


def summarize(rows, strategy, k):
    n = len(rows)
    em = sum(r["correct"] for r in rows)
    lo, hi = wilson_interval(em, n)
    flex = sum(r["flexible_correct"] for r in rows)
    fmt = sum(r["extracted"] is not None for r in rows)
    print(f"\n{strategy}: strict EM {em}/{n} = {100 * em / n:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}) | "
          f"flexible {100 * flex / n:.1f}% | '####' format {100 * fmt / n:.1f}%")
    kinds = Counter(r["kind"] for r in rows)
    print("  failures: " + ", ".join(f"{kind} {kinds[kind]}" for kind in
                                     ["no ####", "unparsable after ####", "truncated at max tokens", "wrong number"]))
    summary = {"strategy": strategy, "n": n, "em": em / n, "ci": (lo, hi), "flexible": flex / n, "format": fmt / n}
    if k > 1:
        maj, pas = sum(r["maj_correct"] for r in rows), sum(r["pass_correct"] for r in rows)
        mean = sum(r["sample_accuracy"] for r in rows) / n
        print(f"  maj@{k} {100 * maj / n:.1f}% | pass@{k} {100 * pas / n:.1f}% | mean single sample {100 * mean:.1f}%")
    return summary


# ---- the calculator ----------------------------------------------------------------------------

TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|[-+*/()])")


def calculate(expr, max_len=100):
    """Value of an arithmetic expression (numbers, + - * / and parentheses only) as text, or None.

    A small recursive-descent parser: nothing is ever passed to eval. Results print like GSM8K's
    annotations: integers without '.0', others rounded to 6 decimals.
    """
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > max_len:
        return None
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    tokens.append(None)  # end marker
    i = 0

    def peek():
        return tokens[i]

    def take():
        nonlocal i
        i += 1
        return tokens[i - 1]

    def atom():
        t = take()
        if t == "-":
            return -atom()
        if t == "(":
            v = sum_()
            if take() != ")":
                raise ValueError
            return v
        if t is None or t in "+-*/()":
            raise ValueError
        return float(t)

    def product():
        v = atom()
        while peek() in ("*", "/"):
            v = v * atom() if take() == "*" else v / atom()
        return v

    def sum_():
        v = product()
        while peek() in ("+", "-"):
            v = v + product() if take() == "+" else v - product()
        return v

    try:
        value = sum_()
        if peek() is not None or abs(value) > 1e15:
            return None
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return str(int(value)) if value == int(value) else f"{value:.6f}".rstrip("0")
