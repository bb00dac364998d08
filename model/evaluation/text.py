"""Text normalisation for WER/CER: the same function is applied to references and hypotheses.

English (`english`): Unicode NFKC, lower-case, hyphens split words, punctuation dropped
(apostrophes inside words kept: "don't"), "%" read as "percent", and numbers made consistent:
every number, written in digits ("1,250", "3.5", "21st") or in words ("one thousand two hundred
and fifty", "three point five", "twenty first"), is parsed and written back one way, as words
(`numbers="words"`, the default, LibriSpeech's convention) or as digits (`numbers="digits"`);
`numbers="keep"` leaves them as they are. Years said in pairs ("nineteen ninety") are two
numbers here, so "1990" does not match them: a known limit of rule-based normalisers.

Chinese (`chinese`): NFKC (folds full-width letters, digits and the ideographic space to their
half-width forms), lower-case, punctuation and symbols dropped (。，、？！“”《》 and ASCII);
every CJK character becomes a token, runs of Latin letters or digits stay words. CER is computed
on the characters with the spaces removed; WER on these tokens (a mixed error rate).

`auto` picks Chinese when most references contain CJK characters, else English.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Literal

Language = Literal["english", "chinese", "none"]
NumberStyle = Literal["words", "digits", "keep"]
NORMALIZERS = ("auto", "english", "chinese", "none")
NUMBER_STYLES = ("words", "digits", "keep")

# --- numbers ------------------------------------------------------------------------------

UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen")
TEENS += ("eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
SMALL = {word: value for value, word in enumerate(UNITS + TEENS)}
TENS_VALUE = {word: 10 * k for k, word in enumerate(TENS) if word}
ORDINAL_WORDS = {
    "first": "one",
    "second": "two",
    "third": "three",
    "fifth": "five",
    "eighth": "eight",
    "ninth": "nine",
    "twelfth": "twelve",
}


def number_to_words(value: int) -> str:
    """123 -> 'one hundred twenty three' (no 'and'); up to the trillions."""
    if value < 0:
        return "minus " + number_to_words(-value)
    if value < 20:
        return (UNITS + TEENS)[value]
    if value < 100:
        tens, unit = divmod(value, 10)
        return TENS[tens] + (" " + UNITS[unit] if unit else "")
    if value < 1000:
        hundreds, rest = divmod(value, 100)
        return UNITS[hundreds] + " hundred" + (" " + number_to_words(rest) if rest else "")
    for word, scale in sorted(SCALES.items(), key=lambda kv: -kv[1]):
        if value >= scale:
            high, rest = divmod(value, scale)
            return (
                number_to_words(high) + " " + word + (" " + number_to_words(rest) if rest else "")
            )
    raise AssertionError("unreachable")


def ordinal_words(value: int) -> str:
    """21 -> 'twenty first'."""
    words = number_to_words(value).split()
    last = words[-1]
    reverse = {v: k for k, v in ORDINAL_WORDS.items()}
    if last in reverse:
        words[-1] = reverse[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def ordinal_suffix(value: int) -> str:
    if value % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(value % 10, "th")


def _cardinal_of_ordinal(word: str) -> str | None:
    """'twentieth' -> 'twenty', 'first' -> 'one', 'hundredth' -> 'hundred'; else None."""
    if word in ORDINAL_WORDS:
        return ORDINAL_WORDS[word]
    if word.endswith("ieth") and word[:-4] + "y" in TENS_VALUE:
        return word[:-4] + "y"
    if word.endswith("th") and (
        word[:-2] in SMALL or word[:-2] in SCALES or word[:-2] == "hundred"
    ):
        return word[:-2]
    return None


def _parse_words(tokens: Sequence[str], start: int) -> tuple[int, int, bool] | None:
    """Parse number words at tokens[start:] -> (value, end, is_ordinal), or None.

    A small grammar: units after tens ('twenty one'), 'hundred' after 1-99, scales in decreasing
    order, 'and' only between a hundred/scale and a following number word. 'one two' is two
    numbers. The last word may be an ordinal ('twenty first').
    """
    total = current = 0
    last: str | None = None  # unit | teen | tens | hundred | scale
    last_scale = 10**18
    end = start
    ordinal = False
    i = start
    while i < len(tokens):
        word = tokens[i]
        if word == "and" and last in ("hundred", "scale") and i + 1 < len(tokens):
            nxt = tokens[i + 1]
            if nxt in SMALL or nxt in TENS_VALUE or _cardinal_of_ordinal(nxt) in SMALL:
                i += 1
                continue
            break
        cardinal = _cardinal_of_ordinal(word)
        is_ordinal = cardinal is not None and word not in SMALL
        word = cardinal or word
        if word == "zero":
            if last is not None:
                break
            current, last = 0, "unit"
            end, ordinal, i = i + 1, is_ordinal, i + 1
            break  # zero never combines
        if word in SMALL:
            value = SMALL[word]
            kind = "unit" if value < 10 else "teen"
            if not (last in (None, "hundred", "scale") or (last == "tens" and kind == "unit")):
                break
            current += value
            last = kind
        elif word in TENS_VALUE:
            if last not in (None, "hundred", "scale"):
                break
            current += TENS_VALUE[word]
            last = "tens"
        elif word == "hundred":
            if last not in ("unit", "teen", "tens") or current >= 100:
                break
            current *= 100
            last = "hundred"
        elif word in SCALES:
            scale = SCALES[word]
            if last not in ("unit", "teen", "tens", "hundred") or scale >= last_scale:
                break
            total += current * scale
            current, last, last_scale = 0, "scale", scale
        else:
            break
        i += 1
        end, ordinal = i, is_ordinal
        if is_ordinal:
            break  # an ordinal ends the number
    if end == start:
        return None
    return total + current, end, ordinal


NUMBER_TOKEN = re.compile(r"^(\d+(?:\.\d+)?)(st|nd|rd|th)?$")


def _render(value: int | str, ordinal: bool, style: NumberStyle) -> list[str]:
    """A number (an int, or a decimal's digit string like '3.5') written in `style`."""
    if isinstance(value, str):  # a decimal: '3.5'
        whole, _, frac = value.partition(".")
        if style == "digits":
            return [value]
        return [*number_to_words(int(whole)).split(), "point", *(UNITS[int(d)] for d in frac)]
    if style == "digits":
        return [f"{value}{ordinal_suffix(value)}" if ordinal else str(value)]
    return (ordinal_words(value) if ordinal else number_to_words(value)).split()


def normalize_numbers(tokens: list[str], style: NumberStyle) -> list[str]:
    """Numbers in digits or in words -> all in `style` ('words' or 'digits')."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        match = NUMBER_TOKEN.match(token)
        if match:
            digits, suffix = match.groups()
            value: int | str = digits if "." in digits else int(digits)
            out += _render(value, bool(suffix) and isinstance(value, int), style)
            i += 1
            continue
        parsed = _parse_words(tokens, i)
        if parsed is None:
            out.append(token)
            i += 1
            continue
        value, end, ordinal = parsed
        # a decimal: 'three point one four'
        if not ordinal and end + 1 < len(tokens) and tokens[end] == "point":
            k = end + 1
            frac = ""
            while k < len(tokens) and tokens[k] in UNITS:
                frac += str(UNITS.index(tokens[k]))
                k += 1
            if frac:
                out += _render(f"{value}.{frac}", False, style)
                i = k
                continue
        out += _render(value, ordinal, style)
        i = end
    return out


# --- English --------------------------------------------------------------------------------

# digits (with thousands separators and decimals, an optional ordinal suffix) or words (letters
# with inner apostrophes); everything else is punctuation and is dropped
EN_TOKEN = re.compile(
    r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:st|nd|rd|th)?"
    r"|\d+(?:\.\d+)?(?:st|nd|rd|th)?"
    r"|[^\W\d_]+(?:'[^\W\d_]+)*"
)


def normalize_english(text: str, numbers: NumberStyle = "words") -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("’", "'").replace("‘", "'").replace("%", " percent ")
    text = re.sub(r"[-‐‑‒–—_/]", " ", text)
    tokens = [t.replace(",", "") if t[0].isdigit() else t for t in EN_TOKEN.findall(text)]
    if numbers != "keep":
        tokens = normalize_numbers(tokens, numbers)
    return " ".join(tokens)


# --- Chinese --------------------------------------------------------------------------------

CJK = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\u3040-\u30ff\uac00-\ud7af]"
)


def is_cjk(char: str) -> bool:
    return bool(CJK.match(char))


def normalize_chinese(text: str) -> str:
    """Full/half-width folded, punctuation dropped, one token per CJK character."""
    text = unicodedata.normalize("NFKC", text).lower()
    kept = [
        " " if unicodedata.category(c)[0] in "PSZC" else (f" {c} " if is_cjk(c) else c)
        for c in text
    ]
    return " ".join("".join(kept).split())


# --- choosing -------------------------------------------------------------------------------


def detect_language(references: Sequence[str]) -> Language:
    """'chinese' when at least half of the references hold a CJK character, else 'english'."""
    with_cjk = sum(bool(CJK.search(r)) for r in references)
    return "chinese" if references and with_cjk * 2 >= len(references) else "english"


def normalize(text: str, language: Language, numbers: NumberStyle = "words") -> str:
    if language == "english":
        return normalize_english(text, numbers)
    if language == "chinese":
        return normalize_chinese(text)
    return " ".join(text.split())


def simple_normalize(text: str) -> str:
    """Lower-case, punctuation to spaces (keyword matching)."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())
