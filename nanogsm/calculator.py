"""The calculator for GSM8K's `<<expr=result>>` annotations, as in the GSM8K paper (Cobbe et al.
2021): when a model writes `<<expr=`, the value of expr is forced as its next tokens."""
import re

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


def calculator_tokens(text, tokenizer):
    """If text ends inside an annotation `<<expr=`, the tokens of expr's value, else []."""
    if not text.endswith("=") or "<<" not in text:
        return []
    expr = text[text.rindex("<<") + 2:-1]
    if ">>" in expr:
        return []
    value = calculate(expr)
    return [] if value is None else tokenizer.encode(value, bos=False)


def prompt_tail(prompt, tokenizer):
    """The last tokens of a prompt as text: an annotation `<<` may open there."""
    return tokenizer.decode(prompt[-16:], skip_special=False)


def forced_mask(tokens, tokenizer, prompt=()):
    """Which of a response's tokens the calculator forced (bools, one per token), replaying what
    `generate(..., calculator=True)` did: after each token, the text so far (after the prompt's
    tail) may end in `<<expr=`, and then the tokens of its value come next, chosen by no one."""
    text, pending, mask = prompt_tail(prompt, tokenizer), [], []
    for t in tokens:
        mask.append(bool(pending))
        pending = pending[1:]
        text += tokenizer.decode([t], skip_special=False)
        if not pending:
            pending = calculator_tokens(text, tokenizer)
    return mask
