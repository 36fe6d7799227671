"""In-process unit tests of the CNI protocol layer of cni_bridge: versions, names, CNI_ARGS,
config lookups, the JSON codec, result conversions between every pair of versions, and the
order in which build_request validates the environment and stdin (reference §1.3, §1.7)."""

import json
import sys
from pathlib import Path

import pytest

import cni_bridge as cb

pytestmark = pytest.mark.unit

VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LEGACY = ("0.1.0", "0.2.0")
WITH_IP_VERSION = ("0.3.0", "0.3.1", "0.4.0")


def reject_constant(name):
    raise ValueError("not JSON: %s" % name)


def strict_json(text):
    """Parse with Python's json, refusing NaN/Infinity the way every other JSON reader does."""
    return json.loads(text, parse_constant=reject_constant)


@pytest.fixture(params=["json-imported", "json-not-imported"])
def json_state(request, monkeypatch):
    """Run a JSON test both in pytest's process (json.decoder loaded) and in the state the plugin
    really runs in: started with -I -S, it never imports `json`, so `json.decoder` is absent."""
    if request.param == "json-not-imported":
        monkeypatch.delitem(sys.modules, "json.decoder", raising=False)
    return request.param


# --- parse_version ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", (0, 1, 0)),
    ("0.1.0", (0, 1, 0)),
    ("0.4.0", (0, 4, 0)),
    ("1.1.0", (1, 1, 0)),
    ("1", (1, 0, 0)),
    ("1.1", (1, 1, 0)),
    ("10.20.30", (10, 20, 30)),
])
def test_parse_version_valid(text, expected):
    assert cb.parse_version(text) == expected


@pytest.mark.parametrize("text", ["1.0.0.0", "0.0.0.0.1", "a.b.c", "1.x", "1..0", ".1", "1.",
                                  " 1.0.0", "1.0.0 ", "v1.0.0", "1.0.0-rc1", "-1.0"])
def test_parse_version_invalid_is_decode_error(text):
    with pytest.raises(cb.CNIError) as err:
        cb.parse_version(text)
    assert err.value.code == 6


def test_versions_order_like_the_spec():
    parsed = [cb.parse_version(v) for v in VERSIONS]
    assert parsed == sorted(parsed)
    assert list(cb.SUPPORTED_VERSIONS) == VERSIONS


# --- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "Z", "0", "net-1", "my_net.v2", "a" * 300, "ctr1-._x"])
def test_check_name_accepts(name):
    cb.check_name(name, "network name", 7)


@pytest.mark.parametrize("name", ["", "-a", "_a", ".a", "..", "a/b", "a b", "a:b", "é", "net\n",
                                  "a\0b", "a$"])
def test_check_name_rejects_with_given_code(name):
    for code in (4, 7):
        with pytest.raises(cb.CNIError) as err:
            cb.check_name(name, "containerID", code)
        assert err.value.code == code
        assert err.value.msg == "invalid characters found in containerID"
        assert err.value.details == name


@pytest.mark.parametrize("name", ["eth0", "a", "x" * 15, "ééééééé", "veth0.100", "e-t_h@0"])
def test_check_ifname_accepts(name):
    cb.check_ifname(name)


@pytest.mark.parametrize("name, msg", [
    ("", "interface name is empty"),
    ("x" * 16, "interface name is too long"),
    ("é" * 8, "interface name is too long"),          # 8 characters but 16 bytes
    (".", "interface name is . or .."),
    ("..", "interface name is . or .."),
    ("a/b", "interface name contains / or : or whitespace characters"),
    ("a:b", "interface name contains / or : or whitespace characters"),
    ("a b", "interface name contains / or : or whitespace characters"),
    ("a\tb", "interface name contains / or : or whitespace characters"),
    ("a\u00a0b", "interface name contains / or : or whitespace characters"),
])
def test_check_ifname_rejects(name, msg):
    with pytest.raises(cb.CNIError) as err:
        cb.check_ifname(name)
    assert err.value.code == 4
    assert err.value.msg == msg


def test_check_ifname_rejects_control_characters():
    with pytest.raises(cb.CNIError) as err:
        cb.check_ifname("a\x7fb")
    assert err.value.code == 4


# --- CNI_ARGS -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", {}),
    (";", {}),
    (";;", {}),
    ("IP=10.0.0.5", {"IP": "10.0.0.5"}),
    ("IP=10.0.0.5;", {"IP": "10.0.0.5"}),
    (";IP=10.0.0.5;;MAC=aa:bb:cc:dd:ee:ff;", {"IP": "10.0.0.5", "MAC": "aa:bb:cc:dd:ee:ff"}),
    ("ip=10.0.0.5;Mac=x", {"IP": "10.0.0.5", "MAC": "x"}),
    ("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
     {"IGNOREUNKNOWN": "1", "K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0"}),
    ("K=", {"K": ""}),
    ("K=a=b", {"K": "a=b"}),
])
def test_parse_cni_args_lenient(text, expected):
    assert cb.parse_cni_args(text) == expected


@pytest.mark.parametrize("text, piece", [
    ("IP", "IP"),
    ("IP=1.2.3.4;junk", "junk"),
    ("=value", "=value"),
    ("a=b;;c", "c"),
])
def test_parse_cni_args_piece_without_equals_is_code_4(text, piece):
    with pytest.raises(cb.CNIError) as err:
        cb.parse_cni_args(text)
    assert err.value.code == 4
    assert piece in err.value.msg


def test_cni_args_unknown_keys_are_noted_once(capsys):
    args = cb.parse_cni_args("ip=1.2.3.4;K8S_POD_NAME=p;K8S_POD_UID=u")
    assert args["IP"] == "1.2.3.4" and "MAC" not in args
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "K8S_POD_NAME" in err and "K8S_POD_UID" in err


# --- conf_get -------------------------------------------------------------------------------------

def test_conf_get_exact_and_case_insensitive():
    obj = {"isGateway": True, "MTU": 1400, "RuntimeConfig": {"mac": "x"}}
    assert cb.conf_get(obj, "isGateway", bool) is True
    assert cb.conf_get(obj, "isgateway", bool) is True
    assert cb.conf_get(obj, "mtu", int) == 1400
    assert cb.conf_get(obj, "runtimeConfig", dict) == {"mac": "x"}


def test_conf_get_exact_key_wins_over_other_case():
    assert cb.conf_get({"Mtu": 1, "mtu": 2}, "mtu", int) == 2


def test_conf_get_null_and_missing_mean_default():
    assert cb.conf_get({"mtu": None}, "mtu", int, 7) == 7
    assert cb.conf_get({}, "mtu", int, 7) == 7
    assert cb.conf_get({"MTU": None}, "mtu", int) is None


@pytest.mark.parametrize("value, kind", [
    ("1400", int), (True, int), (1.5, int), (1, bool), ("true", bool), (1, str), ([], dict),
    ({}, list), ("x", float), (False, str),
])
def test_conf_get_wrong_type_is_code_7(value, kind):
    with pytest.raises(cb.CNIError) as err:
        cb.conf_get({"key": value}, "key", kind, where="ipam.")
    assert err.value.code == 7
    assert "ipam.key" in err.value.msg


def test_conf_get_float_accepts_int():
    assert cb.conf_get({"x": 3}, "x", float) == 3


def test_conf_int_bounds():
    assert cb.conf_int({"vlan": 4094}, "vlan", 0, 4094) == 4094
    for bad in (-1, 4095):
        with pytest.raises(cb.CNIError) as err:
            cb.conf_int({"vlan": bad}, "vlan", 0, 4094)
        assert err.value.code == 7


# --- JSON codec -----------------------------------------------------------------------------------

ROUND_TRIP_VALUES = [
    {},
    [],
    {"a": 1, "b": [1, 2.5, -3, None, True, False], "c": {"d": {"e": ["f"]}}},
    {"unicode": "é ü ß 雪 \u2603 \U0001f600", "ctl": "a\nb\tc\"d\\e\x01\x7f"},
    {"big": 2 ** 63, "neg": -(2 ** 40), "float": 0.1, "exp": 1e-7},
    [[[[[[[[[[{"deep": [1]}]]]]]]]]]],
    {"cniVersion": "1.1.0", "name": "net", "plugins": [{"type": "bridge", "ipam": {"ranges": [[{}]]}}]},
    {"lone surrogate": "\ud800"},
    "just a string",
    12,
    None,
]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES)
def test_json_round_trip(value):
    text = cb.json_dumps(value)
    assert text.isascii()
    assert strict_json(text) == value
    assert cb.json_loads(text) == value
    assert cb.json_loads(text.encode()) == value


def test_json_loads_matches_python_json():
    text = '  {"a": [1, 2, {"b": null}], "c": "\\u00e9\\ud83d\\ude00", "d": -0.5e3}\n\t'
    assert cb.json_loads(text) == json.loads(text)
    assert cb.json_loads('"\\u00e9"'.encode()) == "é"
    assert cb.json_loads('{"a": "\xc3\xa9"}'.encode("latin-1")) == {"a": "é"}


@pytest.mark.parametrize("text", [
    "", " ", "{", "[", '{"a":1', "[1,", '{"a": 1,}', "[1 2]", '{"a" 1}', '{"a":tru}', '"abc',
    '"\\x"', '"a\x01"', "{'a': 1}", "NaN", "[NaN]", '{"a": Infinity}', "-Infinity", "{} x",
    "[] []", "1 2", "nul", "01",
])
def test_json_loads_malformed_raises_value_error(text, json_state):
    with pytest.raises(ValueError):
        cb.json_loads(text)


def test_json_loads_invalid_utf8_is_value_error():
    with pytest.raises(ValueError):
        cb.json_loads(b'{"a": "\xff"}')


@pytest.mark.parametrize("text", ["[" * 100000, '{"a":' * 100000, "[" * 50000 + "]" * 50000])
def test_json_loads_deep_nesting_is_value_error(text, json_state):
    with pytest.raises(ValueError):
        cb.json_loads(text)
    assert cb.json_loads("[[1]]") == [[1]]          # the scanner still works afterwards


def test_json_numbers_that_overflow_are_refused():
    """1e400 is not representable: it is refused (a ValueError naming the number), never turned
    into Infinity, which no JSON reader accepts; the largest finite double round-trips as JSON."""
    for text in ('{"mtu": 1e400}', '{"mtu": -1e400}'):
        with pytest.raises(ValueError, match="1e400 is out of range"):
            cb.json_loads(text)
    largest = '{"mtu": 1.7976931348623157e308}'
    assert strict_json(cb.json_dumps(cb.json_loads(largest))) == json.loads(largest)


# --- results: every version pair ----------------------------------------------------------------

INTERNAL_RESULT = {
    "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:01:00:01"},
        {"name": "veth1234abcd", "mac": "0a:58:0a:01:00:02", "mtu": 1400},
        {"name": "eth0", "mac": "0a:58:0a:01:00:03", "sandbox": "/var/run/netns/ct",
         "mtu": 1400, "socketPath": "/run/vhost.sock", "pciID": "0000:00:1f.6"},
    ],
    "ips": [
        {"interface": 2, "address": "10.1.0.5/16", "gateway": "10.1.0.1"},
        {"interface": 2, "address": "fd00::5/64", "gateway": "fd00::1"},
        {"interface": 2, "address": "10.2.0.5/24"},
        {"interface": 2, "address": "fd01::5/64", "gateway": "fd01::1"},
    ],
    "routes": [
        {"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "priority": 10},
        {"dst": "::/0", "gw": "fd00::1", "table": 100},
        {"dst": "192.168.0.0/16"},
        {"dst": "fd02::/64", "scope": 253, "advmss": 1300},
    ],
    "dns": {"nameservers": ["10.1.0.1"], "domain": "example.com", "search": ["a.example.com"],
            "options": ["ndots:2"]},
}

INTERFACE_KEYS_BEFORE_1_1 = ("name", "mac", "sandbox")


def family_of(cidr):
    return 6 if ":" in cidr else 4


def what_survives(result, version):
    """The data a result still holds after being written in `version` (reference §1.7)."""
    if version in LEGACY:
        ips, routes = [], []
        for family in (4, 6):
            ip = next((i for i in result["ips"] if family_of(i["address"]) == family), None)
            if ip is None:
                continue
            ips.append(dict((k, ip[k]) for k in ("address", "gateway") if k in ip))
            routes += [dict((k, r[k]) for k in ("dst", "gw") if k in r)
                       for r in result["routes"] if family_of(r["dst"]) == family]
        return {"interfaces": [], "ips": ips, "routes": routes, "dns": result["dns"]}
    interfaces = result["interfaces"]
    if version != "1.1.0":
        interfaces = [dict((k, i[k]) for k in INTERFACE_KEYS_BEFORE_1_1 if k in i) for i in interfaces]
    return {"interfaces": interfaces, "ips": result["ips"], "routes": result["routes"],
            "dns": result["dns"]}


def wire_format(result, version):
    """What the spec says `result` looks like on the wire in `version`."""
    data = what_survives(result, version)
    dns = dict((k, v) for k, v in data["dns"].items() if v)
    out = {"cniVersion": version}
    if version in LEGACY:
        for family, key in ((4, "ip4"), (6, "ip6")):
            for ip in data["ips"]:
                if family_of(ip["address"]) == family:
                    entry = {"ip": ip["address"]}
                    if "gateway" in ip:
                        entry["gateway"] = ip["gateway"]
                    routes = [r for r in data["routes"] if family_of(r["dst"]) == family]
                    if routes:
                        entry["routes"] = routes
                    out[key] = entry
        out["dns"] = dns
        return out
    if data["interfaces"]:
        out["interfaces"] = data["interfaces"]
    if data["ips"]:
        out["ips"] = [dict(ip, version=str(family_of(ip["address"]))) if version in WITH_IP_VERSION
                      else dict(ip) for ip in data["ips"]]
    if data["routes"]:
        out["routes"] = data["routes"]
    if dns or version in WITH_IP_VERSION:
        out["dns"] = dns
    return out


def over_the_wire(obj):
    """What a reader gets back after the result went through stdout."""
    return json.loads(cb.json_dumps(obj))


@pytest.mark.parametrize("version", VERSIONS)
def test_encode_result_in_each_version(version):
    assert over_the_wire(cb.encode_result(INTERNAL_RESULT, version)) == wire_format(INTERNAL_RESULT, version)


@pytest.mark.parametrize("first", VERSIONS)
@pytest.mark.parametrize("second", VERSIONS)
def test_result_converted_between_versions(first, second):
    """A result produced in `first`, read back (as prevResult or a delegate's output) and
    printed in `second` holds what survives `first`, in `second`'s shape."""
    produced = over_the_wire(cb.encode_result(INTERNAL_RESULT, first))
    decoded = cb.decode_result(produced, "1.1.0")
    expected = wire_format(what_survives(INTERNAL_RESULT, first), second)
    assert over_the_wire(cb.encode_result(decoded, second)) == expected


@pytest.mark.parametrize("first", VERSIONS)
def test_decode_result_without_version_uses_the_given_one(first):
    produced = over_the_wire(cb.encode_result(INTERNAL_RESULT, first))
    del produced["cniVersion"]
    decoded = cb.decode_result(produced, first)
    assert over_the_wire(cb.encode_result(decoded, first)) == wire_format(INTERNAL_RESULT, first)


def test_legacy_result_literal():
    """1.1.0 -> 0.2.0 spelled out: first address per family, routes split by family, only
    dst/gw kept, no interfaces, second addresses dropped."""
    assert over_the_wire(cb.encode_result(INTERNAL_RESULT, "0.2.0")) == {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1",
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "192.168.0.0/16"}]},
        "ip6": {"ip": "fd00::5/64", "gateway": "fd00::1",
                "routes": [{"dst": "::/0", "gw": "fd00::1"}, {"dst": "fd02::/64"}]},
        "dns": {"nameservers": ["10.1.0.1"], "domain": "example.com", "search": ["a.example.com"],
                "options": ["ndots:2"]},
    }


def test_legacy_to_0_4_0_literal():
    legacy = {"cniVersion": "0.2.0",
              "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
              "ip6": {"ip": "fd00::5/64", "routes": [{"dst": "::/0", "gw": "fd00::1"}]},
              "dns": {}}
    decoded = cb.decode_result(legacy, "1.1.0")
    assert over_the_wire(cb.encode_result(decoded, "0.4.0")) == {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1"},
                {"version": "6", "address": "fd00::5/64"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
        "dns": {},
    }
    assert over_the_wire(cb.encode_result(decoded, "1.0.0")) == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"}, {"address": "fd00::5/64"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
    }


def test_legacy_drops_routes_of_a_family_without_address():
    result = {"ips": [{"address": "10.1.0.5/24"}],
              "routes": [{"dst": "::/0", "gw": "fd00::1"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.1"}]}
    assert over_the_wire(cb.encode_result(result, "0.1.0")) == {
        "cniVersion": "0.1.0", "ip4": {"ip": "10.1.0.5/24", "routes": [{"dst": "10.9.0.0/16", "gw": "10.1.0.1"}]},
        "dns": {}}


def test_1_1_interface_fields_dropped_below_1_1():
    for version in VERSIONS[2:-1]:
        out = cb.encode_result(INTERNAL_RESULT, version)
        for iface in out["interfaces"]:
            assert set(iface) <= set(INTERFACE_KEYS_BEFORE_1_1), (version, iface)
        assert all("version" in ip for ip in out["ips"]) == (version in WITH_IP_VERSION)
        assert not any("version" in ip for ip in out["ips"]) == (version not in WITH_IP_VERSION)
    out = cb.encode_result(INTERNAL_RESULT, "1.1.0")
    assert out["interfaces"][2]["pciID"] == "0000:00:1f.6"


@pytest.mark.parametrize("version", LEGACY)
def test_legacy_encoding_without_ip_is_code_1(version):
    result = {"interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:00:03", "sandbox": "/x"}],
              "ips": [], "routes": [{"dst": "0.0.0.0/0"}]}
    with pytest.raises(cb.CNIError) as err:
        cb.encode_result(result, version)
    assert err.value.code == 1
    assert err.value.msg == "cannot convert: no valid IP addresses"


@pytest.mark.parametrize("version", VERSIONS[2:])
def test_result_without_ip_is_fine_from_0_3(version):
    result = {"interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:00:03"}]}
    out = cb.encode_result(result, version)
    assert out["interfaces"] == [{"name": "eth0", "mac": "0a:58:0a:01:00:03"}]
    assert "ips" not in out


@pytest.mark.parametrize("obj", [
    [], "x", None,
    {"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]},
    {"cniVersion": "1.0.0", "ips": [{"address": 5}]},
    {"cniVersion": "1.0.0", "ips": ["10.0.0.5/24"]},
    {"cniVersion": "0.4.0", "ips": 5},
    {"cniVersion": "0.2.0", "ip4": {"gateway": "10.0.0.1"}},
    {"cniVersion": "0.2.0", "ip4": "10.0.0.5/24"},
])
def test_decode_malformed_result_is_code_6(obj):
    with pytest.raises(cb.CNIError) as err:
        cb.decode_result(obj, "1.0.0")
    assert err.value.code == 6


@pytest.mark.parametrize("version", VERSIONS)
def test_malformed_route_is_a_decode_error(version):
    """A route without `dst` in a prevResult is code 6 (a result that cannot be parsed) whatever
    version it is converted to, never a Python exception (run_plugin would make that 999)."""
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}], "routes": [{"gw": "10.0.0.1"}]}
    with pytest.raises(cb.CNIError) as err:
        cb.encode_result(cb.decode_result(prev, "1.0.0"), version)
    assert err.value.code == 6


# --- build_request: the reference's validation order ---------------------------------------------

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/run/netns/ct",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
GOOD_CONFIG = {"cniVersion": "1.0.0", "name": "net", "type": "bridge"}


@pytest.fixture
def stdin(monkeypatch):
    """Feed build_request's stdin; records how often it was read, and how often waiting for data
    (an error in the environment only peeks at stdin, for the config's version)."""
    class FakeStdin:
        data = json.dumps(GOOD_CONFIG).encode()
        reads = 0
        waiting_reads = 0

        def read(self, wait_for_data):
            self.reads += 1
            self.waiting_reads += bool(wait_for_data)
            return self.data

    fake = FakeStdin()
    monkeypatch.setattr(cb, "read_stdin", fake.read)
    return fake


def build(command, stdin, config=None, raw=None, **env_changes):
    env = dict(BASE_ENV, CNI_COMMAND=command)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    if raw is not None:
        stdin.data = raw
    elif config is not None:
        stdin.data = json.dumps(config).encode()
    return cb.build_request(command, env)


def code_of(command, stdin, **kwargs):
    with pytest.raises(cb.CNIError) as err:
        build(command, stdin, **kwargs)
    return err.value


def test_build_request_ok(stdin):
    request = build("ADD", stdin, CNI_ARGS="IgnoreUnknown=1;ip=10.0.0.9")
    assert (request.command, request.container_id, request.netns, request.ifname, request.path) == \
        ("ADD", "ctr1", "/run/netns/ct", "eth0", "/opt/cni/bin")
    assert request.args == {"IGNOREUNKNOWN": "1", "IP": "10.0.0.9"}
    assert request.config == GOOD_CONFIG
    assert request.version == "1.0.0"
    assert request.stdin == stdin.data


@pytest.mark.parametrize("command, missing", [
    ("ADD", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]),
    ("CHECK", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]),
    ("DEL", ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]),
    ("GC", ["CNI_PATH"]),
    ("STATUS", ["CNI_PATH"]),
])
def test_missing_env_all_named_before_stdin(command, missing, stdin):
    err = code_of(command, stdin, raw=b"garbage", **dict((k, None) for k in BASE_ENV if k != "CNI_COMMAND"))
    assert (err.code, err.msg) == (4, "required env variables [%s] missing" % ",".join(missing))
    assert stdin.waiting_reads == 0 and not hasattr(err, "version")
    err = code_of(command, stdin, config=dict(GOOD_CONFIG, cniVersion="0.3.1"),
                  **dict((k, None) for k in BASE_ENV if k != "CNI_COMMAND"))
    assert (err.code, err.version, stdin.waiting_reads) == (4, "0.3.1", 0)


def test_empty_env_counts_as_missing(stdin):
    err = code_of("ADD", stdin, CNI_NETNS="", CNI_PATH="")
    assert (err.code, err.msg) == (4, "required env variables [CNI_NETNS,CNI_PATH] missing")


@pytest.mark.parametrize("command", ["DEL", "GC", "STATUS"])
def test_netns_optional_outside_add_and_check(command, stdin):
    build(command, stdin, config=dict(GOOD_CONFIG, cniVersion="1.1.0"), CNI_NETNS=None)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK"])
def test_bad_container_id_before_stdin(command, stdin):
    err = code_of(command, stdin, raw=b"{", CNI_CONTAINERID="bad/id")
    assert (err.code, err.msg, err.details) == (4, "invalid characters found in containerID", "bad/id")
    assert stdin.waiting_reads == 0


def test_bad_ifname_before_stdin(stdin):
    err = code_of("ADD", stdin, raw=b"{", CNI_IFNAME="x" * 16)
    assert (err.code, err.msg) == (4, "interface name is too long")
    assert stdin.waiting_reads == 0


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_status_do_not_validate_container_id(command, stdin):
    build(command, stdin, config=dict(GOOD_CONFIG, cniVersion="1.1.0"), CNI_CONTAINERID="bad/id",
          CNI_IFNAME="x" * 20)


def test_bad_cni_args_is_code_4(stdin):
    err = code_of("ADD", stdin, CNI_ARGS="IP=1.2.3.4;oops")
    assert err.code == 4 and "oops" in err.msg


@pytest.mark.parametrize("raw", [b"", b"{", b'{"name": "net"', b"[1,", b"not json", b"\xff\xfe",
                                 b'{"name": "net", "cniVersion": NaN}', b"{} {}"])
def test_undecodable_stdin_is_code_6(raw, stdin, json_state):
    err = code_of("ADD", stdin, raw=raw)
    assert err.code == 6
    assert err.msg.startswith("error unmarshall network config")


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_stdin_not_an_object_is_code_6(raw, stdin):
    assert code_of("ADD", stdin, raw=raw).code == 6


def test_missing_name_is_code_7(stdin):
    for config in ({"cniVersion": "1.0.0"}, {"cniVersion": "1.0.0", "name": ""},
                   {"cniVersion": "1.0.0", "name": None}):
        err = code_of("ADD", stdin, config=config)
        assert (err.code, err.msg) == (7, "missing network name")


@pytest.mark.parametrize("name", ["-net", "a/b", "..", "net work", "ü"])
def test_bad_name_is_code_7(name, stdin):
    err = code_of("DEL", stdin, config={"cniVersion": "1.0.0", "name": name})
    assert (err.code, err.msg, err.details) == (7, "invalid characters found in network name", name)


@pytest.mark.parametrize("config", [{"name": 5}, {"name": ["x"]}, {"name": "n", "cniVersion": 1},
                                    {"name": "n", "cniVersion": ["1.0.0"]}])
def test_wrong_json_types_are_code_6(config, stdin):
    assert code_of("ADD", stdin, config=config).code == 6


def test_name_checked_before_version(stdin):
    assert code_of("ADD", stdin, config={"name": "-bad", "cniVersion": "9.9.9"}).code == 7


@pytest.mark.parametrize("version", ["", None])
def test_absent_version_means_0_1_0(version, stdin):
    config = {"name": "net"} if version is None else {"name": "net", "cniVersion": version}
    assert build("ADD", stdin, config=config).version == "0.1.0"


@pytest.mark.parametrize("command", ["ADD", "DEL"])
@pytest.mark.parametrize("version", ["0.5.0", "1.2.0", "1.0", "2", "junk"])
def test_unsupported_version_is_code_1(command, version, stdin):
    err = code_of(command, stdin, config={"name": "net", "cniVersion": version})
    assert (err.code, err.msg) == (1, "incompatible CNI versions")
    assert version in err.details


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "", "0.3.9"])
def test_check_needs_0_4_0(version, stdin):
    err = code_of("CHECK", stdin, config={"name": "net", "cniVersion": version})
    assert (err.code, err.msg) == (1, "config version does not allow CHECK")


def test_check_unparsable_version_is_code_6(stdin):
    assert code_of("CHECK", stdin, config={"name": "net", "cniVersion": "x.y"}).code == 6


def test_check_unknown_new_version_is_incompatible(stdin):
    err = code_of("CHECK", stdin, config={"name": "net", "cniVersion": "1.0"})
    assert (err.code, err.msg) == (1, "incompatible CNI versions")


@pytest.mark.parametrize("command", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", ""])
def test_gc_status_need_1_1_0(command, version, stdin):
    err = code_of(command, stdin, config={"name": "net", "cniVersion": version})
    assert (err.code, err.msg) == (1, "config version does not allow %s" % command)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_every_command_accepts_1_1_0(command, stdin):
    assert build(command, stdin, config=dict(GOOD_CONFIG, cniVersion="1.1.0")).command == command


@pytest.mark.parametrize("raw", [b'{"cniVersion": "0.4.0"}', b'{"cniVersion": "0.1.0"}', b'{"cniVersion": "9.9.9"}',
                                 b"", b"garbage", b'{"cniVersion": "1.0.0"', b"[1,"])
def test_version_answer_is_a_constant(raw, monkeypatch, json_state):
    """Whatever stdin holds (the reference answers its library's version too): the sh preamble
    prints the same bytes without reading it (tests/test_portable.py compares the two)."""
    monkeypatch.setattr(cb, "read_stdin", lambda wait_for_data: raw)
    assert cb.version_answer("bridge") == {"cniVersion": "1.1.0", "supportedVersions": VERSIONS}
    assert cb.version_answer("firewall") == {"cniVersion": "1.1.0",
                                             "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_error_json_shape():
    err = cb.CNIError(7, "bad", "details here")
    assert err.to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "details here"}


# --- poll_until ---------------------------------------------------------------------------------

def test_poll_until_returns_the_first_answer_and_sleeps_between_attempts(monkeypatch):
    answers = [None, None, "ready"]
    slept = []
    monkeypatch.setattr(cb.time, "sleep", slept.append)
    value = cb.poll_until(lambda: answers.pop(0), 5.0, lambda: AssertionError("expired"),
                          delay=0.01, max_delay=0.015)
    assert value == "ready"
    assert slept == [0.01, 0.015]


def test_poll_until_raises_the_expiry_error_on_the_monotonic_clock(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cb.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cb.time, "time", lambda: 0.0)       # a wall clock stepped back: ignored

    def advance(seconds):
        clock[0] += seconds
    monkeypatch.setattr(cb.time, "sleep", advance)
    calls = []
    with pytest.raises(cb.CNIError) as err:
        cb.poll_until(lambda: calls.append(1), 1.0,
                      lambda: cb.CNIError(cb.ERR_TRY_AGAIN, "too slow"), delay=0.25, max_delay=0.25)
    assert err.value.code == cb.ERR_TRY_AGAIN
    assert len(calls) == 5          # at 0, 0.25, 0.5, 0.75 and 1.0 s


# --- the key rule, in one place -------------------------------------------------------------------

def test_top_level_keys_match_case_insensitively_as_go_decodes_them(stdin):
    request = build("ADD", stdin, config={"Name": "net", "CNIVersion": "1.0.0", "type": "bridge"})
    assert (request.network, request.version) == ("net", "1.0.0")
    assert request.stdin == stdin.data and request.env["CNI_COMMAND"] == "ADD"


def test_gc_valid_attachments_key_any_case():
    config = {"CNI.dev/Valid-Attachments": [{"ContainerID": "c1", "IfName": "eth0"}]}
    assert cb.valid_attachments(config) == {("c1", "eth0")}


def test_config_error_is_code_7_with_the_reference_prefix():
    err = cb.config_error("mtu 5 is below 68", "details")
    assert (err.code, err.msg, err.details) == (7, "invalid network config: mtu 5 is below 68", "details")


# --- operator tools: each verify step and network command helper alone ----------------------------

def test_verifier_records_each_step_and_stops_on_failure():
    v = cb.Verifier(as_json=True)
    assert v.step("fine", lambda x: ("detail %s" % x, 42), "x") == 42

    def broken():
        raise cb.CNIError(cb.ERR_INTERNAL, "went wrong")
    assert v.step("broken", broken) is None
    assert [(s["step"], s["ok"], s["detail"]) for s in v.steps] == [("fine", True, "detail x"),
                                                                   ("broken", False, "went wrong")]


def test_verify_check_step_skips_versions_without_check():
    class NoCalls(object):
        def call(self, command, stdin):
            raise AssertionError("called %s" % command)
    assert cb.Verifier.check(NoCalls(), {}, "0.3.1", {}) == ("cniVersion 0.3.1 has no CHECK", True)
    assert cb.Verifier.ping_gateway(None, [{"address": "10.0.0.2/24"}])[0].startswith("no gateway")


def test_split_cni_args_keeps_keys_as_written_and_refuses_a_broken_pair():
    assert cb.split_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a=b;") == [["IgnoreUnknown", "1"],
                                                                       ["K8S_POD_NAME", "a=b"]]
    with pytest.raises(cb.CNIError) as err:
        cb.split_cni_args("IP=10.0.0.2;junk")
    assert err.value.code == cb.ERR_INVALID_ENV


def test_network_call_builds_each_plugins_config_as_libcni(tmp_path, monkeypatch):
    (tmp_path / "10-n.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "n",
        "plugins": [{"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    env = {"NETCONFPATH": str(tmp_path), "CAP_ARGS": json.dumps({"portMappings": [1], "other": 2}),
           "CNI_CACHE_DIR": str(tmp_path / "cache")}
    sent = []
    monkeypatch.setattr(cb, "invoke_plugin", lambda t, path, e, stdin: sent.append((t, e, json.loads(stdin))))
    call = cb.NetworkCall("n", "/run/netns/x", env)
    assert call.allows("CHECK") and not call.allows("GC")
    cb.network_status(call)
    (bridge_type, bridge_env, bridge), (portmap_type, _, portmap) = sent
    assert (bridge_type, bridge) == ("bridge", {"type": "bridge", "cniVersion": "1.0.0", "name": "n"})
    assert bridge_env["CNI_COMMAND"] == "STATUS" and bridge_env["CNI_NETNS"] == ""
    assert portmap["runtimeConfig"] == {"portMappings": [1]} and "capabilities" not in portmap
    assert call.cache_path().startswith(str(tmp_path / "cache" / "results") + "/n-cnitool-")


@pytest.mark.parametrize("line, words", [
    ('-A POSTROUTING -s 10.1.0.2/32 -m comment --comment "name: \\"n\\" id: \\"c\'1\\"" -j CNI-x',
     ["-A", "POSTROUTING", "-s", "10.1.0.2/32", "-m", "comment", "--comment",
      'name: "n" id: "c\'1"', "-j", "CNI-x"]),
    ('-A CNI-FORWARD -m comment --comment "an admin\'s rule" -j ACCEPT',
     ["-A", "CNI-FORWARD", "-m", "comment", "--comment", "an admin's rule", "-j", "ACCEPT"]),
    ('-A X -m comment --comment "" -j RETURN', ["-A", "X", "-m", "comment", "--comment", "", "-j", "RETURN"]),
])
def test_iptables_rules_split_as_libxtables_quotes_them(line, words):
    """`iptables -S` lines split as libxtables quotes them (double quotes, backslash escapes):
    a single quote in anyone's comment is an ordinary character (shlex would refuse it)."""
    assert cb.split_iptables_rule(line) == words
