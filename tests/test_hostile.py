"""Hostile input never harms the node (issue 7, promise 4): property-based tests with hypothesis.

Generated configs, environment values, CNI_ARGS and stdin bytes go through tests/helpers.py's
Arena: ADD then the runtime's DEL inside a node namespace, each answered with a valid result or
exactly one CNI error object (no traceback, no unhandled exception), no file made outside
<dataDir>/<network> (nor in /, /var/lib/cni, /etc/cni, /run/cni), no link, address or masquerade
rule left.  The fixed cases (every key with wrong values, payloads, CNI_NETNS) are in
test_reliability.py.  Examples per test: CNI_BRIDGE_HOSTILE_EXAMPLES (default 60); the examples
are derandomized, so a CI failure reproduces.
"""
import json
import os

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

import cni_bridge  # noqa: E402
from tests.helpers import KEY_PATHS, VERSIONS, confine, set_path  # noqa: E402

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

EXAMPLES = int(os.environ.get("CNI_BRIDGE_HOSTILE_EXAMPLES", "60"))
GENERATED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large, HealthCheck.large_base_example])

# Pieces hostile names and values are made of: path climbing, separators, control characters,
# leading dashes, shell and format syntax, odd Unicode (a lone surrogate, U+FFFF, an emoji).
PIECES = ["/", "..", ".", "-", "--", " ", "\t", "\n", "\r", "\x01", "\x1b", "\x7f", ":", ";", "=", ",", "\\",
          "$(", "`", "'", '"', "%s", "%n", "*", "~", "\u00e9", "\u2603", "\U0001F600", "\uffff", "\ud800",
          "a", "eth0", "x" * 50]
CLIMBING = ["..", ".", "../..", "../../..", "a/../..", "./x", "...", "x/..", "../hostnet", "hostnet/.."]
INTERESTING = ["", ".", "..", "/", "\ud800", "a\udcff", "\x00", "../..", "../../../../etc/passwd", "-rf", "--help",
               "-", "a/b", "a b", "x" * 300, "-" + "a" * 299, "eth0:1", "lo", "cbt-hb0", "0", "-1", "1e999", "NaN",
               "10.94.0.300", "10.94.0.0/33", "::/129", "0.0.0.0/0", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
               "10.94.0.50", "10.94.0.1", "fd00::1/64", "host-local", "bridge", "loopback", "cni-bridge.pyz",
               "iptables", "nftables", "1.1.0", "0.1.0", "99.0.0"]


def hostile_text():
    """Strings made of hostile pieces, interesting fixed strings, arbitrary text, and bytes that are
    not UTF-8 (carried as surrogate escapes)."""
    return st.one_of(
        st.sampled_from(INTERESTING),
        st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
        st.builds(lambda piece, n: piece * n, st.sampled_from(PIECES), st.integers(1, 300)),
        st.text(max_size=40),
        st.binary(max_size=40).map(os.fsdecode),
    )


def json_values():
    """Any JSON value, with huge, negative and non-finite numbers and hostile strings."""
    numbers = st.one_of(st.integers(), st.sampled_from([2 ** 63, -2 ** 63, 2 ** 64, 10 ** 40, -1, 0, 4094, 4095,
                                                        65535, 65536, 2 ** 32]),
                        st.floats(), st.sampled_from([1e308, -0.0, 5e-324]))
    leaves = st.one_of(st.none(), st.booleans(), numbers, hostile_text())
    return st.recursive(leaves, lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(hostile_text(), children, max_size=4)), max_leaves=12)


@GENERATED
@given(version=st.sampled_from(VERSIONS),
       mutations=st.lists(st.tuples(st.sampled_from(KEY_PATHS), json_values()), min_size=1, max_size=3))
def test_generated_configs(arena, version, mutations):
    """Up to three keys of a valid config replaced by any JSON value (NaN and Infinity included)."""
    config = arena.config(version)
    for path, value in mutations:
        set_path(config, path, value)
    arena.exercise(json.dumps(confine(config, arena.data_dir)).encode())


def as_environment_value(text):
    """`text` as an environment value: without NUL, any surrogate turned into the raw bytes it
    stands for (subprocess passes surrogate escapes through as bytes that are not UTF-8)."""
    return os.fsdecode(text.replace("\0", "").encode("utf-8", "surrogatepass"))


env_text = hostile_text().map(as_environment_value)


@GENERATED
@given(field=st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_ARGS", "name", "bridge"]), data=st.data())
def test_generated_names_and_environment(arena, field, data):
    """One of the container ID, the interface name, CNI_ARGS, the network name or the bridge name
    with `/`, `..`, control characters, leading dashes, 300 characters or non-UTF-8 bytes."""
    in_environment = field.startswith("CNI_")
    value = data.draw(st.one_of(st.sampled_from(CLIMBING), env_text if in_environment else hostile_text()),
                      label=field)
    config = arena.config()
    if not in_environment:
        config[field] = value
    arena.exercise(json.dumps(config).encode(), {field: value} if in_environment else {})


@GENERATED
@given(pairs=st.lists(st.tuples(st.sampled_from(["IP", "ip", "MAC", "IgnoreUnknown", "K8S_POD_NAME", "K", ""]),
                                st.sampled_from(["=", "", "=="]), env_text), max_size=20),
       repeat=st.integers(1, 400), trailing=st.sampled_from(["", ";", ";;", "=", ";broken"]))
def test_generated_cni_args(arena, pairs, repeat, trailing):
    """CNI_ARGS of known and unknown keys, broken pairs (no `=`, empty key, several `=`), repeated
    up to thousands of pairs."""
    text = ";".join(key + sep + value for key, sep, value in pairs)
    raw = (";".join([text] * repeat) + trailing).encode("utf-8", "surrogateescape")
    args = os.fsdecode(raw[:100000])          # one variable must stay below execve's 128 KiB
    arena.exercise(json.dumps(arena.config()).encode(), {"CNI_ARGS": args})


def mangled(data, how, position, junk):
    """`data` (a valid config's bytes) truncated, with bytes inserted or replaced at `position`."""
    position %= len(data) + 1
    if how == "truncate":
        return data[:position]
    if how == "insert":
        return data[:position] + junk + data[position:]
    return data[:position] + junk + data[position + len(junk):]


@GENERATED
@given(version=st.sampled_from(VERSIONS), how=st.sampled_from(["truncate", "insert", "replace"]),
       position=st.integers(0, 10 ** 6),
       junk=st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\0",
                                                                          b'"', b"\\", b"{", b"]", b"\\ud800"])))
def test_generated_stdin_bytes(arena, version, how, position, junk):
    """A valid config's bytes truncated anywhere, or with random and non-UTF-8 bytes put in."""
    stdin = mangled(json.dumps(arena.config(version)).encode(), how, position, junk)
    assume(arena.confined(stdin))       # a mangled "dataDir" key means the default, outside the sandbox
    arena.exercise(stdin)


# --- the pure-Python JSON codec against the C one (python3-minimal has no _json) ------------------

def codec_outcome(decode, text):
    """("ok", the value re-encoded) or ("error", None) for one decoder."""
    try:
        value = decode(text)
    except ValueError:
        return ("error", None)
    return ("ok", json.dumps(value, sort_keys=True))


def accelerated(text):
    decoded = cni_bridge.json_loads_accelerated(text)
    if decoded is None:
        raise ValueError("refused")
    return decoded[0]


NESTED = [opener * n + closer * n for n in (1, 199, 200, 201, 1000) for opener, closer in (("[", "]"), ('{"a":', "}"))]


@GENERATED
@given(value=json_values(), how=st.sampled_from(["none", "truncate", "insert", "replace"]),
       position=st.integers(0, 10 ** 6),
       junk=st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from([b"\\ud800", b"\\udc00", b"\\u12", b"\\x",
                                                                          b"1e", b"-", b"01", b".5", b"\x01", b",]",
                                                                          b"NaN", b"-Infinity", b"tru"])),
       nested=st.sampled_from([None] + NESTED))
def test_pure_json_codec_matches_the_c_one(value, how, position, junk, nested):
    """Same accepted inputs (and values), same errors, same output bytes."""
    data = json.dumps(value).encode() if nested is None else nested.encode()
    if how != "none":
        data = mangled(data, how, position, junk)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
    assert codec_outcome(cni_bridge.json_loads_pure, text) == codec_outcome(accelerated, text)
    try:
        expected = ("ok", cni_bridge.json_loads_pure(text))
    except ValueError as err:
        expected = ("error", str(err))
    try:
        got = ("ok", cni_bridge.json_loads(text))
    except ValueError as err:
        got = ("error", str(err))
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


@GENERATED
@given(text=hostile_text(), value=json_values())
def test_pure_json_encoder_matches_the_c_one(text, value):
    import _json
    assert cni_bridge.json_string_pure(text) == _json.encode_basestring_ascii(text)
    accelerated_bytes = cni_bridge.json_dumps(value)
    saved = cni_bridge.json_string
    cni_bridge.json_string = cni_bridge.json_string_pure
    try:
        assert cni_bridge.json_dumps(value) == accelerated_bytes
    finally:
        cni_bridge.json_string = saved
