"""GSM8K: loading, the seeded test subset, the study's four prompt strategies, answer extraction,
scoring. The calculator for `<<expr=result>>` annotations is nanogsm/calculator.py."""
import functools
import os
import random
import re
from collections import Counter
from pathlib import Path

from nanogsm.generate import generate
from nanogsm.report import progress, read_jsonl, wilson_interval

CONFIGS = ("main", "socratic")
SPLITS = ("train", "test")
SUBSET_SEED = 1234  # the seeded 256-problem test subset: same ids every run
SUBSET_SIZE = 256
HUB_DATASET = "openai/gsm8k"

INSTRUCTION = ("You are a helpful math assistant. Please provide a step-by-step derivation and end your answer "
               "with the final numerical result in the format '#### <number>'.")
STRATEGIES = ("zero-shot", "one-shot", "zero-shot-instruct", "one-shot-instruct",  # the study's four
              "5-shot", "8-shot-cot")  # lm-evaluation-harness's gsm8k and gsm8k_cot, as model cards report
STOP_STRINGS = ("\nQuestion:",)  # a base model goes on to invent the next problem
FIVE_SHOT_SEED = 1234  # the 5 train exemplars of `--prompt 5-shot` (lm-eval's default few-shot seed)

# lm-evaluation-harness (EleutherAI, lm_eval/tasks/gsm8k/gsm8k.yaml, gsm8k-cot.yaml): the stop strings,
# the strict answer regex, and what exact match ignores in the answer and the reference.
LM_EVAL = {
    "5-shot": dict(stops=("Question:", "\n\n"), answer=re.compile(r"#### (\-?[0-9\.\,]+)"),
                   ignore=(",", r"\$", r"(?s).*#### ")),
    "8-shot-cot": dict(stops=("Q:",), answer=re.compile(r"The answer is (\-?[0-9\.\,]+)."),
                       ignore=(",", r"\$", r"(?s).*#### ", r"\.$")),
}
# Wei et al. 2022's eight chain-of-thought exemplars, as lm-eval's gsm8k_cot gives them.
COT_EXAMPLES = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

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
        rows = read_jsonl(folder / name)
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


def build_prompt(question, strategy="one-shot-instruct", chat=False, tokenizer=None, shots=None):
    """The prompt text; for instruction-tuned models wrapped in the chat template (the instruction
    goes in the user turn: Gemma has no system role). 5-shot: `shots`, train records
    (`five_shot_examples`), as `Question: ...\nAnswer: <gold answer>` blocks; 8-shot-cot: Wei et al.'s
    exemplars as `Q: ...\nA: ...`; both separated by blank lines, as lm-eval builds them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; expected one of {STRATEGIES} or 'all'")
    if strategy == "5-shot":
        if not shots:
            raise ValueError("--prompt 5-shot needs its train exemplars (five_shot_examples)")
        text = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in shots)
        text += f"Question: {question}\nAnswer:"
        return tokenizer.chat(text) if chat else text
    if strategy == "8-shot-cot":
        text = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in COT_EXAMPLES) + f"Q: {question}\nA:"
        return tokenizer.chat(text) if chat else text
    text = f"Question: {question}\nAnswer:"
    if strategy.startswith("one-shot"):
        text = f"Question: {ONE_SHOT_QUESTION}\nAnswer: {ONE_SHOT_ANSWER}\n\n" + text
    if strategy.endswith("instruct"):
        text = f"{INSTRUCTION}\n\n" + text
    return tokenizer.chat(text) if chat else text


def five_shot_examples(data_dir=None, config="main"):
    """The 5 train records of `--prompt 5-shot`: seeded (FIVE_SHOT_SEED), the same for every question.
    (lm-eval draws 5 per question with the same seed, so its exemplars differ from question to question.)"""
    return seeded_subset(load_gsm8k(config, "train", data_dir), 5, FIVE_SHOT_SEED)


def stop_strings(strategy):
    return LM_EVAL[strategy]["stops"] if strategy in LM_EVAL else STOP_STRINGS


def lm_eval_match(text, reference, strategy):
    """lm-eval's strict exact match: (the first answer its regex finds, or None; whether it equals the
    reference once both lose what the task ignores)."""
    task = LM_EVAL[strategy]
    m = task["answer"].search(text)
    if m is None:
        return None, False
    clean = lambda t: functools.reduce(lambda t, r: re.sub(r, "", t), task["ignore"], t).strip().lower()  # noqa: E731
    return m.group(1), clean(m.group(1)) == clean(reference)


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


def solution_steps(answer):
    """Reasoning lines of a GSM8K reference answer (the lines before '####'): a cheap difficulty
    measure. Train has 2-9; 2 (26% of train) are the easiest."""
    return len([line for line in answer.split("####")[0].splitlines() if line.strip()])


def same_number(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


ANNOTATION = re.compile(r"<<[^<>]*=([^<>=]*)>>")  # <<48/2=24>> -> "24"


def annotation_results(text):
    """The results of a text's `<<expr=result>>` annotations as numbers, each once, in order."""
    values = [to_number(found.strip().rstrip(".")) for found in ANNOTATION.findall(text)]
    return [v for i, v in enumerate(values) if v is not None and not any(same_number(v, w) for w in values[:i])]


def step_credit(text, answer):
    """Partial credit for the intermediate results: the F1 of the annotation results of `text`
    against those of the reference `answer`; 0 when either has none. Recall rewards the reference's
    steps found, precision keeps padding with extra annotations from paying."""
    mine, gold = annotation_results(text), annotation_results(answer)
    if not mine or not gold:
        return 0.0
    precision = sum(any(same_number(m, g) for g in gold) for m in mine) / len(mine)
    recall = sum(any(same_number(m, g) for m in mine) for g in gold) / len(gold)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def reward(text, record, wrong=0.0, step=0.0, format_bonus=0.0):
    """An RL response's reward and whether it is right: 1 when its '####' number is the gold answer,
    else `wrong` + `step` x its step credit; plus `format_bonus` when it has a '####' number."""
    answer = extract_answer(text)
    right = same_number(answer, record["gold"])
    score = 1.0 if right else wrong + step * step_credit(text, record["answer"])
    return score + (format_bonus if answer is not None else 0.0), right


def is_correct(completion, gold_answer):
    """Strict exact match: the number after '####' equals the gold number (a string or a float)."""
    gold = extract_answer(gold_answer) if isinstance(gold_answer, str) else gold_answer
    return same_number(extract_answer(completion), gold)


# ---- evaluation --------------------------------------------------------------------------------

def evaluate(model, tok, records, strategy="one-shot-instruct", chat=False, batch_size=16, max_new_tokens=256,
             samples=1, temperature=0.0, seed=0, calculator=False, cuda_graph=True, data_dir=None):
    """Generate for every record (k = samples per problem) and score; returns one row per problem.
    All prompts go to one `generate` call that decodes batch_size of them at a time, refilling
    finished rows (continuous batching)."""
    k = samples
    shots = five_shot_examples(data_dir) if strategy == "5-shot" else None
    prompts = [tok.encode(build_prompt(r["question"], strategy, chat, tok, shots)) for r in records for _ in range(k)]
    bar = progress(range(len(prompts)), desc=strategy)  # advanced as answers finish
    next(bar, None)
    outs = generate(model, prompts, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids,
                    stop_strings=stop_strings(strategy), tokenizer=tok, seed=seed, calculator=calculator,
                    batch_size=batch_size, on_finish=lambda i: next(bar, None), cuda_graph=cuda_graph)
    return [score(r, [finish(t, tok, max_new_tokens, stop_strings(strategy)) for t in outs[i * k:(i + 1) * k]], strategy)
            for i, r in enumerate(records)]


def finish(tokens, tok, max_new_tokens, stops=STOP_STRINGS):
    """(text cut at the first stop string, whether generation hit the token budget without stopping)."""
    text = tok.decode(tokens)
    cut = min([text.index(s) for s in stops if s in text], default=None)
    stopped = cut is not None or (tokens and tokens[-1] in tok.stop_ids)
    return (text if cut is None else text[:cut]), (not stopped and len(tokens) >= max_new_tokens)


def score(record, samples, strategy="zero-shot"):
    """One row: strict EM by '####' (the study's prompts) or by lm-eval's own regex and match (5-shot,
    8-shot-cot), the flexible score, the failure kind; maj@k and pass@k with several samples."""
    texts = [t for t, _ in samples]
    if strategy in LM_EVAL:
        reference = record["answer"] if strategy == "5-shot" else record["answer"].split("####")[-1].strip()
        matches = [lm_eval_match(t, reference, strategy) for t in texts]
        answers = [None if m is None else to_number(m) for m, _ in matches]
        correct = [ok for _, ok in matches]
    else:
        answers = [extract_answer(t) for t in texts]
        correct = [same_number(a, record["gold"]) for a in answers]
    votes = Counter(a for a in answers if a is not None).most_common(1)
    majority = votes[0][0] if votes else None
    text, truncated = samples[0]
    if correct[0]:
        kind = "correct"
    elif truncated:
        kind = "truncated at max tokens"
    elif "####" not in text if strategy not in LM_EVAL else answers[0] is None:  # no answer in the prompt's format
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
