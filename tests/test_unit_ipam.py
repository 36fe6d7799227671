"""In-process unit tests of cni_bridge's host-local IPAM: range validation, range-set order,
requested addresses, the allocation order, the on-disk store and its safety against planted
symlinks and crashed writers (reference §3).  Every test uses its own temporary dataDir."""

import os
import sys
from pathlib import Path

import pytest

import cni_bridge as cb

pytestmark = pytest.mark.unit

NETWORK = "unitnet"


def ip(text):
    return cb.parse_ip(text)


def parse_range(**fields):
    return cb.IPRange.parse(fields, "ipam.ranges[0][0]")


def range_set(*ranges):
    return cb.parse_range_set(list(ranges), "ipam.ranges[0]")


def make_config(data_dir, ranges=None, version="1.0.0", **extra):
    """A host-local network config; `ranges` is the ipam.ranges list, `extra` goes into ipam
    (or, for runtimeConfig/args, at the top)."""
    ipam = {"type": "host-local", "dataDir": str(data_dir)}
    if ranges is not None:
        ipam["ranges"] = ranges
    config = {"cniVersion": version, "name": NETWORK, "type": "bridge", "ipam": ipam}
    for key, value in extra.items():
        (config if key in ("runtimeConfig", "args") else ipam)[key] = value
    return config


def make_request(config, container_id="ctr1", ifname="eth0", args=None, command="ADD"):
    return cb.Request(command, container_id, "/run/netns/unit", ifname, args or {}, "/opt/cni/bin",
                      config, config.get("cniVersion") or "0.1.0")


def loaded(config, **kwargs):
    return cb.HostLocalConfig(make_request(config, **kwargs))


def add(config, container_id="ctr1", ifname="eth0", args=None):
    """host-local ADD in process; the addresses it handed out ("ip/len")."""
    result = cb.host_local_add(make_request(config, container_id, ifname, args))
    return [entry["address"] for entry in result["ips"]]


def delete(config, container_id="ctr1", ifname="eth0"):
    cb.host_local_del(make_request(config, container_id, ifname, command="DEL"))


def state_dir(data_dir):
    return Path(data_dir) / NETWORK


def files(data_dir):
    """Reservation files and their content (lock and last_reserved_ip.* left out)."""
    out = {}
    for path in sorted(state_dir(data_dir).iterdir()):
        if path.name not in ("lock", "boot_id") and not path.name.startswith("last_reserved_ip."):
            out[path.name] = path.read_bytes().decode() if not path.is_symlink() else "-> " + os.readlink(path)
    return out


def plant(data_dir, name, content):
    state_dir(data_dir).mkdir(parents=True, exist_ok=True)
    (state_dir(data_dir) / name).write_text(content)


def cni_error(call, *args, **kwargs):
    with pytest.raises(cb.CNIError) as err:
        call(*args, **kwargs)
    return err.value


SUBNET29 = [[{"subnet": "10.1.0.0/29"}]]


# --- IPRange.parse --------------------------------------------------------------------------------

def test_range_defaults_v4():
    r = parse_range(subnet="10.1.0.0/24")
    assert (r.family, r.start, r.end, r.gateway) == (4, ip("10.1.0.1")[1], ip("10.1.0.254")[1], ip("10.1.0.1")[1])
    assert str(r) == "10.1.0.1-10.1.0.254"
    assert r.capacity() == 253


def test_range_defaults_v6():
    r = parse_range(subnet="fd00:1::/64")
    assert str(r) == "fd00:1::1-fd00:1::ffff:ffff:ffff:ffff"
    assert r.capacity() == 2 ** 64 - 2                    # no network, no gateway, no broadcast in v6


def test_range_all_fields():
    r = parse_range(subnet="10.1.0.0/24", rangeStart="10.1.0.10", rangeEnd="10.1.0.20", gateway="10.1.0.254")
    assert str(r) == "10.1.0.10-10.1.0.20"
    assert r.gateway == ip("10.1.0.254")[1]
    assert r.capacity() == 11


def test_range_smallest_allocatable_v4():
    r = parse_range(subnet="10.1.0.0/30")
    assert str(r) == "10.1.0.1-10.1.0.2" and r.capacity() == 1


@pytest.mark.parametrize("subnet, msg", [
    ("10.1.0.1/24", "Network has host bits set. For a subnet mask of length 24 the network address is 10.1.0.0"),
    ("0.0.0.0/0", None),
    ("10.1.0.0/30", None),
    ("fd00::/126", None),
    ("fd00::1/64", "Network has host bits set. For a subnet mask of length 64 the network address is fd00::"),
    ("10.1.0.0/31", "Network 10.1.0.0/31 too small to allocate from"),
    ("10.1.0.0/32", "Network 10.1.0.0/32 too small to allocate from"),
    ("fd00::/127", "Network fd00::/127 too small to allocate from"),
    ("fd00::/128", "Network fd00::/128 too small to allocate from"),
])
def test_range_subnet_validation(subnet, msg):
    if msg is None:
        parse_range(subnet=subnet)
        return
    err = cni_error(parse_range, subnet=subnet)
    assert (err.code, err.msg) == (7, msg)


@pytest.mark.parametrize("fields, fragment", [
    ({"rangeStart": "10.1.1.5"}, "RangeStart 10.1.1.5 not in network 10.1.0.0/24"),
    ({"rangeEnd": "10.2.0.5"}, "RangeEnd 10.2.0.5 not in network 10.1.0.0/24"),
    ({"gateway": "10.1.1.1"}, "Gateway 10.1.1.1 not in network 10.1.0.0/24"),
    ({"rangeStart": "fd00::5"}, "not in network 10.1.0.0/24"),
    ({"rangeStart": "10.1.0.20", "rangeEnd": "10.1.0.10"}, "rangeStart 10.1.0.20 is after rangeEnd 10.1.0.10"),
    ({"rangeStart": "10.1.0.300"}, "rangeStart"),
    ({"gateway": 5}, "gateway must be a string"),
])
def test_range_address_validation(fields, fragment):
    err = cni_error(parse_range, subnet="10.1.0.0/24", **fields)
    assert err.code == 7
    assert fragment in err.msg


@pytest.mark.parametrize("obj", [{}, {"subnet": None}, {"subnet": 5}, {"subnet": "10.1.0.0"},
                                 {"subnet": "garbage"}, "10.1.0.0/24"])
def test_range_bad_subnet_is_code_7(obj):
    assert cni_error(cb.IPRange.parse, obj, "ipam.ranges[0][0]").code == 7


def test_range_usable_skips_network_broadcast_gateway():
    r = parse_range(subnet="10.1.0.0/29", rangeStart="10.1.0.0", rangeEnd="10.1.0.7", gateway="10.1.0.3")
    usable = [n for n in range(ip("10.1.0.0")[1], ip("10.1.0.7")[1] + 1) if r.usable(n)]
    assert [cb.ip_to_text(4, n) for n in usable] == ["10.1.0.1", "10.1.0.2", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    assert r.capacity() == len(usable)


# --- range sets -----------------------------------------------------------------------------------

def test_range_set_overlap_message():
    err = cni_error(range_set, {"subnet": "10.1.0.0/24"}, {"subnet": "10.1.0.0/25"})
    assert err.code == 7
    assert err.msg == ("invalid range set ipam.ranges[0]: subnets 10.1.0.1-10.1.0.254 and "
                       "10.1.0.1-10.1.0.126 overlap")


def test_range_set_same_subnet_disjoint_is_fine():
    ranges = range_set({"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.1", "rangeEnd": "10.1.0.100"},
                       {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.101", "rangeEnd": "10.1.0.200"})
    assert str(ranges) == "10.1.0.1-10.1.0.100,10.1.0.101-10.1.0.200"
    assert ranges.find(*ip("10.1.0.150")) is ranges[1]
    assert ranges.find(*ip("10.1.0.250")) is None


def test_range_set_same_subnet_overlapping_start_end():
    err = cni_error(range_set, {"subnet": "10.1.0.0/24", "rangeEnd": "10.1.0.100"},
                    {"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.100"})
    assert "subnets 10.1.0.1-10.1.0.100 and 10.1.0.100-10.1.0.254 overlap" in err.msg


def test_range_set_mixed_families_and_empty():
    err = cni_error(range_set, {"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"})
    assert err.msg == "invalid range set ipam.ranges[0]: mixed address families"
    assert cni_error(range_set).msg == "invalid range set ipam.ranges[0]: empty range set"


def test_overlap_across_range_sets(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/16"}]])
    err = cni_error(loaded, config)
    assert (err.code, err.msg) == (7, "range set 0 overlaps with 1")


def test_config_errors(tmp_path):
    assert cni_error(loaded, {"cniVersion": "1.0.0", "name": NETWORK}).msg == "IPAM config missing 'ipam' key"
    assert cni_error(loaded, make_config(tmp_path)).msg == "no IP ranges specified"
    assert cni_error(loaded, make_config(tmp_path, dataDir="relative/dir")).code == 7
    assert cni_error(loaded, make_config(tmp_path, [{"subnet": "10.1.0.0/24"}])).code == 7


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_legacy_versions_allow_one_set_per_family(tmp_path, version):
    two_v4 = make_config(tmp_path, [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.2.0.0/24"}]], version)
    err = cni_error(loaded, two_v4)
    assert err.msg == "CNI version %s does not support more than 1 address per family" % version
    one_each = make_config(tmp_path, [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]], version)
    assert len(loaded(one_each).range_sets) == 2


def test_load_ranges_order(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.30.0.0/24"}], [{"subnet": "fd00:30::/64"}]],
                         subnet="10.20.0.0/24", rangeStart="10.20.0.50", gateway="10.20.0.254",
                         runtimeConfig={"ipRanges": [[{"subnet": "10.10.0.0/24"}]]})
    sets = loaded(config).range_sets
    assert [str(s[0].subnet) for s in sets] == ["10.10.0.0/24", "10.20.0.0/24", "10.30.0.0/24", "fd00:30::/64"]
    assert str(sets[1]) == "10.20.0.50-10.20.0.254" and cb.ip_to_text(4, sets[1][0].gateway) == "10.20.0.254"
    assert add(config) == ["10.10.0.2/24", "10.20.0.50/24", "10.30.0.2/24", "fd00:30::2/64"]
    last = dict((n, (state_dir(tmp_path) / ("last_reserved_ip.%d" % n)).read_text()) for n in range(4))
    assert last == {0: "10.10.0.2", 1: "10.20.0.50", 2: "10.30.0.2", 3: "fd00:30::2"}


def test_runtime_ip_ranges_case_insensitive_keys(tmp_path):
    config = make_config(tmp_path)
    config["RuntimeConfig"] = {"IPRanges": [[{"Subnet": "10.10.0.0/24"}]]}
    assert [str(s[0].subnet) for s in loaded(config).range_sets] == ["10.10.0.0/24"]


# --- requested addresses --------------------------------------------------------------------------

def test_requested_ips_sources_and_order(tmp_path):
    config = make_config(tmp_path, SUBNET29, args={"cni": {"ips": ["10.1.0.6/24", "10.1.0.5"]}},
                         runtimeConfig={"ips": ["fd00::7/64", "10.1.0.5"]})
    ipam = loaded(config, args={"IP": "10.1.0.4"})
    assert ipam.requested == [ip("10.1.0.4"), ip("10.1.0.6"), ip("10.1.0.5"), ip("fd00::7")]


def test_requested_ip_cni_args_key_any_case(tmp_path):
    ipam = loaded(make_config(tmp_path, SUBNET29), args=cb.parse_cni_args("ip=10.1.0.4"))
    assert ipam.requested == [ip("10.1.0.4")]


@pytest.mark.parametrize("where, value", [
    ("args", {"IP": "10.1.0"}),
    ("cni", ["garbage"]),
    ("runtime", ["10.1.0.256/24"]),
    ("cni", [5]),
])
def test_requested_ip_unparsable(tmp_path, where, value):
    extra = {}
    if where == "cni":
        extra["args"] = {"cni": {"ips": value}}
    elif where == "runtime":
        extra["runtimeConfig"] = {"ips": value}
    config = make_config(tmp_path, SUBNET29, **extra)
    err = cni_error(loaded, config, args=value if where == "args" else None)
    assert err.code == 7


def test_requested_ip_honoured(tmp_path):
    config = make_config(tmp_path, SUBNET29, args={"cni": {"ips": ["10.1.0.5/8"]}})
    assert add(config) == ["10.1.0.5/29"]
    assert files(tmp_path) == {"10.1.0.5": "ctr1\r\neth0"}
    assert (state_dir(tmp_path) / "last_reserved_ip.0").read_text() == "10.1.0.5"


def test_requested_ip_taken(tmp_path):
    config = make_config(tmp_path, SUBNET29, args={"cni": {"ips": ["10.1.0.5"]}})
    add(config, "ctr1")
    err = cni_error(add, config, "ctr2")
    assert err.msg == "requested IP address 10.1.0.5 is not available in range set 10.1.0.1-10.1.0.6"
    assert files(tmp_path) == {"10.1.0.5": "ctr1\r\neth0"}


def test_requested_ip_is_gateway(tmp_path):
    config = make_config(tmp_path, SUBNET29, runtimeConfig={"ips": ["10.1.0.1"]})
    err = cni_error(add, config)
    assert err.msg == "requested ip 10.1.0.1 is subnet's gateway"
    assert files(tmp_path) == {}


@pytest.mark.parametrize("requested", ["10.9.9.9", "10.1.0.7", "fd00::1"])
def test_requested_ip_outside_every_range(tmp_path, requested):
    config = make_config(tmp_path, SUBNET29, args={"cni": {"ips": [requested]}})
    err = cni_error(add, config)
    assert err.msg == "failed to allocate all requested IPs: %s" % requested
    assert files(tmp_path) == {}


def test_requested_network_address_inside_range(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29", "rangeStart": "10.1.0.0"}]],
                         args={"cni": {"ips": ["10.1.0.0"]}})
    assert "is not usable" in cni_error(add, config).msg
    assert files(tmp_path) == {}


def test_requested_ips_one_per_family(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]],
                         args={"cni": {"ips": ["fd00::99", "10.1.0.99"]}})
    assert add(config) == ["10.1.0.99/24", "fd00::99/64"]


def test_two_requested_ips_in_one_set_fail_and_leave_nothing(tmp_path):
    config = make_config(tmp_path, SUBNET29, args={"cni": {"ips": ["10.1.0.4", "10.1.0.5"]}})
    err = cni_error(add, config)
    assert err.msg == "failed to allocate all requested IPs: 10.1.0.5"
    assert files(tmp_path) == {}


# --- allocation order -----------------------------------------------------------------------------

def candidates(ranges, last):
    return [cb.ip_to_text(r.family, n) for r, n in cb._candidates(ranges, last)]


def two_ranges():
    return range_set({"subnet": "10.1.0.0/29"}, {"subnet": "10.2.0.0/29"})


def test_candidates_without_last_start_at_first_range():
    assert candidates(two_ranges(), None) == ["10.1.0.%d" % n for n in range(1, 7)] + \
        ["10.2.0.%d" % n for n in range(1, 7)]


def test_candidates_after_last_then_wrap():
    assert candidates(two_ranges(), ip("10.1.0.3")) == \
        ["10.1.0.4", "10.1.0.5", "10.1.0.6"] + ["10.2.0.%d" % n for n in range(1, 7)] + \
        ["10.1.0.1", "10.1.0.2", "10.1.0.3"]


def test_candidates_last_at_end_of_range_goes_to_next_range_start():
    order = candidates(two_ranges(), ip("10.1.0.6"))
    assert order[0] == "10.2.0.1"
    assert order == ["10.2.0.%d" % n for n in range(1, 7)] + ["10.1.0.%d" % n for n in range(1, 7)]


def test_candidates_last_at_end_of_last_range_wraps_to_first():
    order = candidates(two_ranges(), ip("10.2.0.6"))
    assert order == ["10.1.0.%d" % n for n in range(1, 7)] + ["10.2.0.%d" % n for n in range(1, 7)]


@pytest.mark.parametrize("last", ["10.9.0.1", "fd00::3", "10.1.0.7"])
def test_candidates_last_outside_ranges_starts_at_first(last):
    assert candidates(two_ranges(), ip(last))[0] == "10.1.0.1"
    assert len(candidates(two_ranges(), ip(last))) == 12


def test_candidates_single_range_wrap():
    ranges = range_set({"subnet": "10.1.0.0/29"})
    assert candidates(ranges, ip("10.1.0.4")) == ["10.1.0.5", "10.1.0.6", "10.1.0.1", "10.1.0.2",
                                                  "10.1.0.3", "10.1.0.4"]


def test_candidates_are_lazy_in_a_huge_range():
    gen = cb._candidates(range_set({"subnet": "fd00::/64"}), None)
    assert [cb.ip_to_text(6, next(gen)[1]) for _ in range(3)] == ["fd00::1", "fd00::2", "fd00::3"]


# --- allocate / release ---------------------------------------------------------------------------

def test_slash_29_hands_out_2_to_6_then_fails(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    got = [add(config, "ctr%d" % n)[0] for n in range(5)]
    assert got == ["10.1.0.%d/29" % n for n in range(2, 7)]
    assert files(tmp_path) == dict(("10.1.0.%d" % (n + 2), "ctr%d\r\neth0" % n) for n in range(5))
    err = cni_error(add, config, "ctr9")
    assert err.msg == "no IP addresses available in range set: 10.1.0.1-10.1.0.6"
    assert len(files(tmp_path)) == 5


def test_result_shape(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 10.1.0.1\nsearch a.example b.example\noptions ndots:2\ndomain example\n")
    config = make_config(tmp_path, SUBNET29, routes=[{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.1/16", "gw": "10.1.0.1"}],
                         resolvConf=str(resolv))
    result, reused = cb.host_local_allocate(make_request(config))
    assert result == {
        "ips": [{"address": "10.1.0.2/29", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.1"}],
        "dns": {"nameservers": ["10.1.0.1"], "domain": "example", "search": ["a.example", "b.example"],
                "options": ["ndots:2"]},
    }
    assert reused is False
    assert cb.host_local_allocate(make_request(config))[1] is True     # a repeated ADD
    assert cb.host_local_add(make_request(config)) == result


def test_round_robin_after_release(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    assert add(config, "a") == ["10.1.0.2/29"]
    assert add(config, "b") == ["10.1.0.3/29"]
    delete(config, "a")
    assert add(config, "c") == ["10.1.0.4/29"]                  # not the freed .2
    assert add(config, "d") == ["10.1.0.5/29"]
    assert add(config, "e") == ["10.1.0.6/29"]
    assert add(config, "f") == ["10.1.0.2/29"]                  # wrapped round


def test_skips_gateway_network_and_broadcast(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29", "rangeStart": "10.1.0.0",
                                      "rangeEnd": "10.1.0.7", "gateway": "10.1.0.3"}]])
    got = [add(config, "ctr%d" % n)[0] for n in range(5)]
    assert got == ["10.1.0.%d/29" % n for n in (1, 2, 4, 5, 6)]
    assert "no IP addresses available" in cni_error(add, config, "ctr9").msg


def test_repeated_add_returns_same_reservation(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29"}], [{"subnet": "fd00::/64"}]])
    first = add(config, "ctr1")
    assert add(config, "ctr1") == first
    assert add(config, "ctr1", "eth1") != first                  # another interface: new addresses
    assert len(files(tmp_path)) == 4


def test_exhaustion_in_second_set_leaves_nothing_reserved(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29"}], [{"subnet": "10.2.0.0/30"}]])
    assert add(config, "ctr1") == ["10.1.0.2/29", "10.2.0.2/30"]
    before = files(tmp_path)
    err = cni_error(add, config, "ctr2")
    assert err.msg == "no IP addresses available in range set: 10.2.0.1-10.2.0.2"
    assert files(tmp_path) == before
    assert os.listdir(state_dir(tmp_path)).count(".tmp-%d" % os.getpid()) == 0


def test_multi_range_set_moves_to_next_range(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/30"}, {"subnet": "10.2.0.0/30"}]])
    assert add(config, "a") == ["10.1.0.2/30"]
    assert add(config, "b") == ["10.2.0.2/30"]
    assert cni_error(add, config, "c").msg == \
        "no IP addresses available in range set: 10.1.0.1-10.1.0.2,10.2.0.1-10.2.0.2"


def test_ipv6_allocation_does_not_walk_the_range(tmp_path, monkeypatch):
    """200 reservations in a /64: one more ADD tries one file, not the range."""
    config = make_config(tmp_path, [[{"subnet": "fd00:10::/64"}]])
    for n in range(2, 202):
        plant(tmp_path, cb.ip_to_text(6, ip("fd00:10::")[1] + n), "other%d\r\neth0" % n)
    reserve_calls, yielded = [], []
    real_reserve, real_candidates = cb.Store.reserve, cb._candidates

    def counting_reserve(self, family, value, owner):
        reserve_calls.append(value)
        return real_reserve(self, family, value, owner)

    def counting_candidates(ranges, last):
        for item in real_candidates(ranges, last):
            yielded.append(item)
            yield item

    monkeypatch.setattr(cb.Store, "reserve", counting_reserve)
    monkeypatch.setattr(cb, "_candidates", counting_candidates)
    assert add(config, "new") == ["fd00:10::ca/64"]
    assert len(reserve_calls) <= 201 and len(yielded) <= 202
    assert len(reserve_calls) == 1
    reserve_calls.clear()
    yielded.clear()
    assert add(config, "newer") == ["fd00:10::cb/64"]         # continues after last_reserved
    assert len(reserve_calls) == 1 and len(yielded) == 1


def test_exhausted_small_range_in_a_huge_subnet_fails_fast(tmp_path, monkeypatch):
    config = make_config(tmp_path, [[{"subnet": "fd00:10::/64", "rangeStart": "fd00:10::5",
                                      "rangeEnd": "fd00:10::6"}]])
    add(config, "a")
    add(config, "b")
    monkeypatch.setattr(cb.Store, "reserve", lambda *a: pytest.fail("walked an exhausted range"))
    assert "no IP addresses available" in cni_error(add, config, "c").msg


def test_release_new_form_only_that_interface(tmp_path):
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29"}], [{"subnet": "fd00::/64"}]])
    add(config, "ctr1", "eth0")
    add(config, "ctr1", "eth1")
    add(config, "ctr2", "eth0")
    delete(config, "ctr1", "eth0")
    assert sorted(files(tmp_path).values()) == ["ctr1\r\neth1"] * 2 + ["ctr2\r\neth0"] * 2
    delete(config, "ctr1", "eth0")                                 # second DEL: fine, no change
    assert len(files(tmp_path)) == 4


def test_release_legacy_id_only_files(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    plant(tmp_path, "10.1.0.2", "ctr1")
    plant(tmp_path, "10.1.0.3", "ctr1\n")
    plant(tmp_path, "10.1.0.4", "ctr2")
    delete(config, "ctr1", "eth0")
    assert files(tmp_path) == {"10.1.0.4": "ctr2"}


def test_release_prefers_new_form_over_legacy(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    plant(tmp_path, "10.1.0.2", "ctr1")
    plant(tmp_path, "10.1.0.3", "ctr1\r\neth0")
    delete(config, "ctr1", "eth0")
    assert files(tmp_path) == {"10.1.0.2": "ctr1"}


def test_del_works_with_a_range_config_that_no_longer_validates(tmp_path):
    add(make_config(tmp_path, SUBNET29), "ctr1")
    broken = make_config(tmp_path, [[{"subnet": "10.1.0.1/29"}]])
    delete(broken, "ctr1")
    assert files(tmp_path) == {}


# --- garbage collection ---------------------------------------------------------------------------

def test_collect_garbage(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    contents = {"10.1.0.2": "ctr1\r\neth0",     # valid: kept
                "10.1.0.3": "ctr2\r\neth0",     # not valid
                "10.1.0.4": "ctr1\r\neth1",     # valid container, other interface
                "10.1.0.5": "ctr1",             # legacy, valid container id: kept
                "10.1.0.6": "ctr3",             # legacy, stale
                "10.1.0.7": "",                 # empty (crash before the write)
                "fd00::1": "ctr1\r\neth",       # partial write of a valid attachment
                "fd00::2": "ctr1\r\n"}          # partial: ID of a valid container, no ifname
    for name, content in contents.items():
        plant(tmp_path, name, content)
    plant(tmp_path, "last_reserved_ip.0", "10.1.0.6")
    plant(tmp_path, "README", "not an address")
    with cb.Store(str(tmp_path), NETWORK) as store:
        assert cb.collect_garbage(store, {("ctr1", "eth0"), ("ctr9", "eth0")}) == []
    remaining = sorted(p.name for p in state_dir(tmp_path).iterdir())
    assert remaining == ["10.1.0.2", "10.1.0.5", "README", "fd00::2", "last_reserved_ip.0", "lock"]


def test_gc_through_the_plugin_function(tmp_path):
    config = make_config(tmp_path, SUBNET29, version="1.1.0")
    add(config, "keep")
    add(config, "drop")
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        gc = dict(config, **{key: [{"containerID": "keep", "ifname": "eth0"}]})
        cb.host_local_gc(make_request(gc, command="GC"))
    assert files(tmp_path) == {"10.1.0.2": "keep\r\neth0"}
    cb.host_local_gc(make_request(config, command="GC"))           # no list: nothing removed
    assert len(files(tmp_path)) == 1
    cb.host_local_gc(make_request(dict(config, **{"cni.dev/valid-attachments": []}), command="GC"))
    assert files(tmp_path) == {}


@pytest.mark.parametrize("name", ["fd00:0:0::5", "FD00::5", "::ffff:10.1.0.5"])
def test_gc_and_del_remove_reservations_spelled_non_canonically(tmp_path, name):
    """A reservation file whose name is another spelling of an address (hand-made, or another
    tool's) still blocks that address, so GC and DEL must be able to remove it."""
    config = make_config(tmp_path, [[{"subnet": "10.1.0.0/29"}], [{"subnet": "fd00::/64"}]])
    plant(tmp_path, name, "gone\r\neth0")
    with cb.Store(str(tmp_path), NETWORK) as store:
        assert cb.collect_garbage(store, set()) == []
    assert files(tmp_path) == {}
    plant(tmp_path, name, "ctr1\r\neth0")
    delete(config, "ctr1")
    assert files(tmp_path) == {}


@pytest.mark.parametrize("value", ["x", [1], {"containerID": "a"}])
def test_gc_malformed_list_is_code_7(tmp_path, value):
    config = dict(make_config(tmp_path, SUBNET29, version="1.1.0"), **{"cni.dev/valid-attachments": value})
    assert cni_error(cb.host_local_gc, make_request(config, command="GC")).code == 7


# --- store safety ---------------------------------------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("precious")
    return path


def test_store_refuses_symlinked_lock(tmp_path, victim):
    data_dir = tmp_path / "data"
    state_dir(data_dir).mkdir(parents=True)
    (state_dir(data_dir) / "lock").symlink_to(victim)
    err = cni_error(add, make_config(data_dir, SUBNET29))
    assert err.code == 5
    assert victim.read_text() == "precious"
    assert files(data_dir) == {}


def test_store_refuses_dangling_symlinked_lock(tmp_path):
    data_dir = tmp_path / "data"
    state_dir(data_dir).mkdir(parents=True)
    target = tmp_path / "created-through-symlink"
    (state_dir(data_dir) / "lock").symlink_to(target)
    cni_error(add, make_config(data_dir, SUBNET29))
    assert not target.exists()


def test_store_refuses_symlinked_network_directory(tmp_path):
    data_dir, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    data_dir.mkdir()
    elsewhere.mkdir()
    (data_dir / NETWORK).symlink_to(elsewhere)
    assert cni_error(add, make_config(data_dir, SUBNET29)).code == 5
    assert list(elsewhere.iterdir()) == []


def test_symlink_planted_as_reservation_is_not_followed(tmp_path, victim):
    data_dir = tmp_path / "data"
    state_dir(data_dir).mkdir(parents=True)
    (state_dir(data_dir) / "10.1.0.2").symlink_to(victim)
    (state_dir(data_dir) / "last_reserved_ip.0").symlink_to(victim)
    config = make_config(data_dir, SUBNET29)
    assert add(config, "ctr1") == ["10.1.0.3/29"]
    delete(config, "ctr1")
    plant(data_dir, "10.1.0.4", "ctr2\r\neth0")
    with cb.Store(str(data_dir), NETWORK) as store:
        cb.collect_garbage(store, set())
    assert victim.read_text() == "precious"
    assert (state_dir(data_dir) / "10.1.0.2").is_symlink()


def test_symlink_planted_as_temp_file_is_not_followed(tmp_path, victim):
    data_dir = tmp_path / "data"
    state_dir(data_dir).mkdir(parents=True)
    (state_dir(data_dir) / (".tmp-%d" % os.getpid())).symlink_to(victim)
    assert add(make_config(data_dir, SUBNET29)) == ["10.1.0.2/29"]
    assert victim.read_text() == "precious"
    assert files(data_dir) == {"10.1.0.2": "ctr1\r\neth0"}


def test_temp_files_of_a_crashed_plugin_are_cleaned(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    plant(tmp_path, ".tmp-999999", "ctr0\r\neth0")
    plant(tmp_path, ".tmp-1", "")
    with cb.Store(str(tmp_path), NETWORK) as store:
        assert store.reservations() == {}
    assert files(tmp_path) == {}
    plant(tmp_path, ".tmp-999999", "ctr0")
    add(config)
    assert files(tmp_path) == {"10.1.0.2": "ctr1\r\neth0"}


def test_reservation_files_are_complete_and_atomic(tmp_path):
    config = make_config(tmp_path, SUBNET29)
    add(config, "ctr1")
    path = state_dir(tmp_path) / "10.1.0.2"
    assert path.read_bytes() == b"ctr1\r\neth0"
    assert path.stat().st_nlink == 1                          # the temporary name is gone


def test_lock_contention_is_try_again(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "LOCK_TIMEOUT", 0.2)
    with cb.Store(str(tmp_path), NETWORK):
        err = cni_error(add, make_config(tmp_path, SUBNET29))
    assert err.code == 11
    assert add(make_config(tmp_path, SUBNET29)) == ["10.1.0.2/29"]


def test_store_creates_missing_data_dir(tmp_path):
    data_dir = tmp_path / "a" / "b"
    assert add(make_config(data_dir, SUBNET29)) == ["10.1.0.2/29"]
    assert (state_dir(data_dir) / "lock").is_file()


def test_unreadable_last_reserved_is_ignored(tmp_path):
    plant(tmp_path, "last_reserved_ip.0", "garbage")
    assert add(make_config(tmp_path, SUBNET29)) == ["10.1.0.2/29"]
    assert (state_dir(tmp_path) / "last_reserved_ip.0").read_text() == "10.1.0.2"
