"""The private-address guard's decision function. No connection is made by any test here: addresses
are only parsed and classified; the one host name ("localhost") resolves from /etc/hosts."""

from __future__ import annotations

import pickle

import pytest

from pipelines import netguard
from pipelines.netguard import GuardPolicy, is_blocked

LOOPBACK_ONLY = ["127.0.0.1/32"]


@pytest.mark.parametrize("address, why", [
    ("169.254.169.254", "metadata"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("::1", "loopback"),
    ("[::1]", "loopback"),
    ("http://[::1]:8080/x.jpg", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "metadata"),
    ("ff02::1", "multicast"),
    ("::ffff:10.0.0.1", "10.0.0.1) is private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a00:1", "10.0.0.1) is private"),  # NAT64 of 10.0.0.1
    ("2002:a00:1::", "10.0.0.1) is private"),  # 6to4 of 10.0.0.1
])
def test_non_public_addresses_are_blocked(address, why):
    verdict = is_blocked(address)
    assert verdict, f"{address} should be blocked"
    assert verdict.reason.startswith(netguard.BLOCKED_REASON)
    assert why in verdict.reason


@pytest.mark.parametrize("url", [
    "http://2130706433/",  # decimal
    "http://0x7f000001/",  # hex
    "http://017700000001/",  # octal
    "http://127.1/",  # short dotted form
    "http://0x7f.0.0.1/",  # mixed per-part bases
    "http://0177.0.0.1/",
    "http://127.0.0.1./",  # trailing dot
    "http://0x7F000001:8080/a.jpg",
])
def test_other_spellings_of_loopback_are_normalised_and_blocked(url):
    verdict = is_blocked(url)
    assert verdict and "127.0.0.1 is loopback" in verdict.reason, verdict
    assert verdict.addresses == ("127.0.0.1",)


def test_other_spellings_of_private_and_metadata_addresses():
    assert "10.0.0.1 is private" in is_blocked("http://167772161/").reason  # 10.0.0.1
    assert "169.254.169.254" in is_blocked("http://0xa9fea9fe/").reason
    assert "169.254.169.254" in is_blocked("http://0251.0376.0251.0376/").reason


def test_host_name_resolving_to_loopback_is_blocked():
    verdict = is_blocked("localhost")
    assert verdict and "loopback" in verdict.reason
    assert "127.0.0.1" in verdict.addresses
    assert is_blocked("http://localhost:9999/image.jpg")


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "http://8.8.8.8/x.jpg", "2606:4700:4700::1111",
                                     "http://[2001:4860:4860::8888]/", "::ffff:8.8.8.8", "http://134744072/"])
def test_public_addresses_are_allowed(address):
    verdict = is_blocked(address)
    assert not verdict, verdict
    assert "public" in verdict.reason


def test_allowed_networks_exempt_exactly_the_named_network():
    assert not is_blocked("127.0.0.1", LOOPBACK_ONLY)
    assert not is_blocked("http://2130706433/", LOOPBACK_ONLY)  # same address, other spelling
    assert not is_blocked("::ffff:127.0.0.1", LOOPBACK_ONLY)
    assert not is_blocked("localhost", ["127.0.0.1/32", "::1/128"])
    assert is_blocked("127.0.0.2", LOOPBACK_ONLY)  # the rest of loopback stays blocked
    assert is_blocked("::1", LOOPBACK_ONLY)
    assert is_blocked("169.254.169.254", LOOPBACK_ONLY)
    assert not is_blocked("10.1.2.3", ["10.0.0.0/8"])


def test_denied_networks_win_over_public_and_allowed():
    assert "denied_networks" in is_blocked("8.8.8.8", denied_networks=["8.8.8.0/24"]).reason
    assert is_blocked("127.0.0.1", ["127.0.0.0/8"], ["127.0.0.1/32"])
    assert not is_blocked("8.8.4.4", denied_networks=["8.8.8.0/24"])


def test_invalid_hosts_are_blocked_not_guessed():
    assert "invalid host" in is_blocked("http://256.0.0.1/").reason
    assert "invalid host" in is_blocked("http://0x1ffffffff/").reason
    with pytest.raises(ValueError, match=r"allowed_networks\[0\]: 'not-a-net'"):
        is_blocked("8.8.8.8", ["not-a-net"])


def test_ipv4_literal_parser_follows_resolver_rules():
    parse = netguard.parse_ipv4_literal
    assert str(parse("2130706433")) == "127.0.0.1"
    assert str(parse("0x7f000001")) == "127.0.0.1"
    assert str(parse("017700000001")) == "127.0.0.1"
    assert str(parse("10.1")) == "10.0.0.1"
    assert str(parse("10.1.258")) == "10.1.1.2"
    assert parse("example.com") is None
    assert parse("cafe.be") is None
    assert parse("1.2.3.4.5") is None
    with pytest.raises(ValueError):
        parse("1.2.3.256")


def test_policy_is_picklable_for_workers():
    policy = GuardPolicy(("127.0.0.1/32",), ("8.8.8.0/24",), 1234, 5.0)
    clone = pickle.loads(pickle.dumps(policy))
    assert clone == policy
    assert not clone.check("127.0.0.1") and clone.check("127.0.0.2") and clone.check("8.8.8.8")
