"""Personal-information scrubbing: find e-mail addresses, phone numbers, IP addresses, payment cards,
IBANs, US social-security numbers and API-key-like secrets, and replace each with a typed placeholder.

    >>> scrub_pii("mail jane.doe@example.org or call +44 20 7946 0958")
    ('mail <EMAIL> or call <PHONE>', Counter({'email': 1, 'phone': 1}))

Each kind is a candidate regex plus, where a regex alone over-matches, a validator:

* credit cards: 13-19 digits (spaces or dashes allowed), a known issuer prefix, and the Luhn checksum;
* IBANs: country code, check digits, a length allowed for that country, and the ISO 13616 mod-97 check;
* IPv6: anything with colons is handed to :mod:`ipaddress`, and it must have at least three groups so
  Python slices (``x[::2]``) and clock times (``12:30:45``) are left alone;
* phone numbers: international (``+CC ...`` or ``00CC ...``), North American (``(555) 123-4567``,
  ``555-123-4567``) and trunk-prefixed national numbers (``020 7946 0958``), 7-15 digits in total, never a
  date such as ``01-02-2003`` or a year range such as ``1914-1918``;
* secrets: well-known token shapes (AWS, GitHub, Slack, Google, Stripe, ``sk-`` keys, JWTs, PEM private
  keys) and ``api_key = ...`` / ``password: ...`` assignments whose value mixes letters and digits.

Patterns run from the most specific to the least, on the text as it is after the previous replacement,
so a card number is never also reported as a phone number. Caveats: names and street addresses are
not detected (that needs a named-entity model); obfuscated addresses (``jane at example dot org``) are
not either. The test corpus in tests/test_data_pii.py plants every kind in several formats and checks zero
misses, and checks that a control text full of dates, verse numbers, prices and versions is unchanged.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from lmstack.config import ConfigError
from lmstack.data.clean import Doc, Stage, StageStats

PII_TYPES = ("secret", "email", "iban", "credit_card", "ssn", "ipv6", "ipv4", "phone")
PLACEHOLDERS = {"secret": "<SECRET>", "email": "<EMAIL>", "iban": "<IBAN>", "credit_card": "<CREDIT_CARD>",
                "ssn": "<SSN>", "ipv6": "<IP_ADDRESS>", "ipv4": "<IP_ADDRESS>", "phone": "<PHONE>"}


@dataclass
class PIIConfig:
    """Which kinds of personal information to replace (all by default)."""

    enabled: bool = True
    types: list[str] = field(default_factory=lambda: list(PII_TYPES))

    def validate(self) -> None:
        unknown = sorted(set(self.types) - set(PII_TYPES))
        if unknown:
            raise ConfigError(f"pii.types has unknown kind(s) {unknown}; valid kinds: {', '.join(PII_TYPES)}")


# ----------------------------------------------------------------------------- validators


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[68])|6(?:011|5|4[4-9])|35)")


def _valid_card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX.match(digits)) and luhn_valid(digits)


# ISO 13616 lengths for the countries that issue IBANs (registry release 2024)
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_valid(candidate: str) -> bool:
    iban = re.sub(r"\s", "", candidate).upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _valid_ipv6(match: re.Match) -> bool:
    text = match.group(0)
    groups = [g for g in text.split(":") if g]
    if len(groups) + (1 if groups and "." in groups[-1] else 0) < 3:  # an embedded IPv4 tail is two groups
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_DATE_LIKE = re.compile(r"^\(?\d{1,4}\)?[-./ ]\d{1,2}[-./ ]\d{1,4}$")


def _valid_phone(match: re.Match) -> bool:
    text = match.group(0)
    digits = re.sub(r"\D", "", text)
    if not 7 <= len(digits) <= 15:
        return False
    if not text.startswith(("+", "00", "(")) and _DATE_LIKE.match(text):
        return False
    return True


def _mixed_value(match: re.Match) -> bool:
    value = match.group("value")
    return bool(re.search(r"\d", value)) and bool(re.search(r"[A-Za-z]", value))


# ----------------------------------------------------------------------------- patterns

_SECRET_TOKENS = [
    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----",
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b",  # Slack
    r"\bAIza[0-9A-Za-z_\-]{35}\b",  # Google API keys
    r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b",  # Stripe
    r"\bsk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{20,}\b",  # OpenAI / Anthropic style keys
    r"\bhf_[A-Za-z0-9]{30,}\b",  # model-hub user tokens
    r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JSON web tokens
]
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b[\w\-]*?(?:api[_-]?key|apikey|secret(?:[_-]?(?:access[_-]?)?key)?|access[_-]?(?:key|token)|"
    r"auth[_-]?token|token|"
    r"password|passwd|client[_-]?secret)\b[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9_\-+/=.]{16,})")

_EMAIL = re.compile(r"(?<![\w.+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w\-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"(?<![\d\-])\d(?:[ \-]?\d){12,18}(?![\d\-])")
_SSN = re.compile(r"(?<![\d\-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d\-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?"
                   r"(?![\w:]|\.\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+|00)[1-9]\d{0,2}[ .\-]?(?:\(0?\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,4}"  # international
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.\-]\d{3}[.\-]\d{4}"  # 555-123-4567
    r"|0\d{1,4}[ \-]\d{3,4}[ \-]?\d{3,4}"  # 020 7946 0958 (trunk 0)
    r"|0\d(?:[ .]\d\d){4}"  # 06 12 34 56 78 (French style)
    r")(?![\w\-])")

_Rule = tuple[str, re.Pattern, Callable[[re.Match], bool] | None]
_RULES: list[_Rule] = [
    ("secret", re.compile("|".join(_SECRET_TOKENS)), None),
    ("secret", _SECRET_ASSIGNMENT, _mixed_value),
    ("email", _EMAIL, None),
    ("iban", _IBAN, lambda m: iban_valid(m.group(0))),
    ("credit_card", _CARD, _valid_card),
    ("ssn", _SSN, None),
    ("ipv6", _IPV6, _valid_ipv6),
    ("ipv4", _IPV4, None),
    ("phone", _PHONE, _valid_phone),
]
# Cheap guards, one search each: a rule cannot match a text in which its hint does not occur. Every
# number-based kind needs 7+ characters of digits and separators; IPv6 needs hex groups and colons.
_NUMBERISH = re.compile(r"\d[\d \-.()/+]{5,}\d")
_HINTS: dict[str, re.Pattern] = {
    "email": re.compile("@"),
    "ipv6": re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:|::[0-9A-Fa-f]"),
    "secret": re.compile(r"AKIA|ASIA|AGPA|AIDA|AROA|gh[pousr]_|github_pat_|xox|AIza|_live_|_test_|sk-|hf_|eyJ|"
                         r"PRIVATE KEY|(?i:key|secret|token|passw|auth)"),
}


def scrub_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, Counter]:
    """Replace personal information with typed placeholders; returns (new text, count per kind)."""
    counts: Counter = Counter()
    numberish = _NUMBERISH.search(text) is not None
    hinted: dict[str, bool] = {}
    for kind, pattern, valid in _RULES:
        if kind not in types:
            continue
        hint = _HINTS.get(kind)
        if hint is not None:
            if kind not in hinted:
                hinted[kind] = hint.search(text) is not None
            if not hinted[kind]:
                continue
        elif not numberish:
            continue
        placeholder = PLACEHOLDERS[kind]

        def replace(m: re.Match, kind=kind, valid=valid, placeholder=placeholder) -> str:
            if valid is not None and not valid(m):
                return m.group(0)
            counts[kind] += 1
            if m.re is _SECRET_ASSIGNMENT:  # keep the key name, replace only the value
                start = m.start("value") - m.start()
                return m.group(0)[:start] + placeholder
            return placeholder

        text = pattern.sub(replace, text)
    return text, counts


class ScrubPII(Stage):
    """Replace PII in every document; counts per kind go to ``stats.counters``. Removes nothing."""

    name = "pii"

    def __init__(self, cfg: PIIConfig):
        self.types = tuple(cfg.types)

    def process(self, docs: list[Doc], stats: StageStats) -> list[Doc]:
        import dataclasses

        out = []
        for doc in docs:
            text, counts = scrub_pii(doc.text, self.types)
            if counts:
                stats.counters.update(counts)
                stats.counters["docs_changed"] += 1
                doc = dataclasses.replace(doc, text=text)
            out.append(doc)
        return out
