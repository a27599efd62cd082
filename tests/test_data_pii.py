"""PII scrubbing: a corpus with planted PII of every kind is scrubbed with zero misses, and a clean
control text full of look-alikes (dates, verses, prices, versions, ISBNs) passes unchanged."""

from __future__ import annotations

from collections import Counter

import pytest

from lmstack.data.clean import CleanDoc, StageStats
from lmstack.data.pii import PII_TYPES, PIIConfig, ScrubPII, iban_valid, luhn_valid, scrub_pii

PLANTED = {
    "email": ["jane.doe@example.org", "j_smith+news@mail.co.uk", "ADMIN@Sub-Domain.Example.IO", "a.b-c@d.museum"],
    "phone": ["+1 (555) 123-4567", "+44 20 7946 0958", "+49 30 901820", "+33 1 23 45 67 89", "0044 20 7946 0958",
              "(555) 123-4567", "555-123-4567", "020 7946 0958", "+91 98765 43210", "+81-3-1234-5678",
              "06 12 34 56 78", "+61 2 9374 4000", "+1.555.123.4567", "555.123.4567", "+44 (0)20 7946 0958"],
    "ipv4": ["192.168.1.1", "8.8.8.8", "10.0.0.254", "172.16.254.3"],
    "ipv6": ["2001:db8:85a3::8a2e:370:7334", "fe80::1ff:fe23:4567:890a", "2001:0db8:0000:0000:0000:ff00:0042:8329",
             "::ffff:192.0.2.128", "2001:db8::1"],
    "credit_card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011111111111117",
                    "4012888888881881", "3530 1113 3330 0000", "2223 0031 2200 3222"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR14 2004 1010 0505 0001 3M02 606",
             "NL91ABNA0417164300", "CH93 0076 2011 6238 5295 7"],
    "ssn": ["123-45-6789", "078-05-1120", "219 09 9999"],
    "secret": ["AKIAIOSFODNN7EXAMPLE", "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
               "sk-proj-abc123DEF456ghi789JKL012mno", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
               "AIzaSyA1234567890abcdefghijklmnopqrstuv", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
               "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
               "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu3aumjZ2r4y\n"
               "-----END RSA PRIVATE KEY-----"],
}
ASSIGNED_SECRETS = ["api_key = 'a1b2c3d4e5f6g7h8i9j0'", "PASSWORD: Tr0ub4dor3xyzzyplugh", 'token="9f8e7d6c5b4a39281706"']

TEMPLATES = ["Contact: {}. Thanks", "{}", "Reach me at {} tomorrow", "(see {})", "x={},y"]

CONTROL = """In 1611 the King James Version was printed; John 3:16 and Genesis 1:1-3 are quoted often.
The war lasted from 1914-1918. On 01-02-2003 at 12:30:45 we paid $4.99 (or 3.5%) for 2 apples.
Python 3.11.7 was released; see pp. 123-145 and ISBN 978-0-14-143951-8. Slice it as x[::2] or a[1:2:3].
Chapter 12, verse 3. The ratio was 16:9 and the score 21-17. Version 1.2.3 shipped 10,000 copies at 0.25 each.
He was born 12.03.1856 and died 4/5/1901 in room 101; flight 370 left at 2024-06-30T12:00:00Z.
Order no. 2024-0042, invoice 88-1234, serial 12345678, temperature -40 C, coordinates 51.5074, -0.1278.
The token count was 2048 and the secret of the story is that the key to it all was love.
Pi is 3.14159265358979; e is 2.718281828. Dial tones at 350 and 440 Hz. The year 1984; 2001: A Space Odyssey."""


def test_planted_pii_of_every_kind_is_scrubbed_with_zero_misses():
    assert set(PLANTED) == set(PII_TYPES)
    planted = Counter()
    docs = []
    for kind, values in PLANTED.items():
        for i, value in enumerate(values):
            docs.append((kind, value, TEMPLATES[i % len(TEMPLATES)].format(value)))
            planted[kind] += 1
    for value in ASSIGNED_SECRETS:
        docs.append(("secret", value.split("=")[-1].split(":")[-1].strip(" '\""), f"config: {value}\n"))
        planted["secret"] += 1
    found = Counter()
    misses = []
    for kind, value, text in docs:
        out, counts = scrub_pii(text)
        found.update(counts)
        if value in out or counts.get(kind, 0) != 1 or sum(counts.values()) != 1:
            misses.append((kind, value, out, dict(counts)))
    assert not misses, misses
    assert found == planted


def test_placeholders_are_typed_and_context_survives():
    text = "Mail jane@example.org, call +44 20 7946 0958, card 4111 1111 1111 1111, host 10.0.0.1 or 2001:db8::1."
    out, counts = scrub_pii(text)
    assert out == "Mail <EMAIL>, call <PHONE>, card <CREDIT_CARD>, host <IP_ADDRESS> or <IP_ADDRESS>."
    assert counts == Counter(email=1, phone=1, credit_card=1, ipv4=1, ipv6=1)
    out, _ = scrub_pii("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY1")
    assert out == "aws_secret_access_key = <SECRET>"  # the key name stays, the value goes


def test_clean_control_text_passes_unchanged():
    out, counts = scrub_pii(CONTROL)
    assert counts == Counter()
    assert out == CONTROL


def test_validators_reject_near_misses():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")
    assert not iban_valid("XX82WEST12345698765432")  # unknown country
    for near_miss in ["4111 1111 1111 1112", "GB82 WEST 1234 5698 7654 33", "000-12-3456", "666-12-3456",
                      "999.999.999.999", "12:30:45"]:
        out, counts = scrub_pii(f"value {near_miss} here")
        assert counts == Counter(), (near_miss, out)


@pytest.mark.parametrize("kinds", [["email"], ["phone", "ssn"]])
def test_stage_respects_configured_kinds_and_counts(kinds):
    docs = [CleanDoc("1", "mail jane@example.org or 555-123-4567, ssn 123-45-6789", "s"), CleanDoc("2", CONTROL, "s")]
    stats = StageStats("pii")
    out = ScrubPII(PIIConfig(types=kinds))(docs, stats)
    assert len(out) == 2 and out[1].text == CONTROL
    assert set(k for k in stats.counters if k != "docs_changed") == set(kinds)
    assert stats.counters["docs_changed"] == 1
