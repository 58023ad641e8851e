"""Governance by environment: PII and secret scrubbing, and a tool allowlist.

Everything here is driven by four environment variables, read through :func:`current_policy`:

``FLUJO_GOVERNANCE_PII_SCRUB``
    ``1`` scrubs e-mail addresses, phone numbers, payment card numbers and API keys or secrets
    out of everything flujo persists (state, step history, error text) and out of flujo's own
    log records.
``FLUJO_GOVERNANCE_PII_STRONG``
    ``1`` adds IP addresses, IBANs, US social security numbers and high-entropy tokens (and
    implies ``FLUJO_GOVERNANCE_PII_SCRUB``).
``FLUJO_GOVERNANCE_TOOL_ALLOWLIST``
    ``tool_a,tool_b`` lets agents call only the listed tools.
``FLUJO_GOVERNANCE_PHONE_REGION``
    the region phone numbers without a ``+country`` prefix are read in (default ``US``).

The scrubber replaces what it finds with fixed tokens (``[REDACTED_EMAIL]``, ...), so scrubbing
is idempotent and the result of :meth:`Scrubber.scrub_json` is always valid JSON::

    >>> Scrubber().scrub_text("mail ana@example.com, password=hunter2")
    'mail [REDACTED_EMAIL], password=[REDACTED_SECRET]'
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

from flujo.exceptions import ConfigurationError, ToolNotAllowedError

if TYPE_CHECKING:
    from flujo.state.backends.base import Checkpoint

__all__ = [
    "ENTROPY_MIN_LENGTH",
    "ENTROPY_THRESHOLD",
    "ENV_PHONE_REGION",
    "ENV_PII_SCRUB",
    "ENV_PII_STRONG",
    "ENV_TOOL_ALLOWLIST",
    "LOG_WITHHELD",
    "REDACTED_CARD",
    "REDACTED_EMAIL",
    "REDACTED_IBAN",
    "REDACTED_IP",
    "REDACTED_PHONE",
    "REDACTED_SECRET",
    "REDACTED_SSN",
    "GovernancePolicy",
    "Scrubber",
    "active_scrubber",
    "current_policy",
    "install_log_scrubbing",
    "is_secret_name",
    "scrub_checkpoint",
]

ENV_PII_SCRUB = "FLUJO_GOVERNANCE_PII_SCRUB"
ENV_PII_STRONG = "FLUJO_GOVERNANCE_PII_STRONG"
ENV_TOOL_ALLOWLIST = "FLUJO_GOVERNANCE_TOOL_ALLOWLIST"
ENV_PHONE_REGION = "FLUJO_GOVERNANCE_PHONE_REGION"
_ENV_VARS = (ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, ENV_PHONE_REGION)

REDACTED_EMAIL = "[REDACTED_EMAIL]"
REDACTED_PHONE = "[REDACTED_PHONE]"
REDACTED_CARD = "[REDACTED_CARD]"
REDACTED_SECRET = "[REDACTED_SECRET]"  # noqa: S105 - the replacement token, not a secret
REDACTED_IP = "[REDACTED_IP]"
REDACTED_IBAN = "[REDACTED_IBAN]"
REDACTED_SSN = "[REDACTED_SSN]"
_TOKENS = frozenset(
    {
        REDACTED_EMAIL,
        REDACTED_PHONE,
        REDACTED_CARD,
        REDACTED_SECRET,
        REDACTED_IP,
        REDACTED_IBAN,
        REDACTED_SSN,
    }
)

LOG_WITHHELD = "[log message withheld: scrubbing failed]"

#: Strong mode: a run of token characters at least this long is a candidate secret ...
ENTROPY_MIN_LENGTH = 24
#: ... and is replaced when its Shannon entropy, in bits per character, reaches this value.
#: Random base64 or alphanumeric strings of 24 characters score about 4.25 on average (and 32
#: characters about 4.5); hexadecimal strings can never exceed 4.0, so hashes and flujo's own
#: run ids and cache keys are not taken for secrets; English identifiers score well below.
ENTROPY_THRESHOLD = 4.0

_MAX_PASSES = 8

# --------------------------------------------------------------------------------------------
# Secret-like names (dict keys and ``name=value`` pairs in text)
# --------------------------------------------------------------------------------------------

_KEYWORDS = r"passw|passphrase|secret|token|key|authoriz|credential"
_NAME_SHAPE = re.compile(r"[A-Za-z0-9_.\- ]{1,64}")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NAME_SPLIT = re.compile(r"[_.\- ]+")
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "private", "secret", "client", "signing", "encryption", "master", "auth"}
)
_KEY_WORDS = frozenset(
    {"apikey", "accesskey", "privatekey", "secretkey", "signingkey", "encryptionkey", "masterkey"}
)
_SECRET_PARTS = frozenset({"authorization", "credential", "credentials", "secrets"})


def is_secret_name(name: str) -> bool:
    """Whether a dict key or a ``name=value`` name is secret-like (its value gets redacted).

    Names are compared case-insensitively, with ``-``, ``.``, spaces and camelCase read as
    ``_``. Secret-like: anything containing ``password``, ``passwd`` or ``passphrase``; a part
    ending in ``secret`` (``client_secret``); a last part ending in ``token`` (``token``,
    ``access_token``, but not ``max_tokens`` or ``token_count``); ``api_key``/``apikey`` and
    ``access``/``private``/``secret``/``client``/``signing``/``encryption``/``master``/``auth``
    followed by ``key``; ``authorization``; ``credential(s)``; ``secrets``. Names longer than 64
    characters or with other characters are never secret-like.

    >>> [is_secret_name(n) for n in ("apiKey", "X-Api-Key", "max_tokens", "password_hash")]
    [True, True, False, True]
    """
    if _NAME_SHAPE.fullmatch(name) is None:
        return False
    parts = [p for p in _NAME_SPLIT.split(_CAMEL.sub("_", name).lower()) if p]
    if not parts:
        return False
    if parts[-1].endswith("token"):
        return True
    for i, part in enumerate(parts):
        if "password" in part or "passwd" in part or "passphrase" in part:
            return True
        if part.endswith("secret") or part in _SECRET_PARTS or part in _KEY_WORDS:
            return True
        if part == "key" and i > 0 and parts[i - 1] in _KEY_QUALIFIERS:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Pre-checks. Regular expressions are slow on large texts, so before any detector runs, a few
# cheap checks (substring searches, mostly) over the UTF-8 bytes tell which detectors could
# find anything. Each check is a superset of what its detectors find; the JSON variant also
# allows for JSON escapes, so a document whose bytes pass no check has no string (or key) that
# scrubbing would change.
# --------------------------------------------------------------------------------------------

_F_EMAIL = 1
_F_DIGITS = 2  # cards, phone numbers, SSNs
_F_PEM = 4
_F_JWT = 8
_F_VENDOR = 16
_F_BEARER = 32
_F_PAIRS = 64  # secret-like names (pairs in text, dict keys in JSON)
_F_IPV4 = 128
_F_IPV6 = 256
_F_IBAN = 512
_F_LONG = 1024

_DIGIT_BYTES = tuple(bytes([c]) for c in b"0123456789")
# Key prefixes, grouped by a byte they contain that ordinary text rarely has (a one-byte
# search is much faster than a substring search).
_DASH_LITERALS = (b"sk-", b"xox")
_UNDERSCORE_LITERALS = (b"k_live_", b"k_test_")
_A_LITERALS = (b"AKIA", b"ASIA", b"AIza")
_KEYWORD_LITERALS = (b"pass", b"secret", b"token", b"key", b"authoriz", b"credential")
_GITHUB_GATE = re.compile(rb"gh[pousr]_|github_pat_")
_IPV4_GATE = re.compile(rb"\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]")
_IPV6_GATE = re.compile(rb":[0-9A-Fa-f]*:")
_IBAN_TABLE = bytes(
    65 if 65 <= i <= 90 else 57 if 48 <= i <= 57 else 32 for i in range(256)
)  # "A" for A-Z, "9" for 0-9, " " for the rest
_IBAN_SHAPE = b"AA99"
_TOKEN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
_TOKEN_TABLE = bytes(97 if i in _TOKEN_CHARS else 32 for i in range(256))  # "a" or " "
_TOKEN_RUN = b"a" * ENTROPY_MIN_LENGTH
# A phone number is replaced only when its text has 7 digits with at most 3 other characters
# between two of them: that keeps the pre-check exact (3 characters are at most 12 bytes of
# UTF-8, or 18 bytes of JSON with escapes).
_PHONE_SHAPE = re.compile(r"[0-9](?:[^0-9A-Za-z]{0,3}[0-9]){6,}")


class _Probe:
    __slots__ = ("_digit_run", "_pair", "_strong")

    def __init__(self, *, in_json: bool, strong: bool) -> None:
        gap = b"{0,18}" if in_json else b"{0,12}"
        quote = rb"\\*[\"']?" if in_json else rb"(?:\\?[\"'])?"
        space = rb"(?:[ \t]|\\t)*" if in_json else rb"[ \t]*"
        self._digit_run = re.compile(rb"[0-9](?:[^0-9A-Za-z]" + gap + rb"[0-9]){6,}")
        self._pair = re.compile(
            rb"(?:passw|passphrase|secret|token|key|authoriz|credential)[a-z0-9_.\- ]{0,64}"
            + quote
            + space
            + rb"[:=]"
        )
        self._strong = strong

    def features(self, data: bytes) -> int:
        found = 0
        if b"@" in data:
            found |= _F_EMAIL
        digits = sum(data.count(d) for d in _DIGIT_BYTES)
        if digits >= 7 and self._digit_run.search(data) is not None:
            found |= _F_DIGITS
        if b"-" in data:
            if b"-----BEGIN" in data:
                found |= _F_PEM
            if any(v in data for v in _DASH_LITERALS):
                found |= _F_VENDOR
        if b"_" in data and (
            any(v in data for v in _UNDERSCORE_LITERALS) or _GITHUB_GATE.search(data) is not None
        ):
            found |= _F_VENDOR
        if b"A" in data and any(v in data for v in _A_LITERALS):
            found |= _F_VENDOR
        if b"J" in data and b"eyJ" in data:
            found |= _F_JWT
        lowered = data.lower()
        if b"bearer" in lowered:
            found |= _F_BEARER
        if any(k in lowered for k in _KEYWORD_LITERALS) and self._pair.search(lowered):
            found |= _F_PAIRS
        if self._strong:
            if b"." in data and _IPV4_GATE.search(data) is not None:
                found |= _F_IPV4
            if _IPV6_GATE.search(data) is not None:
                found |= _F_IPV6
            if digits >= 2 and _IBAN_SHAPE in data.translate(_IBAN_TABLE):
                found |= _F_IBAN
            if _TOKEN_RUN in data.translate(_TOKEN_TABLE):
                found |= _F_LONG
        return found


_TEXT_PROBES = {s: _Probe(in_json=False, strong=s) for s in (False, True)}
_JSON_PROBES = {s: _Probe(in_json=True, strong=s) for s in (False, True)}

# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------

_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_JWT = re.compile(
    r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*"
)
_VENDOR_KEY = re.compile(
    r"(?<![A-Za-z0-9_\-])(?:"
    r"sk-[A-Za-z0-9_\-]{20,}"  # OpenAI, Anthropic (sk-proj-..., sk-ant-...)
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,}"  # GitHub fine-grained tokens
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack
    r"|AIza[A-Za-z0-9_\-]{35}(?![A-Za-z0-9_\-])"  # Google API key
    r")"
)
_BEARER = re.compile(
    r"(?<![A-Za-z0-9_\-])(?i:bearer)[ \t]+(?P<tok>[A-Za-z0-9\-._~+/]*[A-Za-z0-9]=*)"
)
_BEARER_MIN = 8
_PAIR = re.compile(
    r"(?<![A-Za-z0-9_.\-])"
    rf"(?=[A-Za-z0-9_.\-]{{0,64}}?(?i:{_KEYWORDS}))"
    r"(?P<name>[A-Za-z0-9_.\-]{1,64})"
    r"(?:\\?[\"'])?[ \t]*[:=][ \t]*"
    r"(?:(?i:bearer|basic|token|digest)[ \t]+)?+"
    r"(?P<value>"
    r"\\\"(?:(?!\\\")[^\n])*(?:\\\")?"  # \"escaped quotes\"
    r"|\"(?:\\.|[^\"\\\n])*\"?"  # "double quotes"
    r"|'[^'\n]*'?"  # 'single quotes'
    r"|[^\s\"',;&=][^\s\"',;&]*"  # unquoted
    r")"
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,63}(?![A-Za-z0-9])"
)
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ \-]?[0-9]){12,}(?![0-9])")
_CARD_GROUPS = re.compile(r"[0-9]+")
_SSN = re.compile(r"(?<![0-9\-])([0-9]{3})-([0-9]{2})-([0-9]{4})(?!-?[0-9])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![0-9.]){_OCTET}(?:\.{_OCTET}){{3}}(?![0-9]|\.[0-9])")
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z:.])(?=[0-9A-Fa-f:.]*[0-9A-Fa-f])"
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{0,4})"
    r"(?![0-9A-Za-z:]|\.[0-9])"
)
_LONG_TOKEN = re.compile(
    rf"(?<![A-Za-z0-9+/=_\-])[A-Za-z0-9+/=_\-]{{{ENTROPY_MIN_LENGTH},}}(?![A-Za-z0-9+/=_\-])"
)
_HEX_ID = re.compile(r"[0-9A-Fa-f\-]+")
_HAS_LETTER = re.compile(r"[A-Za-z]")
_HAS_DIGIT = re.compile(r"[0-9]")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_window_ok(groups: list[str]) -> bool:
    digits = "".join(groups)
    if not 13 <= len(digits) <= 19:
        return False
    if len(groups) > 1 and any(not 3 <= len(g) <= 8 for g in groups):
        return False
    return _luhn_ok(digits)


def _scrub_card_run(match: re.Match[str]) -> str:
    run = match.group(0)
    spans = [(m.start(), m.end()) for m in _CARD_GROUPS.finditer(run)]
    groups = [run[a:b] for a, b in spans]
    out: list[str] = []
    last = 0
    i = 0
    while i < len(groups):
        found = -1
        total = 0
        for j in range(i, len(groups)):
            total += len(groups[j])
            if total > 19:
                break
            if _card_window_ok(groups[i : j + 1]):
                found = j
        if found < 0:
            i += 1
            continue
        out.append(run[last : spans[i][0]])
        out.append(REDACTED_CARD)
        last = spans[found][1]
        i = found + 1
    if not out:
        return run
    out.append(run[last:])
    return "".join(out)


def _iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _scrub_iban(match: re.Match[str]) -> str:
    candidate = match.group(0)
    # Words after an IBAN may look like more of it ("... 0130 00 IS"): try shorter prefixes.
    spaces = [i for i, ch in enumerate(candidate) if ch == " "]
    cuts = [len(candidate), *reversed(spaces)]
    for cut in cuts:
        if _iban_ok(candidate[:cut].replace(" ", "")):
            return REDACTED_IBAN + candidate[cut:]
    return candidate


def _scrub_ssn(match: re.Match[str]) -> str:
    area, group, serial = match.group(1), match.group(2), match.group(3)
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return match.group(0)
    return REDACTED_SSN


def _scrub_ipv6(match: re.Match[str]) -> str:
    candidate = match.group(0)
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return candidate
    return REDACTED_IP


def _shannon(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _scrub_long_token(match: re.Match[str]) -> str:
    token = match.group(0)
    if (
        _HEX_ID.fullmatch(token) is None
        and _HAS_LETTER.search(token) is not None
        and _HAS_DIGIT.search(token) is not None
        and _shannon(token) >= ENTROPY_THRESHOLD
    ):
        return REDACTED_SECRET
    return token


def _scrub_bearer(match: re.Match[str]) -> str:
    tok = match.group("tok")
    # A token, not a word ("the bearer instrument"): a digit, a symbol or a capital inside.
    looks_random = any(c.isdigit() or c in "-._~+/" for c in tok) or any(
        c.isupper() for c in tok[1:]
    )
    if len(tok) < _BEARER_MIN or not looks_random:
        return match.group(0)
    start = match.start("tok") - match.start()
    return match.group(0)[:start] + REDACTED_SECRET


def _split_quotes(value: str) -> tuple[str, str, str]:
    for quote in ('\\"', '"', "'"):
        if value.startswith(quote):
            inner = value[len(quote) :]
            if len(inner) >= len(quote) and inner.endswith(quote):
                return quote, inner[: -len(quote)], quote
            return quote, inner, ""
    return "", value, ""


def _scrub_pairs(text: str) -> str:
    out: list[str] = []
    last = 0
    pos = 0
    while True:
        match = _PAIR.search(text, pos)
        if match is None:
            break
        if not is_secret_name(match.group("name")):
            pos = match.end("name")
            continue
        opening, inner, closing = _split_quotes(match.group("value"))
        pos = match.end()
        if not inner or inner in _TOKENS:
            continue
        out.append(text[last : match.start("value")])
        out.append(opening + REDACTED_SECRET + closing)
        last = pos
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Scrubber
# --------------------------------------------------------------------------------------------


def _phonenumbers() -> Any:
    """The phonenumbers library, loaded on first use (it takes a while to import)."""
    import phonenumbers  # noqa: PLC0415

    return phonenumbers


def _check_region(region: str, given: str) -> None:
    if region not in _phonenumbers().SUPPORTED_REGIONS:
        raise ConfigurationError(
            f"{ENV_PHONE_REGION}: unknown phone region {given!r}; use a two-letter region "
            "code such as US, GB or DE"
        )


class Scrubber:
    """Finds PII and secrets in text and JSON-like data and replaces them with tokens.

    Always detected (the replacement in brackets):

    * PEM private key blocks, JSON Web Tokens, well-known API key formats (OpenAI/Anthropic
      ``sk-``, Stripe ``sk_live_``/``rk_live_``, AWS ``AKIA``, GitHub ``ghp_``/``gho_``/
      ``ghs_``/``github_pat_``, Slack ``xox?-``, Google ``AIza``) and ``Bearer`` tokens
      [REDACTED_SECRET];
    * the value of a ``name=value`` or ``name: value`` pair whose name is secret-like
      (:func:`is_secret_name`) [REDACTED_SECRET];
    * e-mail addresses [REDACTED_EMAIL];
    * Luhn-valid payment card numbers of 13 to 19 digits, possibly grouped by spaces or
      dashes [REDACTED_CARD];
    * phone numbers that ``phonenumbers`` finds valid, read in ``phone_region`` unless they
      start with ``+`` [REDACTED_PHONE].

    With ``strong=True`` also IBANs (mod-97 checked) [REDACTED_IBAN], US social security
    numbers ``AAA-GG-SSSS`` [REDACTED_SSN], IPv4 and IPv6 addresses [REDACTED_IP] and
    high-entropy tokens (see :data:`ENTROPY_THRESHOLD`) [REDACTED_SECRET].

    Scrubbing is idempotent: ``scrub_text(scrub_text(x)) == scrub_text(x)``.

    >>> s = Scrubber()
    >>> s.scrub_text("call (415) 555-2671 or pay with 4111 1111 1111 1111")
    'call [REDACTED_PHONE] or pay with [REDACTED_CARD]'
    >>> s.scrub_value({"user": "ana@example.com", "api_key": 12345})
    {'user': '[REDACTED_EMAIL]', 'api_key': '[REDACTED_SECRET]'}
    """

    __slots__ = ("_json_probe", "_phone_region", "_strong", "_text_probe")

    def __init__(self, *, strong: bool = False, phone_region: str = "US") -> None:
        region = phone_region.strip().upper()
        if region not in _phonenumbers().SUPPORTED_REGIONS:
            raise ConfigurationError(
                f"unknown phone region {phone_region!r}: use a two-letter region code "
                "such as US, GB or DE"
            )
        self._strong = bool(strong)
        self._phone_region = region
        self._text_probe = _TEXT_PROBES[self._strong]
        self._json_probe = _JSON_PROBES[self._strong]

    @property
    def strong(self) -> bool:
        """Whether the strong detectors (IP, IBAN, SSN, high-entropy tokens) are on."""
        return self._strong

    @property
    def phone_region(self) -> str:
        """The region phone numbers without a ``+`` country prefix are read in."""
        return self._phone_region

    def __repr__(self) -> str:
        return f"Scrubber(strong={self._strong}, phone_region={self._phone_region!r})"

    def scrub_text(self, text: str) -> str:
        """Return ``text`` with every detected item replaced by its token.

        >>> Scrubber().scrub_text("token: abc123, Authorization: Bearer eyJhbGc.x")
        'token: [REDACTED_SECRET], Authorization: Bearer [REDACTED_SECRET]'
        >>> Scrubber(strong=True).scrub_text("from 10.0.0.7")
        'from [REDACTED_IP]'
        """
        current = text
        # Replacing one item can change the surroundings of another (a phone number next to
        # a replaced token, say), so repeat until nothing changes: this makes scrubbing
        # idempotent. Every pass that changes the text replaces at least one character that
        # is not part of a token, so this ends quickly (usually after two passes).
        for _ in range(_MAX_PASSES):
            scrubbed = self._one_pass(current)
            if scrubbed == current:
                break
            current = scrubbed
        return current

    def _one_pass(self, text: str) -> str:
        found = self._text_probe.features(text.encode("utf-8", "surrogatepass"))
        if not found:
            return text
        if found & _F_PEM:
            text = _PEM.sub(REDACTED_SECRET, text)
        if found & _F_JWT:
            text = _JWT.sub(REDACTED_SECRET, text)
        if found & _F_VENDOR:
            text = _VENDOR_KEY.sub(REDACTED_SECRET, text)
        if found & _F_BEARER:
            text = _BEARER.sub(_scrub_bearer, text)
        if found & _F_PAIRS:
            text = _scrub_pairs(text)
        if found & _F_EMAIL:
            text = _EMAIL.sub(REDACTED_EMAIL, text)
        if found & _F_IBAN:
            text = _IBAN.sub(_scrub_iban, text)
        if self._strong and found & _F_DIGITS:
            text = _SSN.sub(_scrub_ssn, text)
        if found & _F_DIGITS:
            text = _CARD.sub(_scrub_card_run, text)
        if found & _F_IPV6:
            text = _IPV6.sub(_scrub_ipv6, text)
        if found & _F_IPV4:
            text = _IPV4.sub(REDACTED_IP, text)
        if found & _F_DIGITS:
            text = self._scrub_phones(text)
        if found & _F_LONG:
            text = _LONG_TOKEN.sub(_scrub_long_token, text)
        return text

    def _scrub_phones(self, text: str) -> str:
        # The matcher gives up after max_tries candidates (65535 by default); a text cannot
        # hold more candidates than characters, so allow that many.
        phonenumbers = _phonenumbers()
        matcher = phonenumbers.PhoneNumberMatcher(
            text,
            self._phone_region,
            leniency=phonenumbers.Leniency.VALID,
            max_tries=max(65535, len(text)),
        )
        spans = [(m.start, m.end) for m in matcher if _PHONE_SHAPE.search(m.raw_string)]
        if not spans:
            return text
        out: list[str] = []
        last = 0
        for start, end in spans:
            out.append(text[last:start])
            out.append(REDACTED_PHONE)
            last = end
        out.append(text[last:])
        return "".join(out)

    def scrub_value(self, value: Any) -> Any:
        """Return a scrubbed copy of JSON-like data (dicts, lists, tuples, strings, scalars).

        Every string is scrubbed with :meth:`scrub_text`, dict keys included (a key whose
        scrubbed form would collide with another key is kept as it is). The value of a
        secret-like key (:func:`is_secret_name`) becomes ``[REDACTED_SECRET]`` when it is a
        string or a number. The input is never modified.

        >>> Scrubber().scrub_value({"password": 1234, "notes": ["x@y.org"], "ok": True})
        {'password': '[REDACTED_SECRET]', 'notes': ['[REDACTED_EMAIL]'], 'ok': True}
        """
        return self._walk(value)[0]

    def _walk(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            scrubbed = self.scrub_text(value)
            return scrubbed, scrubbed != value
        if isinstance(value, dict):
            return self._walk_dict(value)
        if isinstance(value, list | tuple):
            items: list[Any] = []
            changed = False
            for item in value:
                new, item_changed = self._walk(item)
                items.append(new)
                changed = changed or item_changed
            return (items if isinstance(value, list) else tuple(items)), changed
        return value, False

    def _walk_dict(self, value: dict[Any, Any]) -> tuple[dict[Any, Any], bool]:
        result: dict[Any, Any] = {}
        changed = False
        for key, item in value.items():
            new_key = key
            if isinstance(key, str):
                scrubbed_key = self.scrub_text(key)
                if scrubbed_key != key and scrubbed_key not in value and scrubbed_key not in result:
                    new_key = scrubbed_key
                    changed = True
                if (
                    isinstance(item, str | int | float)
                    and not isinstance(item, bool)
                    and is_secret_name(key)
                ):
                    result[new_key] = REDACTED_SECRET
                    changed = changed or item != REDACTED_SECRET
                    continue
            new_item, item_changed = self._walk(item)
            result[new_key] = new_item
            changed = changed or item_changed
        return result, changed

    def scrub_json(self, data: bytes) -> bytes:
        """Scrub a UTF-8 JSON document (as produced by ``orjson.dumps``); return JSON bytes.

        When a quick check finds nothing that could be scrubbed, or scrubbing changes nothing,
        ``data`` itself is returned. Numbers stay numbers unless they sit under a secret-like
        key. ``data`` must be valid JSON (else ``orjson.JSONDecodeError``, a ``ValueError``).

        >>> Scrubber().scrub_json(b'{"to":"ana@example.com","n":3}')
        b'{"to":"[REDACTED_EMAIL]","n":3}'
        """
        if not self._json_probe.features(data):
            return data
        scrubbed, changed = self._walk(orjson.loads(data))
        if not changed:
            return data
        return orjson.dumps(scrubbed)


@lru_cache(maxsize=16)
def _scrubber_for(strong: bool, phone_region: str) -> Scrubber:
    return Scrubber(strong=strong, phone_region=phone_region)


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _parse_bool(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off"
    )


@dataclass(frozen=True)
class GovernancePolicy:
    """What governance applies: PII scrubbing and which tools agents may call.

    ``pii_strong`` implies ``pii_scrub``. ``tool_allowlist=None`` means no restriction.

    >>> policy = GovernancePolicy.from_env({"FLUJO_GOVERNANCE_PII_SCRUB": "1"})
    >>> policy.scrubber.scrub_text("ana@example.com")
    '[REDACTED_EMAIL]'
    >>> GovernancePolicy(tool_allowlist=frozenset({"search"})).check_tool("search")
    """

    pii_scrub: bool = False
    pii_strong: bool = False
    tool_allowlist: frozenset[str] | None = None
    phone_region: str = "US"

    def __post_init__(self) -> None:
        region = self.phone_region.strip().upper()
        # The region matters only to the scrubber (checked then, loading phonenumbers).
        if self.pii_scrub or self.pii_strong:
            _check_region(region, self.phone_region)
        object.__setattr__(self, "phone_region", region)
        if self.pii_strong and not self.pii_scrub:
            object.__setattr__(self, "pii_scrub", True)
        if self.tool_allowlist is not None and not isinstance(self.tool_allowlist, frozenset):
            object.__setattr__(self, "tool_allowlist", frozenset(self.tool_allowlist))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GovernancePolicy:
        """Read the policy from ``environ`` (default: ``os.environ``).

        Booleans accept ``1/true/yes/on`` and ``0/false/no/off`` or an empty value, in any
        case; anything else, or an unknown phone region, raises
        :class:`~flujo.exceptions.ConfigurationError` naming the variable.

        >>> GovernancePolicy.from_env({"FLUJO_GOVERNANCE_TOOL_ALLOWLIST": " a, b "})
        GovernancePolicy(pii_scrub=False, pii_strong=False, \
tool_allowlist=frozenset({'a', 'b'}), phone_region='US')
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        strong = _parse_bool(env, ENV_PII_STRONG)
        scrub = _parse_bool(env, ENV_PII_SCRUB) or strong
        allowlist: frozenset[str] | None = None
        raw_allow = env.get(ENV_TOOL_ALLOWLIST)
        if raw_allow is not None:
            names = frozenset(n.strip() for n in raw_allow.split(",") if n.strip())
            allowlist = names or None
        region_raw = env.get(ENV_PHONE_REGION)
        region = "US" if region_raw is None or not region_raw.strip() else region_raw.strip()
        if scrub and region.upper() not in _phonenumbers().SUPPORTED_REGIONS:
            raise ConfigurationError(
                f"{ENV_PHONE_REGION}={region_raw!r} is not a phone region phonenumbers "
                "knows: use a two-letter region code such as US, GB or DE"
            )
        return cls(
            pii_scrub=scrub, pii_strong=strong, tool_allowlist=allowlist, phone_region=region
        )

    @property
    def scrubber(self) -> Scrubber | None:
        """The :class:`Scrubber` for this policy, or ``None`` when PII scrubbing is off.

        Scrubbers are shared between equal policies (they hold no state).
        """
        if not self.pii_scrub:
            return None
        return _scrubber_for(self.pii_strong, self.phone_region)

    def check_tool(self, name: str) -> None:
        """Raise :class:`~flujo.exceptions.ToolNotAllowedError` unless ``name`` may be called.

        >>> GovernancePolicy(tool_allowlist=frozenset({"search"})).check_tool("shell")
        Traceback (most recent call last):
        ...
        flujo.exceptions.ToolNotAllowedError: tool 'shell' is not allowed: \
FLUJO_GOVERNANCE_TOOL_ALLOWLIST allows only search
        """
        allowed = self.tool_allowlist
        if allowed is None or name in allowed:
            return
        listed = ", ".join(sorted(allowed)) if allowed else "no tools"
        raise ToolNotAllowedError(
            f"tool {name!r} is not allowed: {ENV_TOOL_ALLOWLIST} allows only {listed}",
            tool=name,
            allowed=allowed,
        )


@lru_cache(maxsize=32)
def _policy_for(values: tuple[str | None, ...]) -> GovernancePolicy:
    return GovernancePolicy.from_env(
        {name: value for name, value in zip(_ENV_VARS, values, strict=True) if value is not None}
    )


def current_policy() -> GovernancePolicy:
    """The policy of the current environment (``os.environ``).

    The variables are read on every call; the policy is cached on their values, so calling
    this often is cheap and a changed variable takes effect at the next call.

    >>> isinstance(current_policy(), GovernancePolicy)
    True
    """
    environ = os.environ
    return _policy_for(tuple(environ.get(name) for name in _ENV_VARS))


# --------------------------------------------------------------------------------------------
# Log scrubbing
# --------------------------------------------------------------------------------------------

_install_lock = threading.Lock()
_log_scrubbing_installed = False


def _is_flujo_logger(name: str) -> bool:
    return name == "flujo" or name.startswith("flujo.")


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        scrubber = current_policy().scrubber
        if scrubber is None:
            return
        message = scrubber.scrub_text(record.getMessage())
        exc_text = None
        if record.exc_info:
            exc_text = scrubber.scrub_text(logging.Formatter().formatException(record.exc_info))
    except Exception:
        record.msg = LOG_WITHHELD
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return
    record.msg = message
    record.args = None
    if exc_text is not None:
        record.exc_text = exc_text


def install_log_scrubbing() -> None:
    """Scrub the records of flujo's loggers (``flujo`` and ``flujo.*``) when PII scrubbing is on.

    Wraps the logging record factory once (calling this again does nothing). Whether a record
    is scrubbed is decided when it is created, from :func:`current_policy`, so installing is
    harmless while scrubbing is off. A scrubbed record has its formatted message in ``msg``
    (``args`` is ``None``) and, with an exception, its scrubbed traceback in ``exc_text``.
    Records of other loggers are left alone. Scrubbing never raises: if it fails, the message
    is replaced by ``[log message withheld: scrubbing failed]``.

    >>> install_log_scrubbing()
    """
    global _log_scrubbing_installed  # noqa: PLW0603 - installed once per process
    with _install_lock:
        if _log_scrubbing_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _is_flujo_logger(record.name):
                _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _log_scrubbing_installed = True


def scrub_checkpoint(checkpoint: Checkpoint, scrubber: Scrubber) -> Checkpoint:
    """``checkpoint`` with every JSON value it writes scrubbed: context fields, step records
    (outputs and error text), the last output, the run's error, its input and metadata."""
    scrub = scrubber.scrub_json
    header = checkpoint.header
    if header is not None:
        header = replace(
            header, initial_input=scrub(header.initial_input), metadata=scrub(header.metadata)
        )
    return replace(
        checkpoint,
        header=header,
        context={name: scrub(value) for name, value in checkpoint.context.items()},
        steps=[scrub(record) for record in checkpoint.steps],
        last_step_output=(
            None if checkpoint.last_step_output is None else scrub(checkpoint.last_step_output)
        ),
        error=None if checkpoint.error is None else scrub(checkpoint.error),
    )


def active_scrubber() -> Scrubber | None:
    """The scrubber of the current environment's policy, or None when scrubbing is off."""
    return current_policy().scrubber
