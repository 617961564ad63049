"""Math answer extraction and equivalence shared by the rule-based rewards.

`last_boxed` pulls the last ``\\boxed{...}`` (or ``\\fbox{...}``) out of a response with
brace matching, so nested LaTeX like ``\\boxed{\\frac{1}{2}}`` survives. `is_equiv` compares
two final answers: first as normalized strings, then as exact numbers (fractions,
decimals, percent-free), then element-wise for tuples, and last symbolically with sympy
(``\\sqrt{2}/2`` vs ``\\frac{\\sqrt{2}}{2}``) on a strict whitelist of characters, because
sympy's parser evaluates Python and the text comes from a model.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["is_equiv", "last_boxed", "normalize_answer", "to_number"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``; None if absent or unbalanced."""
    if not isinstance(text, str):
        return None
    starts = [(text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS]
    start, cmd = max(starts)
    if start < 0:
        return None
    pos = start + len(cmd)
    if text.startswith(" ", pos):  # "\boxed 5": the token after the space
        rest = text[pos:].strip()
        return re.split(r"[\s$]", rest, maxsplit=1)[0] or None
    if not text.startswith("{", pos):
        return None
    depth = 0
    for j in range(pos, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : j].strip()
    return None


def _unwrap_command(s: str, command: str) -> str:
    """``\\text{abc}`` -> ``abc`` for every occurrence of ``command`` (brace-matched)."""
    while True:
        i = s.find(command + "{")
        if i < 0:
            return s
        depth, j = 0, i + len(command)
        for j in range(i + len(command), len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                break
        else:
            return s
        s = s[:i] + s[i + len(command) + 1 : j] + s[j + 1 :]


# Spacing and sizing commands that never change a value.
_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "$", "\\$")
_DEGREES = ("^{\\circ}", "^\\circ", "°")


def normalize_answer(answer: str) -> str:
    """Canonical text of a final answer (spacing, fraction spellings, units markup, thousands commas)."""
    s = str(answer).strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for noise in _NOISE:
        s = s.replace(noise, "")
    for deg in _DEGREES:
        s = s.replace(deg, "")
    for cmd in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox"):
        s = _unwrap_command(s, cmd)
    s = s.replace("\\%", "").replace("%", "")
    # "x = 5", "a=\frac12": the value is what follows a leading single-variable assignment.
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}; \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.\d*?0+", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    return s


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def to_number(answer: str) -> Fraction | None:
    """Exact value of a normalized numeric answer (``3``, ``-0.25``, ``\\frac{3}{4}``, ``-\\frac{1}{2}``, ``3/4``)."""
    s = normalize_answer(answer)
    if _NUMBER.fullmatch(s):
        return Fraction(s)
    m = re.fullmatch(r"([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}", s) or re.fullmatch(
        r"([-+]?)\(?([^/(){}]+)\)?/\(?([^/(){}]+)\)?", s
    )
    if m and _NUMBER.fullmatch(m.group(2)) and _NUMBER.fullmatch(m.group(3)):
        den = Fraction(m.group(3))
        if den == 0:
            return None
        value = Fraction(m.group(2)) / den
        return -value if m.group(1) == "-" else value
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


# After LaTeX -> Python rewriting only these characters and names may remain (see module doc).
_SAFE_EXPR = re.compile(r"[0-9a-zA-Z+\-*/(). ]+")
_ALLOWED_NAMES = {"sqrt", "pi"}


def _latex_to_expr(s: str) -> str | None:
    s = normalize_answer(s)
    for _ in range(8):  # innermost \frac / \sqrt first
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    if len(s) > 80 or not _SAFE_EXPR.fullmatch(s):
        return None
    names = set(re.findall(r"[a-zA-Z]+", s))
    if any(len(n) > 1 and n not in _ALLOWED_NAMES for n in names):
        return None
    if re.search(r"\*\*\s*\(?\s*\d{3,}", s):  # huge powers: not worth the time
        return None
    return s


def _sympy_equal(a: str, b: str) -> bool:
    ea, eb = _latex_to_expr(a), _latex_to_expr(b)
    if ea is None or eb is None:
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

        transformations = standard_transformations + (implicit_multiplication_application,)
        diff = parse_expr(ea, transformations=transformations) - parse_expr(eb, transformations=transformations)
        return bool(sympy.simplify(diff) == 0)
    except Exception:  # unparsable model output is simply "not equal"
        return False


def is_equiv(prediction: str | None, reference: str | None) -> bool:
    """Whether two final answers denote the same value (see module doc for the ladder of checks)."""
    if prediction is None or reference is None:
        return False
    a, b = normalize_answer(prediction), normalize_answer(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return na == nb
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) > 1 and len(pa) == len(pb):
        if (a[0], a[-1]) != (b[0], b[-1]):  # (1,2) is not [1,2]
            return False
        pa[0], pb[0], pa[-1], pb[-1] = (
            pa[0].lstrip("([{"),
            pb[0].lstrip("([{"),
            pa[-1].rstrip(")]}"),
            pb[-1].rstrip(")]}"),
        )
        return all(is_equiv(x, y) for x, y in zip(pa, pb))
    return _sympy_equal(a, b)
