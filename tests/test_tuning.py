"""Black-box tests of the tuning plugin in namespaces made by the test.

The container namespace holds a veth pair (`eth0` and its peer `peer0`, both inside it), as a
main plugin would leave it; the plugin runs inside a fresh "node" namespace.  What the kernel holds
is read back with `ip -j -d link` and /proc/sys inside the container namespace; saved values are
read from the temporary dataDir.  The differential tests run the reference Go tuning from
/usr/lib/cni (Debian 1.1.1: no txQLen) on the same config and compare kernel state and results.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

import cni_bridge as cb
from tests.helpers import IP, REF_DIR, cni_env, delete_netns, encode_conf, run_cni

pytestmark = pytest.mark.kernel

ORIGINAL_MAC = "02:00:00:aa:bb:01"
NEW_MAC = "c2:11:22:33:44:55"
# Sysctls the tests read back: CNI_IFNAME's own, namespace-wide, and another interface's.
WATCHED_SYSCTLS = ("net/ipv4/conf/eth0/forwarding", "net/ipv4/conf/eth0/rp_filter",
                   "net/ipv6/conf/eth0/accept_ra", "net/ipv4/ip_forward", "net/ipv4/conf/lo/forwarding",
                   "net/ipv4/conf/peer0/forwarding", "net/ipv4/tcp_rmem",
                   "net/ipv4/ip_default_ttl")


@pytest.fixture
def sandbox(container):
    """The container namespace with eth0 (peer0 its veth peer, also inside) at known values."""
    container.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    container.run("ip", "link", "set", "eth0", "address", ORIGINAL_MAC)
    return container


def prev_result(sandbox, version="1.0.0", host_name="eth0"):
    """A bridge-like prevResult; by default its host side shares the container interface's name
    (the reference then gives both the new MAC, we only the one in the sandbox)."""
    return {"cniVersion": version,
            "interfaces": [{"name": "cni0", "mac": "02:00:00:00:00:09"},
                           {"name": host_name, "mac": "02:00:00:00:00:0a"},
                           {"name": "eth0", "mac": ORIGINAL_MAC, "sandbox": sandbox.path}],
            "ips": [{"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.1.2.1"]}}


def tuning_conf(sandbox, data_dir, version="1.0.0", **keys):
    conf = {"cniVersion": version, "name": "cbttune", "type": "tuning", "dataDir": str(data_dir),
            "prevResult": prev_result(sandbox, version)}
    conf.update(keys)
    return conf


def call(bin_dir, command, conf, node, netns, **kwargs):
    return run_cni(bin_dir, "tuning", command, conf, node=node, netns=netns, **kwargs)


def assert_ok(res):
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    return res.json


def assert_error(res, code):
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert isinstance(res.json, dict) and res.json.get("code") == code, (res.stdout, res.stderr)
    assert isinstance(res.json.get("msg"), str) and res.json["msg"]
    assert "Traceback" not in res.stdout + res.stderr
    return res.json


def tunables(link):
    """The tunable attributes of one `ip -j -d link` entry."""
    return {"mac": link["address"], "mtu": link["mtu"], "txqlen": link.get("txqlen"),
            "promisc": "PROMISC" in link["flags"], "allmulti": "ALLMULTI" in link["flags"],
            "promiscuity": link.get("promiscuity"), "allmulti_count": link.get("allmulti")}


def link_state(ns, name="eth0"):
    return tunables(ns.links()[name])


def sysctls(ns):
    """The watched sysctls inside the namespace (as word lists: multi-value ones print tabs)."""
    lines = ns.run("cat", *["/proc/sys/" + key for key in WATCHED_SYSCTLS]).stdout.splitlines()
    assert len(lines) == len(WATCHED_SYSCTLS), lines
    return dict((key, line.split()) for key, line in zip(WATCHED_SYSCTLS, lines))


def kernel_state(ns):
    links = ns.links()
    return {"eth0": tunables(links["eth0"]), "peer0": tunables(links["peer0"]), "sysctl": sysctls(ns)}


def saved_files(data_dir):
    return dict((p.name, json.loads(p.read_text())) for p in Path(data_dir).iterdir())


def full_conf(sandbox, data_dir, version="1.0.0", txqlen=True):
    keys = {"mac": NEW_MAC, "mtu": 1400, "promisc": True, "allmulti": True,
            "sysctl": {"net.ipv4.conf.IFNAME.forwarding": "1",           # the reference's placeholder
                       "net/ipv6/conf/eth0/accept_ra": "0",              # slashes, the literal name
                       "net.ipv4.ip_default_ttl": "77",                  # namespace-wide
                       "net.ipv4.tcp_rmem": "4096 65536 1048576"}}       # multi-value (read back with tabs)
    if txqlen:
        keys["txQLen"] = 123
    return tuning_conf(sandbox, data_dir, version, **keys)


# --- every key, applied, checked, restored ---------------------------------------------------------

def test_every_key_applied_read_back_and_restored(ours_bin, node, sandbox, data_dir):
    before = kernel_state(sandbox)
    assert before["eth0"]["mtu"] == 1500 and before["sysctl"]["net/ipv4/conf/eth0/forwarding"] == ["0"]
    conf = full_conf(sandbox, data_dir)
    result = assert_ok(call(ours_bin, "ADD", conf, node, sandbox))

    eth0 = link_state(sandbox)
    assert eth0 == {"mac": NEW_MAC, "mtu": 1400, "txqlen": 123, "promisc": True, "allmulti": True,
                    "promiscuity": 1, "allmulti_count": 1}
    assert link_state(sandbox, "peer0") == before["peer0"]
    after = sysctls(sandbox)
    assert after["net/ipv4/conf/eth0/forwarding"] == ["1"]
    assert after["net/ipv6/conf/eth0/accept_ra"] == ["0"]
    assert after["net/ipv4/ip_default_ttl"] == ["77"]
    assert after["net/ipv4/tcp_rmem"] == ["4096", "65536", "1048576"]
    for untouched in ("net/ipv4/conf/lo/forwarding", "net/ipv4/conf/peer0/forwarding", "net/ipv4/conf/eth0/rp_filter",
                      "net/ipv4/ip_forward"):
        assert after[untouched] == before["sysctl"][untouched]

    # prevResult passed through; the new MAC on the container's eth0 only (not the host-side namesake).
    expected = prev_result(sandbox)
    expected["interfaces"][2]["mac"] = NEW_MAC
    assert result == expected

    # The originals, in the reference's file, plus CNI_IFNAME's own sysctls.
    saved = saved_files(data_dir)
    assert list(saved) == ["ctr1_eth0.json"]
    assert saved["ctr1_eth0.json"]["mac"] == ORIGINAL_MAC
    assert saved["ctr1_eth0.json"]["mtu"] == 1500
    assert saved["ctr1_eth0.json"]["promisc"] is False and saved["ctr1_eth0.json"]["allmulti"] is False
    assert saved["ctr1_eth0.json"]["txQLen"] == before["eth0"]["txqlen"]
    assert saved["ctr1_eth0.json"]["sysctl"] == {"net/ipv4/conf/eth0/forwarding": "0",
                                                 "net/ipv6/conf/eth0/accept_ra": "1"}

    assert_ok(call(ours_bin, "CHECK", conf, node, sandbox))

    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
    restored = kernel_state(sandbox)
    # Namespace-wide sysctls stay (as the reference: other attachments may rely on them).
    for key in ("net/ipv4/ip_default_ttl", "net/ipv4/tcp_rmem"):
        assert restored["sysctl"].pop(key) == after[key]
        before["sysctl"].pop(key)
    assert restored == before
    assert saved_files(data_dir) == {}
    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))     # twice
    assert kernel_state(sandbox)["eth0"] == before["eth0"]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.1.0"])
def test_prev_result_passed_through_in_each_version(ours_bin, node, sandbox, data_dir, version):
    conf = tuning_conf(sandbox, data_dir, version, mtu=1450)
    result = assert_ok(call(ours_bin, "ADD", conf, node, sandbox))
    assert result["cniVersion"] == version
    assert result["ips"][0]["address"] == "10.1.2.3/24"
    assert [i["mac"] for i in result["interfaces"]] == [i["mac"] for i in prev_result(sandbox)["interfaces"]]
    assert link_state(sandbox)["mtu"] == 1450


def test_overrides_in_the_reference_order(ours_bin, node, sandbox, data_dir):
    """mac < CNI_ARGS MAC < runtimeConfig.mac < args.cni.mac; args.cni keys override and merge."""
    macs = ["02:00:00:00:00:11", "02:00:00:00:00:12", "02:00:00:00:00:13", "02:00:00:00:00:14"]
    conf = tuning_conf(sandbox, data_dir, mac=macs[0], mtu=1400, runtimeConfig={"mac": macs[2]},
                       sysctl={"net.ipv4.conf.IFNAME.forwarding": "1"},
                       args={"cni": {"mac": macs[3], "mtu": 1300, "txQLen": 77, "promisc": True,
                                     "sysctl": {"net.ipv4.conf.IFNAME.rp_filter": "2"}}})
    assert_ok(call(ours_bin, "ADD", conf, node, sandbox, cni_args="IgnoreUnknown=1;MAC=" + macs[1]))
    state = link_state(sandbox)
    assert (state["mac"], state["mtu"], state["txqlen"], state["promisc"]) == (macs[3], 1300, 77, True)
    assert sandbox.sysctl("net/ipv4/conf/eth0/forwarding") == "1"
    assert sandbox.sysctl("net/ipv4/conf/eth0/rp_filter") == "2"
    del conf["args"]
    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
    assert link_state(sandbox)["mac"] == ORIGINAL_MAC
    conf["mac"] = macs[0]
    res = assert_ok(call(ours_bin, "ADD", conf, node, sandbox, cni_args="MAC=" + macs[1]))
    assert link_state(sandbox)["mac"] == macs[2] == res["interfaces"][2]["mac"]     # runtimeConfig wins
    del conf["runtimeConfig"]
    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
    assert_ok(call(ours_bin, "ADD", conf, node, sandbox, cni_args="MAC=" + macs[1].upper()))
    assert link_state(sandbox)["mac"] == macs[1]


def test_repeated_add_keeps_the_first_originals(ours_bin, node, sandbox, data_dir):
    for mtu in (1400, 1300):
        assert_ok(call(ours_bin, "ADD", tuning_conf(sandbox, data_dir, mtu=mtu), node, sandbox))
    assert link_state(sandbox)["mtu"] == 1300
    assert saved_files(data_dir)["ctr1_eth0.json"]["mtu"] == 1500
    assert_ok(call(ours_bin, "DEL", tuning_conf(sandbox, data_dir, mtu=1300), node, sandbox))
    assert link_state(sandbox)["mtu"] == 1500


def test_vlan_interface_name_with_a_dot(ours_bin, node, container, data_dir):
    """IFNAME stands for CNI_IFNAME even when the name holds dots (as VLAN interfaces' do)."""
    container.run("ip", "link", "add", "eth0.100", "type", "veth", "peer", "name", "peer0")
    conf = tuning_conf(container, data_dir, sysctl={"net.ipv4.conf.IFNAME.forwarding": "1"})
    assert_ok(call(ours_bin, "ADD", conf, node, container, ifname="eth0.100"))
    assert container.sysctl("net/ipv4/conf/eth0.100/forwarding") == "1"
    assert_ok(call(ours_bin, "DEL", conf, node, container, ifname="eth0.100"))
    assert container.sysctl("net/ipv4/conf/eth0.100/forwarding") == "0"


# --- hostile input: refused before anything changes --------------------------------------------------

HOSTILE = [
    ({"sysctl": {"kernel.hostname": "x"}}, "only net"),
    ({"sysctl": {"vm.swappiness": "1"}}, "only net"),
    ({"sysctl": {"net/../kernel/hostname": "x"}}, "must not be empty"),
    ({"sysctl": {"net.ipv4..ip_forward": "1"}}, "must not be empty"),
    ({"sysctl": {"net/ipv4/./ip_forward": "1"}}, "must not be empty"),
    ({"sysctl": {"net/ipv4/conf/eth0.100/forwarding": "1"}}, "names interface eth0.100"),
    ({"sysctl": {"/net/ipv4/ip_forward": "1"}}, "must not be empty"),
    ({"sysctl": {"net.ipv4.ip_forward.": "1"}}, "must not be empty"),
    ({"sysctl": {"net/ipv4/conf/../../../kernel/hostname": "x"}}, "must not be empty"),
    ({"sysctl": {"net.ipv4.conf.lo.forwarding": "1"}}, "names interface lo"),
    ({"sysctl": {"net.ipv4.conf.peer0.forwarding": "1"}}, "names interface peer0"),
    ({"sysctl": {"net.ipv6.neigh.peer0.retrans_time_ms": "100"}}, "names interface peer0"),
    ({"sysctl": {"net.ipv4.no_such_setting": "1"}}, "no sysctl"),
    ({"sysctl": {"net.ipv4.conf.IFNAME": "1"}}, "directory"),
    ({"sysctl": {"net.ipv4.ip_forward ": "1"}}, "spaces or control"),
    ({"sysctl": {"net.ipv4.ip_forward": "1\n0"}}, "non-printable"),
    ({"sysctl": {"net.ipv4.ip_forward": ""}}, "empty"),
    ({"sysctl": {"net.ipv4.ip_forward": ["1"]}}, "must be a string"),
    ({"sysctl": {"net.ipv4.conf.IFNAME.forwarding": "1", "net.ipv4.tcp_rmem": "x"}},
     "refused the value"),                                   # the second fails in the kernel: the first is undone
    ({"sysctl": ["net.ipv4.ip_forward"]}, "must be an object"),
    ({"mtu": 70000}, "outside the range of eth0"),
    ({"mtu": 20}, "outside the range of eth0"),
    ({"mtu": -1}, "between"),
    ({"mtu": 2 ** 40}, "between"),
    ({"mtu": "1400"}, "must be an integer"),
    ({"txQLen": -1}, "between"),
    ({"txQLen": 2 ** 32}, "between"),
    ({"mac": "ff:ff:ff:ff:ff:ff"}, "not a unicast"),
    ({"mac": "01:00:5e:00:00:01"}, "not a unicast"),
    ({"mac": "00:00:00:00:00:00"}, "not a unicast"),
    ({"mac": "c2:11:22:33:44"}, "invalid MAC"),
    ({"runtimeConfig": {"mac": "zz:11:22:33:44:55"}}, "invalid MAC"),
    ({"args": {"cni": {"mtu": 99999}}}, "outside the range"),
    ({"promisc": "yes"}, "must be a boolean"),
    ({"allmulti": 1}, "must be a boolean"),
    ({"dataDir": "relative/dir"}, "absolute path"),
]


@pytest.mark.parametrize("keys, message", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_config_refused_and_nothing_changed(ours_bin, node, sandbox, data_dir, keys, message):
    before = kernel_state(sandbox)
    conf = tuning_conf(sandbox, data_dir, mac=NEW_MAC, **keys) if "mac" not in keys else \
        tuning_conf(sandbox, data_dir, **keys)
    error = assert_error(call(ours_bin, "ADD", conf, node, sandbox), 7)
    assert message in error["msg"], error
    assert kernel_state(sandbox) == before
    assert not Path(data_dir).exists() or saved_files(data_dir) == {}


def test_duplicated_sysctl_key_refused(ours_bin, node, sandbox, data_dir):
    conf = json.dumps(tuning_conf(sandbox, data_dir, sysctl={"net.ipv4.ip_forward": "1"}))
    conf = conf.replace('"net.ipv4.ip_forward": "1"', '"net.ipv4.ip_forward": "1", "net.ipv4.ip_forward": "0"')
    before = kernel_state(sandbox)
    error = assert_error(call(ours_bin, "ADD", conf, node, sandbox), 7)
    assert "more than once" in error["msg"]
    assert kernel_state(sandbox) == before


def test_missing_prev_result_and_missing_interface(ours_bin, node, sandbox, data_dir):
    conf = tuning_conf(sandbox, data_dir, mtu=1400)
    del conf["prevResult"]
    assert "prevResult" in assert_error(call(ours_bin, "ADD", conf, node, sandbox), 7)["msg"]
    res = call(ours_bin, "ADD", tuning_conf(sandbox, data_dir, mtu=1400), node, sandbox, ifname="eth9")
    assert res.returncode != 0 and "eth9" in res.json["msg"]
    assert link_state(sandbox)["mtu"] == 1500
    assert not Path(data_dir).exists() or saved_files(data_dir) == {}


@pytest.mark.unit
def test_resolver_never_leaves_net():
    """In-process: every refused shape, and the paths the accepted ones map to."""
    assert cb.resolve_sysctl("net.ipv4.conf.IFNAME.forwarding", "eth0.100") == ("net/ipv4/conf/eth0.100/forwarding", True)
    assert cb.resolve_sysctl("net/ipv4/conf/eth0.100/forwarding", "eth0.100") == ("net/ipv4/conf/eth0.100/forwarding", True)
    assert cb.resolve_sysctl("net/ipv4/conf/all/forwarding", "eth0") == ("net/ipv4/conf/all/forwarding", False)
    assert cb.resolve_sysctl("net.ipv6.neigh.default.gc_thresh1", "eth0") == ("net/ipv6/neigh/default/gc_thresh1", False)
    assert cb.resolve_sysctl("net.core.somaxconn", "eth0") == ("net/core/somaxconn", False)
    for key in ("net", "net.", "..", "net/..", "net/./ipv4", "proc.sys.net", "kernel/../net/x", "net\0x",
                "net.ipv4.conf.eth1.forwarding", "net.mpls.conf.lo.input", "net/ipv4/conf/eth0.1/forwarding",
                "net/ipv4/conf/eth0/../../../kernel", "", "net.ipv4\t.x", "n" * 300):
        with pytest.raises(cb.CNIError) as err:
            cb.resolve_sysctl(key, "eth0")
        assert err.value.code == 7, key


@pytest.mark.unit
def test_allowlist_of_the_reference(tmp_path, monkeypatch):
    allowlist = tmp_path / "allowlist.conf"
    allowlist.write_text("^net\\.ipv4\\.conf\\.IFNAME\\.[a-z_]*$\n\n  ^net\\.core\\.somaxconn$ \n")
    monkeypatch.setattr(cb, "TUNING_ALLOWLIST", str(allowlist))
    cb.check_sysctl_allowlist({"net.ipv4.conf.IFNAME.forwarding": "1", "net.core.somaxconn": "10"})
    with pytest.raises(cb.CNIError) as err:
        cb.check_sysctl_allowlist({"net.ipv4.ip_forward": "1"})
    assert err.value.code == 7 and "not allowed" in err.value.msg
    monkeypatch.setattr(cb, "TUNING_ALLOWLIST", str(tmp_path / "absent"))
    cb.check_sysctl_allowlist({"net.ipv4.ip_forward": "1"})


# --- CHECK, DEL, GC, STATUS ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (["ip", "link", "set", "eth0", "mtu", "1500"], "MTU"),
    (["ip", "link", "set", "eth0", "address", ORIGINAL_MAC], "MAC"),
    (["ip", "link", "set", "eth0", "promisc", "off"], "promiscuous"),
    (["ip", "link", "set", "eth0", "allmulticast", "off"], "all-multicast"),
    (["ip", "link", "set", "eth0", "txqueuelen", "500"], "transmit queue"),
    (["sh", "-c", "echo 0 > /proc/sys/net/ipv4/conf/eth0/forwarding"], "forwarding"),
    (["ip", "link", "del", "eth0"], "eth0"),
])
def test_check_catches_a_changed_value(ours_bin, node, sandbox, data_dir, change, message):
    conf = full_conf(sandbox, data_dir)
    conf["sysctl"] = {"net.ipv4.conf.IFNAME.forwarding": "1", "net.ipv4.tcp_rmem": "4096 65536 1048576"}
    assert_ok(call(ours_bin, "ADD", conf, node, sandbox))
    assert_ok(call(ours_bin, "CHECK", conf, node, sandbox))
    sandbox.run(*change)
    res = call(ours_bin, "CHECK", conf, node, sandbox)
    assert res.returncode != 0 and message in res.json["msg"], res


def test_del_with_namespace_gone_and_twice(ours_bin, node, make_netns, data_dir):
    ns = make_netns("ct")
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    conf = tuning_conf(ns, data_dir, mtu=1400, sysctl={"net.ipv4.conf.IFNAME.forwarding": "1"})
    assert_ok(call(ours_bin, "ADD", conf, node, ns))
    assert list(saved_files(data_dir)) == ["ctr1_eth0.json"]
    delete_netns(ns.name)
    assert_ok(call(ours_bin, "DEL", conf, node, ns))
    assert saved_files(data_dir) == {}
    assert_ok(call(ours_bin, "DEL", conf, node, ns))
    assert_ok(call(ours_bin, "DEL", conf, node, None))        # no CNI_NETNS at all


def test_del_with_interface_gone(ours_bin, node, sandbox, data_dir):
    conf = tuning_conf(sandbox, data_dir, mtu=1400)
    assert_ok(call(ours_bin, "ADD", conf, node, sandbox))
    sandbox.run("ip", "link", "del", "eth0")
    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
    assert saved_files(data_dir) == {}


def test_gc_forgets_only_this_networks_stale_attachments(ours_bin, node, make_netns, data_dir):
    spaces = {}
    for cid in ("ctrA", "ctrB"):
        ns = spaces[cid] = make_netns("ct")
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        assert_ok(call(ours_bin, "ADD", tuning_conf(ns, data_dir, mtu=1400), node, ns, container_id=cid))
    foreign = Path(data_dir) / "ctrZ_eth0.json"           # the reference's file: no network named
    foreign.write_text('{"mtu": 1500}')
    other = Path(data_dir) / "ctrY_eth0.json"
    other.write_text(json.dumps({"mtu": 1500, "network": "another", "containerID": "ctrY", "ifname": "eth0"}))
    killed = Path(data_dir) / ".tmp-4242-ctrQ_eth0.json"       # a write cut short by SIGKILL, long ago
    killed.write_text("{")
    os.utime(str(killed), (time.time() - 3600, time.time() - 3600))
    writing = Path(data_dir) / ".tmp-4243-ctrR_eth0.json"      # an ADD writing right now
    writing.write_text("{")
    gc = {"cniVersion": "1.1.0", "name": "cbttune", "type": "tuning", "dataDir": str(data_dir),
          "cni.dev/valid-attachments": [{"containerID": "ctrA", "ifname": "eth0"}]}
    assert_ok(run_cni(ours_bin, "tuning", "GC", gc, node=node, container_id=None, ifname=None))
    assert sorted(p.name for p in Path(data_dir).iterdir()) == [
        writing.name, "ctrA_eth0.json", "ctrY_eth0.json", "ctrZ_eth0.json"]
    status = dict(gc)
    del status["cni.dev/valid-attachments"]
    assert_ok(run_cni(ours_bin, "tuning", "STATUS", status, node=node, container_id=None, ifname=None))


# --- against the reference -----------------------------------------------------------------------------

@pytest.fixture
def ref_tuning(ref_bin):
    if not (REF_DIR / "tuning").is_file():
        pytest.skip("reference tuning not installed: apt-get install containernetworking-plugins")
    return REF_DIR


def comparable(result):
    """A result without the empty "dns" the reference prints and we leave out (both are valid)."""
    result = dict(result)
    if result.get("dns") == {}:
        del result["dns"]
    return result


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_differential_against_reference(ours_bin, ref_tuning, node, make_netns, tmp_path, version):
    """Same config through ours and the reference, each on its own fresh container: the same kernel
    state after ADD, the same result, the same saved link values, the same state after DEL."""
    outcome = {}
    for name, bin_dir in (("ours", ours_bin), ("ref", ref_tuning)):
        ns = make_netns("ct")
        ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        ns.run("ip", "link", "set", "eth0", "address", ORIGINAL_MAC)
        ns.run("ip", "link", "set", "peer0", "address", "02:00:00:aa:bb:02")
        data_dir = tmp_path / name
        conf = full_conf(ns, data_dir, version, txqlen=False)
        conf["prevResult"] = prev_result(ns, version, host_name="veth1234")
        before = kernel_state(ns)
        result = assert_ok(call(bin_dir, "ADD", conf, node, ns))
        result["interfaces"][2]["sandbox"] = "SANDBOX"
        after_add = kernel_state(ns)
        saved = saved_files(data_dir)["ctr1_eth0.json"]
        if name == "ours":       # Debian's 1.1.1 CHECK misreads IFNAME keys (fixed upstream in 5b7a263)
            assert_ok(call(bin_dir, "CHECK", conf, node, ns))
        assert_ok(call(bin_dir, "DEL", conf, node, ns))
        after_del = kernel_state(ns)
        outcome[name] = (before, after_add, comparable(result),
                         dict((k, saved[k]) for k in ("mac", "mtu", "promisc", "allmulti")),
                         saved_files(data_dir), after_del["eth0"], after_del["peer0"])
        # DEL: ours also restores CNI_IFNAME's own sysctls, the reference leaves them as ADD set them.
        own = ("net/ipv4/conf/eth0/forwarding", "net/ipv6/conf/eth0/accept_ra")
        for key in own:
            assert after_del["sysctl"][key] == (before if name == "ours" else after_add)["sysctl"][key]
        assert dict((k, v) for k, v in after_del["sysctl"].items() if k not in own) == \
            dict((k, v) for k, v in after_add["sysctl"].items() if k not in own)
    assert outcome["ours"] == outcome["ref"]


@pytest.mark.parametrize("adder, deleter", [("ours", "ref"), ("ref", "ours")])
def test_each_side_restores_the_others_add(ours_bin, ref_tuning, node, sandbox, data_dir, adder, deleter):
    bins = {"ours": ours_bin, "ref": ref_tuning}
    conf = full_conf(sandbox, data_dir, txqlen=False)
    conf["sysctl"] = {"net.ipv4.ip_forward": "1"}
    before = link_state(sandbox)
    assert_ok(call(bins[adder], "ADD", conf, node, sandbox))
    assert link_state(sandbox)["mac"] == NEW_MAC
    assert_ok(call(bins[deleter], "DEL", conf, node, sandbox))
    assert link_state(sandbox) == before
    assert saved_files(data_dir) == {}


def test_chained_after_our_bridge(ours_bin, node, container, data_dir):
    """bridge then tuning, as podman's default chain runs them: tuning takes bridge's result."""
    bridge_conf = {"cniVersion": "1.0.0", "name": "cbttune", "type": "bridge", "bridge": "cbt-tune0",
                   "ipam": {"type": "host-local", "subnet": "10.99.7.0/24", "dataDir": str(data_dir / "ipam")}}
    added = assert_ok(run_cni(ours_bin, "bridge", "ADD", bridge_conf, node=node, netns=container))
    conf = {"cniVersion": "1.0.0", "name": "cbttune", "type": "tuning", "dataDir": str(data_dir / "tuning"),
            "mac": NEW_MAC, "mtu": 1400, "sysctl": {"net.ipv4.conf.IFNAME.arp_notify": "1"}, "prevResult": added}
    result = assert_ok(call(ours_bin, "ADD", conf, node, container))
    host, inside = result["interfaces"][1], result["interfaces"][2]
    assert inside["sandbox"] == container.path and inside["mac"] == NEW_MAC
    assert host["mac"] == added["interfaces"][1]["mac"]
    assert result["ips"] == added["ips"]
    assert link_state(container)["mac"] == NEW_MAC and link_state(container)["mtu"] == 1400
    assert container.sysctl("net/ipv4/conf/eth0/arp_notify") == "1"
    conf["prevResult"] = result
    assert_ok(call(ours_bin, "CHECK", conf, node, container))
    assert_ok(call(ours_bin, "DEL", conf, node, container))
    assert link_state(container)["mac"] == added["interfaces"][2]["mac"]
    assert_ok(run_cni(ours_bin, "bridge", "DEL", bridge_conf, node=node, netns=container))
    assert "eth0" not in container.links()


@pytest.mark.slow
def test_add_killed_at_any_instant_then_del_restores(ours_bin, node, sandbox, data_dir):
    """ADDs killed with SIGKILL at random instants: the values are saved before anything changes,
    so DEL always brings eth0 and its sysctls back, and leaves no saved file (a temporary file
    of a write cut short is GC's, after a minute)."""
    rng = random.Random(1616)
    conf = full_conf(sandbox, data_dir)
    before = kernel_state(sandbox)
    own = ("net/ipv4/conf/eth0/forwarding", "net/ipv6/conf/eth0/accept_ra")
    argv = [IP, "netns", "exec", node.name, str(ours_bin / "tuning")]
    started = time.monotonic()
    assert_ok(call(ours_bin, "ADD", conf, node, sandbox))
    duration = time.monotonic() - started
    assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
    for attempt in range(12):
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=cni_env("ADD", ours_bin, netns=sandbox))
        proc.stdin.write(encode_conf(conf))
        proc.stdin.close()
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert_ok(call(ours_bin, "DEL", conf, node, sandbox))
        after = kernel_state(sandbox)
        assert after["eth0"] == before["eth0"], attempt
        for key in own:
            assert after["sysctl"][key] == before["sysctl"][key], (attempt, key)
        left = [p.name for p in Path(data_dir).iterdir()] if Path(data_dir).exists() else []
        assert all(name.startswith(".tmp-") for name in left), (attempt, left)


# --- generated keys: never a write outside the container's net sysctls -------------------------------

KEY_PIECES = ["net", "ipv4", "ipv6", "conf", "neigh", "IFNAME", "eth0", "lo", "peer0", "all", "default",
              "forwarding", "ip_forward", "kernel", "hostname", "vm", "..", ".", "", "proc", "sys", "\n", " ",
              "eth0.100", "mpls", "core", "somaxconn", "x" * 40]
NODE_WATCHED = ("net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/lo/forwarding",
                "net/core/somaxconn")


@pytest.mark.slow
def test_generated_sysctl_keys(ours_bin, node, sandbox, tmp_path):
    """Keys built from net.* pieces, path climbing and other subsystems, joined by '.' or '/':
    every call answers with a result or one CNI error; a refused ADD changes nothing in the
    container; nothing in the node namespace or outside /proc/sys/net ever changes."""
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
    st = hypothesis.strategies
    hostname = Path("/proc/sys/kernel/hostname").read_text()
    node_before = dict((key, node.sysctl(key)) for key in NODE_WATCHED)
    calls = []

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(pieces=st.lists(st.sampled_from(KEY_PIECES), min_size=1, max_size=7),
                      separator=st.sampled_from([".", "/"]), value=st.sampled_from(["0", "1", "2", "-1", "x", "1 2"]))
    def exercise(pieces, separator, value):
        key = separator.join(pieces)
        data_dir = tmp_path / ("d%d" % len(calls))
        calls.append(key)
        before = kernel_state(sandbox)
        added = call(ours_bin, "ADD", tuning_conf(sandbox, data_dir, sysctl={key: value}), node, sandbox)
        assert "Traceback" not in added.stdout + added.stderr
        assert isinstance(added.json, dict), added
        if added.returncode != 0:
            assert type(added.json.get("code")) is int and added.json.get("msg"), added
            assert kernel_state(sandbox) == before, key
        assert_ok(call(ours_bin, "DEL", tuning_conf(sandbox, data_dir, sysctl={key: value}), node, sandbox))
        assert not data_dir.exists() or saved_files(data_dir) == {}

    exercise()
    assert len(calls) >= 20
    assert Path("/proc/sys/kernel/hostname").read_text() == hostname
    assert dict((key, node.sysctl(key)) for key in NODE_WATCHED) == node_before


HEAVY = ("os", "json", "re", "socket", "subprocess", "ipaddress", "hashlib", "ctypes", "base64", "shutil")
LIST_MODULES = (
    "import sys; sys.path.insert(0, sys.argv[1]); import cni_bridge as cb; "
    "status = cb.run_plugin('tuning', cb.process_environment()); "
    "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); sys.exit(status)")


def test_add_check_del_import_no_heavy_module(ours_bin, node, sandbox, data_dir):
    """Start-up is paid at every container start: tuning's paths load none of the heavy modules
    (`re` only when the reference's allowlist file exists)."""
    conf = full_conf(sandbox, data_dir)
    for command in ("ADD", "CHECK", "DEL"):
        argv = [IP, "netns", "exec", node.name, "/usr/bin/python3", "-IS", "-c", LIST_MODULES,
                str(ours_bin / "cni-bridge.pyz")]
        proc = subprocess.run(argv, input=encode_conf(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=60, env=cni_env(command, ours_bin, netns=sandbox))
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        line = [text for text in proc.stderr.decode().splitlines() if text.startswith("MODULES ")][-1]
        loaded = set(line.split()[1:])
        assert loaded.isdisjoint(HEAVY), (command, sorted(loaded & set(HEAVY)))
    assert link_state(sandbox)["mac"] == ORIGINAL_MAC


@pytest.mark.unit
def test_failed_add_puts_back_what_it_changed(sandbox, data_dir, monkeypatch):
    """In-process: the kernel refusing a later link change (all-multicast, after the MAC,
    promiscuous mode and MTU were set, and the sysctls written) undoes all of it and leaves no
    saved file."""
    conf = full_conf(sandbox, data_dir)
    raw = json.dumps(conf).encode()
    request = cb.Request("ADD", "ctr1", sandbox.path, "eth0", {}, "/nonexistent", json.loads(raw),
                         "1.0.0", stdin=raw)
    real = cb.set_link_tunable
    done = []

    def refusing(nl, link, key, value):
        if key == "allmulti" and value:
            raise cb.NetlinkError(95, "failed to set the all-multicast mode of eth0")   # EOPNOTSUPP
        real(nl, link, key, value)
        done.append(key)
    monkeypatch.setattr(cb, "set_link_tunable", refusing)
    before = kernel_state(sandbox)
    with pytest.raises(cb.CNIError) as err:
        cb.tuning_add(request)
    assert "all-multicast" in err.value.msg
    assert done[:3] == ["mac", "promisc", "mtu"]           # then undone, in reverse
    assert kernel_state(sandbox) == before
    assert saved_files(data_dir) == {}


@pytest.mark.unit
def test_link_change_sets_only_the_flags_asked_for():
    request = cb.link_change(7, allmulti=True, promisc=False)
    assert request.header == {"index": 7, "flags": cb.IFF_ALLMULTI, "change": cb.IFF_ALLMULTI | cb.IFF_PROMISC}
    request = cb.link_change(7, extra=((cb.LinkAttr.IFLA_TXQLEN, 5),))
    assert request.header["change"] == 0 and list(request.attrs) == [(cb.LinkAttr.IFLA_TXQLEN, 5)]
