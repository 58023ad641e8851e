"""Governance: PII/secret scrubbing, the policy read from the environment, the tool allowlist
and the scrubbing of flujo's own log records."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flujo import governance
from flujo.exceptions import ConfigurationError, ToolNotAllowedError
from flujo.governance import (
    ENV_PHONE_REGION,
    ENV_PII_SCRUB,
    ENV_PII_STRONG,
    ENV_TOOL_ALLOWLIST,
    LOG_WITHHELD,
    REDACTED_CARD,
    REDACTED_EMAIL,
    REDACTED_IBAN,
    REDACTED_IP,
    REDACTED_PHONE,
    REDACTED_SECRET,
    REDACTED_SSN,
    GovernancePolicy,
    Scrubber,
    current_policy,
    install_log_scrubbing,
    is_secret_name,
)

PLAIN = Scrubber()
STRONG = Scrubber(strong=True)

# Made-up secrets of the right shapes (none of them is real).
OPENAI_KEY = "sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8"
ANTHROPIC_KEY = "sk-ant-api03-" + "Qr9St8Uv7Wx6Yz5Ab4Cd3Ef2"
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB_KEY = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnop"
SLACK_KEY = "xoxb-" + "123456789012-abcdefghijKL"
GOOGLE_KEY = "AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
STRIPE_KEY = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n"
    "-----END RSA PRIVATE KEY-----"
)
HIGH_ENTROPY = "q7Xv2LpR9sKdW4mZtB8nYc3HfJ6gUe1A"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to ana.lopez+news@mail.example.co.uk today", f"write to {REDACTED_EMAIL} today"),
        ("<BOB@EXAMPLE.ORG>", f"<{REDACTED_EMAIL}>"),
        ("a@b.co and c@d.io.", f"{REDACTED_EMAIL} and {REDACTED_EMAIL}."),
    ],
)
def test_emails_are_scrubbed(text: str, expected: str) -> None:
    assert PLAIN.scrub_text(text) == expected


@pytest.mark.parametrize("text", ["a@b", "user@localhost", "@handle", "x@y.z", "50 @ 3 each"])
def test_email_like_strings_without_a_domain_are_kept(text: str) -> None:
    assert PLAIN.scrub_text(text) == text


@pytest.mark.parametrize(
    "phone",
    [
        "+1 415 555 2671",
        "+14155552671",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "+44 20 7946 0958",
    ],
)
def test_phone_numbers_are_scrubbed(phone: str) -> None:
    assert PLAIN.scrub_text(f"call me at {phone} tomorrow") == (
        f"call me at {REDACTED_PHONE} tomorrow"
    )


def test_phone_region_reads_national_numbers() -> None:
    uk = Scrubber(phone_region="GB")
    assert uk.scrub_text("ring 020 7946 0958") == f"ring {REDACTED_PHONE}"
    assert PLAIN.scrub_text("ring 020 7946 0958") == "ring 020 7946 0958"


def test_unknown_phone_region_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="XX"):
        Scrubber(phone_region="XX")


@pytest.mark.parametrize(
    "text",
    [
        "the year 2024 was long",
        "order #12345678 shipped",
        "order id 98765432, ref 2024-01-15",
        "at 2024-01-15T12:30:00Z",
        "version 1.2.3",
        "pi is 3.14159265",
    ],
)
def test_ordinary_numbers_are_kept(text: str) -> None:
    assert PLAIN.scrub_text(text) == text
    assert STRONG.scrub_text(text) == text


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555 5555 5555 4444",
        "3782 822463 10005",  # Amex, 15 digits
        "6011111111111117",
    ],
)
def test_luhn_valid_cards_are_scrubbed(card: str) -> None:
    assert PLAIN.scrub_text(f"paid with {card}.") == f"paid with {REDACTED_CARD}."


@pytest.mark.parametrize(
    "number",
    ["4111111111111112", "1234 5678 9012 3456", "1234-5678-9012-3457", "12345678901234567890123"],
)
def test_luhn_invalid_or_too_long_numbers_are_kept(number: str) -> None:
    text = f"number {number} here"
    assert PLAIN.scrub_text(text) == text


def test_card_next_to_other_numbers() -> None:
    assert PLAIN.scrub_text("4111 1111 1111 1111 12 items") == f"{REDACTED_CARD} 12 items"
    assert PLAIN.scrub_text("two: 4111111111111111 5555555555554444") == (
        f"two: {REDACTED_CARD} {REDACTED_CARD}"
    )


@pytest.mark.parametrize(
    "key",
    [
        OPENAI_KEY,
        ANTHROPIC_KEY,
        AWS_KEY,
        GITHUB_KEY,
        GITHUB_PAT,
        SLACK_KEY,
        GOOGLE_KEY,
        STRIPE_KEY,
        STRIPE_RESTRICTED,
        JWT,
    ],
)
def test_well_known_key_formats_are_scrubbed(key: str) -> None:
    assert PLAIN.scrub_text(f"use {key} please") == f"use {REDACTED_SECRET} please"


def test_pem_private_key_block_is_scrubbed() -> None:
    assert PLAIN.scrub_text(f"key:\n{PEM}\ndone") == f"key:\n{REDACTED_SECRET}\ndone"
    # A truncated block is scrubbed to the end of the text.
    assert PLAIN.scrub_text("x -----BEGIN PRIVATE KEY-----\nMIIEv") == f"x {REDACTED_SECRET}"


def test_certificates_are_not_private_keys() -> None:
    text = "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----"
    assert PLAIN.scrub_text(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bearer abc123def456ghi", f"Bearer {REDACTED_SECRET}"),
        ("auth bearer AbCdEfGhIjKlMn!", f"auth bearer {REDACTED_SECRET}!"),
        ("the bearer instrument.", "the bearer instrument."),
        ("bearer of bad news", "bearer of bad news"),
    ],
)
def test_bearer_tokens(text: str, expected: str) -> None:
    assert PLAIN.scrub_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2 next", f"password={REDACTED_SECRET} next"),
        ("PASSWORD: 'hunter 2' next", f"PASSWORD: '{REDACTED_SECRET}' next"),
        ('{"db_password": "s3\\"cret", "n": 1}', f'{{"db_password": "{REDACTED_SECRET}", "n": 1}}'),
        ("api-key=abc; x=1", f"api-key={REDACTED_SECRET}; x=1"),
        ("X-Api-Key: abc", f"X-Api-Key: {REDACTED_SECRET}"),
        ("?apiKey=abc&max_tokens=100", f"?apiKey={REDACTED_SECRET}&max_tokens=100"),
        ("access_token=abc&token_count=5", f"access_token={REDACTED_SECRET}&token_count=5"),
        ("client_secret = xyz", f"client_secret = {REDACTED_SECRET}"),
        ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: Basic {REDACTED_SECRET}"),
        ("Authorization: Token abc", f"Authorization: Token {REDACTED_SECRET}"),
        ("{'private_key': 'abc'}", f"{{'private_key': '{REDACTED_SECRET}'}}"),
        ('log {\\"secret\\": \\"a b\\"}', f'log {{\\"secret\\": \\"{REDACTED_SECRET}\\"}}'),
        ("name=password=abc", f"name=password={REDACTED_SECRET}"),
    ],
)
def test_secret_named_pairs_in_text_lose_their_value(text: str, expected: str) -> None:
    assert PLAIN.scrub_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "tokens: 500",
        "max_tokens=100",
        "key: value",
        "monkey=banana",
        "token == None",
        "password=",
        "the password is long",
        "PWD=/home/me",
    ],
)
def test_non_secret_pairs_are_kept(text: str) -> None:
    assert PLAIN.scrub_text(text) == text


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "Password",
        "db_password",
        "passwd",
        "passphrase",
        "secret",
        "client_secret",
        "clientSecret",
        "token",
        "access_token",
        "accessToken",
        "refresh-token",
        "api_key",
        "apikey",
        "apiKey",
        "API-KEY",
        "x-api-key",
        "access_key",
        "aws_access_key_id",
        "private_key",
        "secret_key",
        "authorization",
        "Proxy-Authorization",
        "credentials",
    ],
)
def test_secret_like_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "tokens",
        "max_tokens",
        "input_tokens",
        "token_count",
        "key",
        "sort_key",
        "monkey",
        "author",
        "secretary",
        "pwd",
        "",
        "password\n",
        "password" + "x" * 80,
    ],
)
def test_names_that_are_not_secret_like(name: str) -> None:
    assert not is_secret_name(name)


# --- strong mode ---------------------------------------------------------------------------

STRONG_CASES = [
    ("from 192.168.10.200 ok", f"from {REDACTED_IP} ok"),
    ("v6 2001:db8::8a2e:370:7334 and ::1.", f"v6 {REDACTED_IP} and {REDACTED_IP}."),
    ("IBAN DE89 3704 0044 0532 0130 00 is mine", f"IBAN {REDACTED_IBAN} is mine"),
    ("iban GB82WEST12345698765432", f"iban {REDACTED_IBAN}"),
    ("ssn 123-45-6789.", f"ssn {REDACTED_SSN}."),
    (f"blob {HIGH_ENTROPY} end", f"blob {REDACTED_SECRET} end"),
]


@pytest.mark.parametrize(("text", "expected"), STRONG_CASES)
def test_strong_mode_detectors(text: str, expected: str) -> None:
    assert STRONG.scrub_text(text) == expected


@pytest.mark.parametrize(("text", "expected"), STRONG_CASES)
def test_strong_items_are_kept_without_strong(text: str, expected: str) -> None:
    assert expected != text
    assert PLAIN.scrub_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4.5",
        "time 12:30:45 and std::vector and MAC 00:1A:2B:3C:4D:5E",
        "IBAN DE89 3704 0044 0532 0130 01 (bad check digits)",
        "ssn 000-12-3456 666-12-3456 912-12-3456 123-00-4567 123-45-0000",
        # hex ids (run ids, sha256 cache keys) and UUIDs are not secrets
        "run 9c53cf01c98a4e998a2f9f98c3a4e60c",
        "uuid 9c53cf01-c98a-4e99-8a2f-9f98c3a4e60c",
        "sha " + "ab12" * 16,
        # long identifiers: letters only, or low entropy
        "a_very_long_identifier_without_digits",
        "my_variable_name_version2_final",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1",
    ],
)
def test_strong_mode_keeps_lookalikes(text: str) -> None:
    assert STRONG.scrub_text(text) == text


# --- structured data -----------------------------------------------------------------------


def test_scrub_value_walks_nested_data_without_mutating_it() -> None:
    data: dict[str, Any] = {
        "user": {"email": "ana@example.com", "phones": ["+1 415 555 2671", "n/a"]},
        "history": [{"note": "paid 4111 1111 1111 1111"}, ("tuple", "x@y.org")],
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "none": None,
    }
    before = copy.deepcopy(data)
    out = PLAIN.scrub_value(data)
    assert data == before
    assert out == {
        "user": {"email": REDACTED_EMAIL, "phones": [REDACTED_PHONE, "n/a"]},
        "history": [{"note": f"paid {REDACTED_CARD}"}, ("tuple", REDACTED_EMAIL)],
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "none": None,
    }
    assert out is not data
    assert out["user"] is not data["user"]


def test_values_under_secret_keys_are_replaced() -> None:
    data = {
        "password": "hunter2",
        "apiKey": 123456,
        "client_secret": 1.5,
        "refresh_token": "",
        "token": None,
        "secret": False,
        "credentials": {"user": "bob", "note": "x@y.org"},
        "max_tokens": 100,
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }
    assert PLAIN.scrub_value(data) == {
        "password": REDACTED_SECRET,
        "apiKey": REDACTED_SECRET,
        "client_secret": REDACTED_SECRET,
        "refresh_token": REDACTED_SECRET,
        "token": None,
        "secret": False,
        "credentials": {"user": "bob", "note": REDACTED_EMAIL},
        "max_tokens": 100,
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }


def test_dict_keys_are_scrubbed_but_stay_unique() -> None:
    assert PLAIN.scrub_value({"ana@example.com": 1}) == {REDACTED_EMAIL: 1}
    # The second key would collide with the first once scrubbed, so it is kept.
    assert PLAIN.scrub_value({"ana@example.com": 1, "bob@example.com": 2}) == {
        REDACTED_EMAIL: 1,
        "bob@example.com": 2,
    }
    # A key that already is the token wins; the other key is kept.
    assert PLAIN.scrub_value({"ana@example.com": 1, REDACTED_EMAIL: 2}) == {
        "ana@example.com": 1,
        REDACTED_EMAIL: 2,
    }


def test_scrub_json_nested_document() -> None:
    doc = {
        "run_id": "9c53cf01c98a4e998a2f9f98c3a4e60c",
        "pipeline_context": {
            "scratchpad": {"contact": "Reach ana@example.com or (415) 555-2671", "n": 12345678},
            "api_key": 987654321,
        },
        "step_history": [{"output": {"card": "4111 1111 1111 1111"}, "latency_s": 0.25}],
    }
    out = orjson.loads(PLAIN.scrub_json(orjson.dumps(doc)))
    assert out == {
        "run_id": "9c53cf01c98a4e998a2f9f98c3a4e60c",
        "pipeline_context": {
            "scratchpad": {"contact": f"Reach {REDACTED_EMAIL} or {REDACTED_PHONE}", "n": 12345678},
            "api_key": REDACTED_SECRET,
        },
        "step_history": [{"output": {"card": REDACTED_CARD}, "latency_s": 0.25}],
    }


def test_scrub_json_fast_path_returns_the_same_object() -> None:
    clean = orjson.dumps(
        {"text": "lorem ipsum dolor sit amet " * 2000, "n": 5, "items": [1, 2.5, True, None]}
    )
    assert PLAIN.scrub_json(clean) is clean
    assert STRONG.scrub_json(clean) is clean


def test_scrub_json_with_nothing_to_replace_returns_the_same_object() -> None:
    # Digits and a keyword make the pre-check look closer, but nothing is replaced.
    data = orjson.dumps({"order": "12345678", "max_tokens": 100, "at": "2024-01-15"})
    assert PLAIN.scrub_json(data) is data


# --- properties ----------------------------------------------------------------------------

FRAGMENTS = [
    "ana@example.com",
    "a@b",
    "+1 415 555 2671",
    "(415) 555-2671",
    "+44 20 7946 0958",
    "4111 1111 1111 1111",
    "4111111111111112",
    "2024",
    "12345678",
    OPENAI_KEY,
    AWS_KEY,
    GITHUB_KEY,
    JWT,
    PEM,
    "Bearer abc123def456",
    "password=hunter2",
    "api_key: 'x y'",
    '"token": "abc',
    "Authorization: Basic ",
    "192.168.0.1",
    "2001:db8::1",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
    HIGH_ENTROPY,
    REDACTED_EMAIL,
    REDACTED_SECRET,
    "=",
    ":",
    " ",
    "\n",
    '"',
    "'",
    "\\",
    "-",
    "@",
]

texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=6).map("".join),
)
keys = st.one_of(
    texts,
    st.sampled_from(["password", "apiKey", "max_tokens", "token", "x", "ana@example.com"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.parametrize("scrubber", [PLAIN, STRONG], ids=["plain", "strong"])
@PROPERTY_SETTINGS
@given(text=texts)
def test_scrub_text_is_idempotent(scrubber: Scrubber, text: str) -> None:
    once = scrubber.scrub_text(text)
    assert scrubber.scrub_text(once) == once


@pytest.mark.parametrize("scrubber", [PLAIN, STRONG], ids=["plain", "strong"])
@PROPERTY_SETTINGS
@given(value=json_values)
def test_scrub_json_is_valid_idempotent_and_agrees_with_scrub_value(
    scrubber: Scrubber, value: Any
) -> None:
    data = orjson.dumps(value)
    once = scrubber.scrub_json(data)
    parsed = orjson.loads(once)
    # The fast path (bytes unchanged) and the slow path agree with scrub_value.
    assert parsed == scrubber.scrub_value(value)
    twice = scrubber.scrub_json(once)
    assert twice == once
    assert scrubber.scrub_value(parsed) == parsed


# --- policy --------------------------------------------------------------------------------


def test_default_policy_is_off() -> None:
    policy = GovernancePolicy.from_env({})
    assert policy == GovernancePolicy()
    assert policy.scrubber is None
    assert policy.tool_allowlist is None
    policy.check_tool("anything")


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " 1 "])
def test_true_values(value: str) -> None:
    policy = GovernancePolicy.from_env({ENV_PII_SCRUB: value})
    assert policy.pii_scrub
    assert not policy.pii_strong
    assert isinstance(policy.scrubber, Scrubber)
    assert not policy.scrubber.strong


@pytest.mark.parametrize("value", ["0", "false", "No", "OFF", ""])
def test_false_values(value: str) -> None:
    assert not GovernancePolicy.from_env({ENV_PII_SCRUB: value}).pii_scrub


@pytest.mark.parametrize("variable", [ENV_PII_SCRUB, ENV_PII_STRONG])
def test_bad_boolean_names_the_variable_and_value(variable: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        GovernancePolicy.from_env({variable: "maybe"})
    assert variable in str(info.value)
    assert "maybe" in str(info.value)


def test_strong_implies_scrub() -> None:
    policy = GovernancePolicy.from_env({ENV_PII_STRONG: "1"})
    assert policy.pii_scrub
    assert policy.pii_strong
    assert policy.scrubber is not None
    assert policy.scrubber.strong
    assert GovernancePolicy(pii_strong=True).pii_scrub


def test_scrubber_is_shared_by_equal_policies() -> None:
    one = GovernancePolicy(pii_scrub=True)
    assert one.scrubber is one.scrubber
    assert one.scrubber is GovernancePolicy(pii_scrub=True).scrubber


def test_tool_allowlist_parsing() -> None:
    policy = GovernancePolicy.from_env({ENV_TOOL_ALLOWLIST: " search , fetch,,"})
    assert policy.tool_allowlist == frozenset({"search", "fetch"})
    assert GovernancePolicy.from_env({ENV_TOOL_ALLOWLIST: ""}).tool_allowlist is None
    assert GovernancePolicy.from_env({ENV_TOOL_ALLOWLIST: "  "}).tool_allowlist is None


def test_phone_region_from_env() -> None:
    assert GovernancePolicy.from_env({ENV_PHONE_REGION: "gb"}).phone_region == "GB"
    assert GovernancePolicy.from_env({ENV_PHONE_REGION: ""}).phone_region == "US"
    policy = GovernancePolicy.from_env({ENV_PII_SCRUB: "1", ENV_PHONE_REGION: "GB"})
    assert policy.scrubber is not None
    assert policy.scrubber.phone_region == "GB"
    with pytest.raises(ConfigurationError) as info:
        GovernancePolicy.from_env({ENV_PII_SCRUB: "1", ENV_PHONE_REGION: "Narnia"})
    assert ENV_PHONE_REGION in str(info.value)
    assert "Narnia" in str(info.value)
    with pytest.raises(ConfigurationError):
        GovernancePolicy(pii_scrub=True, phone_region="ZZ")
    # The region is used (and checked) only by the scrubber.
    assert GovernancePolicy.from_env({ENV_PHONE_REGION: "Narnia"}).scrubber is None


def test_check_tool() -> None:
    policy = GovernancePolicy(tool_allowlist=frozenset({"search", "fetch"}))
    policy.check_tool("search")
    with pytest.raises(ToolNotAllowedError) as info:
        policy.check_tool("shell")
    err = info.value
    assert err.tool == "shell"
    assert err.allowed == frozenset({"search", "fetch"})
    message = str(err)
    assert "'shell'" in message
    assert "fetch, search" in message
    assert ENV_TOOL_ALLOWLIST in message


def test_empty_allowlist_allows_nothing() -> None:
    with pytest.raises(ToolNotAllowedError, match="no tools"):
        GovernancePolicy(tool_allowlist=frozenset()).check_tool("search")


def test_current_policy_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, ENV_PHONE_REGION):
        monkeypatch.delenv(name, raising=False)
    assert current_policy() == GovernancePolicy()
    assert current_policy() is current_policy()
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    monkeypatch.setenv(ENV_TOOL_ALLOWLIST, "a,b")
    assert current_policy() == GovernancePolicy(
        pii_scrub=True, tool_allowlist=frozenset({"a", "b"})
    )
    monkeypatch.setenv(ENV_PII_SCRUB, "bogus")
    with pytest.raises(ConfigurationError):
        current_policy()
    monkeypatch.delenv(ENV_PII_SCRUB)
    assert current_policy().scrubber is None


# --- log scrubbing -------------------------------------------------------------------------


@pytest.fixture
def log_scrubbing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Install log scrubbing for one test, then restore the original record factory."""
    original = logging.getLogRecordFactory()
    monkeypatch.setattr(governance, "_log_scrubbing_installed", False)
    for name in (ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, ENV_PHONE_REGION):
        monkeypatch.delenv(name, raising=False)
    install_log_scrubbing()
    try:
        yield
    finally:
        logging.setLogRecordFactory(original)


@pytest.mark.usefixtures("log_scrubbing")
def test_flujo_log_records_are_scrubbed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    with caplog.at_level(logging.INFO):
        logging.getLogger("flujo.test").info("user %s paid with %s", "ana@example.com", "x")
        logging.getLogger("flujo").info("key %s", OPENAI_KEY)
        logging.getLogger("other").info("user %s", "ana@example.com")
        logging.getLogger("flujoish").info("user %s", "ana@example.com")
    flujo_test, flujo_root, other, flujoish = caplog.records
    assert flujo_test.getMessage() == f"user {REDACTED_EMAIL} paid with x"
    assert flujo_test.args is None
    assert flujo_root.getMessage() == f"key {REDACTED_SECRET}"
    assert other.getMessage() == "user ana@example.com"
    assert other.args == ("ana@example.com",)
    assert flujoish.getMessage() == "user ana@example.com"
    assert "ana@example.com" not in caplog.text.split("\n")[0]


@pytest.mark.usefixtures("log_scrubbing")
def test_flujo_log_tracebacks_are_scrubbed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    with caplog.at_level(logging.INFO):
        try:
            raise ValueError("no account for ana@example.com")
        except ValueError:
            logging.getLogger("flujo.test").exception("lookup failed")
        try:
            raise ValueError("no account for bob@example.com")
        except ValueError:
            logging.getLogger("other").exception("lookup failed")
    flujo_record, other_record = caplog.records
    assert flujo_record.exc_text is not None
    assert "ValueError: no account for [REDACTED_EMAIL]" in flujo_record.exc_text
    assert "Traceback" in flujo_record.exc_text
    assert "ana@example.com" not in caplog.text
    assert f"no account for {REDACTED_EMAIL}" in caplog.text
    # other loggers keep their traceback as it is
    assert "no account for bob@example.com" in caplog.text
    assert other_record.exc_info is not None


@pytest.mark.usefixtures("log_scrubbing")
def test_log_scrubbing_is_harmless_while_scrubbing_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("flujo.test").info("user %s", "ana@example.com")
    (record,) = caplog.records
    assert record.msg == "user %s"
    assert record.args == ("ana@example.com",)
    assert record.getMessage() == "user ana@example.com"


@pytest.mark.usefixtures("log_scrubbing")
def test_install_is_idempotent() -> None:
    factory = logging.getLogRecordFactory()
    install_log_scrubbing()
    install_log_scrubbing()
    assert logging.getLogRecordFactory() is factory


@pytest.mark.usefixtures("log_scrubbing")
def test_scrubbing_failure_withholds_the_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    with caplog.at_level(logging.INFO):
        # %d with a string: the message cannot be formatted, so it cannot be scrubbed.
        logging.getLogger("flujo.test").info("count %d", "ana@example.com")
        monkeypatch.setenv(ENV_PII_SCRUB, "not-a-bool")
        logging.getLogger("flujo.test").info("user %s", "ana@example.com")
    assert [r.getMessage() for r in caplog.records] == [LOG_WITHHELD, LOG_WITHHELD]
    assert "ana@example.com" not in caplog.text
