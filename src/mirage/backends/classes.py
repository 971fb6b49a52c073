"""The built-in data sets' class names, and forgiving matching of prompts to them ('a bag', '7', 'seven').
The small models take a class name as their prompt; the classifiers that judge them read the same names."""
from __future__ import annotations

import re

from mirage.errors import UsageError, quoted

CLASS_NAMES: dict[str, list[str]] = {
    "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "digits": [str(i) for i in range(10)],
}
CLASS_NAMES["mnist"] = CLASS_NAMES["digits"]


def canonical(name: str) -> str:
    """'mnist' is another name for 'digits'."""
    if name not in CLASS_NAMES:
        raise UsageError(f"unknown data set {name!r}: use fashion, digits or mnist")
    return "digits" if name == "mnist" else name


# ---- class names ------------------------------------------------------------------------------------
_FILLER = {"a", "an", "the", "of", "photo", "picture", "image", "drawing", "sketch", "digit", "number",
           "handwritten", "hand", "written", "some", "one"}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_ALIASES = {
    "fashion": {"T-shirt/top": ["tshirt", "tee", "tee shirt"], "Trouser": ["pants", "jeans"],
                "Pullover": ["sweater", "jumper"], "Coat": ["jacket"], "Ankle boot": ["boot"],
                "Sneaker": ["trainer"]},
    "digits": {str(i): [w] for i, w in enumerate(_NUMBER_WORDS)},
}


def _words(text: str, keep: set[str] = frozenset()) -> tuple[str, ...]:
    """Lower-case words without punctuation, filler or a plural 's': 'Ankle boots' -> ('ankle', 'boot')."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return tuple(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
                 for w in words if w not in _FILLER or w in keep)


def _alias_table(name: str) -> list[tuple[tuple[str, ...], int]]:
    """(words of an alias, class index), every class under its full name, its '/' parts and its aliases."""
    table = []
    keep = set(_NUMBER_WORDS)  # 'one' is filler in 'one bag' but the digit in 'one'
    for k, cls in enumerate(CLASS_NAMES[name]):
        for alias in [cls, *cls.split("/"), *_ALIASES[name].get(cls, [])]:
            table.append((_words(alias, keep if name == "digits" else set()), k))
    return table


def match_class(name: str, prompt: str) -> int | None:
    """The class index a prompt names ('T-shirt/top', 't-shirt', 'a bag', '7', 'seven'); '' -> None (the null
    condition). An exact name wins; else the longest class name that appears in the prompt as whole words."""
    name = canonical(name)
    if not prompt.strip():
        return None
    keep = set(_NUMBER_WORDS) if name == "digits" else set()
    query = _words(prompt, keep)
    table = _alias_table(name)
    for words, k in table:
        if words == query or "".join(words) == "".join(query):
            return k
    best = None
    for words, k in table:
        n = len(words)
        if any(query[i:i + n] == words for i in range(len(query) - n + 1)):
            if best is None or len("".join(words)) > len("".join(best[0])):
                best = (words, k)
    if best is None:
        known = ", ".join(CLASS_NAMES[name])
        raise UsageError(f"unknown class {quoted(prompt)} for {name}: use one of {known} (or \"\" for none)")
    return best[1]
