"""The firewall plugin (issue 16): the reference's iptables layout in table filter, proved on the kernel.

Every test works in namespaces it makes: a "node" namespace whose FORWARD policy is DROP (as Docker
leaves it), where `bridge` and `firewall` run, container namespaces on the node's bridges and, for
traffic, a "remote" namespace: an outside host on its own link of the node (198.51.100.0/24, routed
back through the node without masquerading).  What the plugin wrote is read back with
`iptables-save`/`ip6tables-save` and `iptables -C` (iptables-nft must take our rules for its own),
`nft -j list ruleset`, and real traffic (ping, bounded by -W).
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import cni_bridge as cb
from tests.helpers import IP, REF_DIR, cni_env, encode_conf, run, run_cni

NET = "fwnet"
BRIDGE = "fw0"
SUBNET = "10.77.0.0/24"
UPLINK_NODE, UPLINK_REMOTE = "198.51.100.1", "198.51.100.2"
TIMEOUT = 60
ATTACHMENT_COMMENT = re.compile(r' -m comment --comment "CNI firewall plugin rules of [0-9a-f]{16}-[0-9a-f]{16}'
                                r'[^"]*"')


def iptables_available():
    return shutil.which("iptables-save") is not None


# Tests without a tier of their own are `kernel` (conftest); the unit ones at the end need no root.
pytestmark = pytest.mark.skipif(not iptables_available(),
                                reason="iptables (the reading side of these tests) is not installed")


# --- helpers -------------------------------------------------------------------------------------

def drop_forwarding(node):
    """The node forwards, but its FORWARD policy drops (as Docker leaves a node)."""
    node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    node.run("iptables", "-P", "FORWARD", "DROP")
    node.run("ip6tables", "-P", "FORWARD", "DROP")


def bridge_conf(data_dir, network=NET, bridge=BRIDGE, subnet=SUBNET):
    return {"cniVersion": "1.0.0", "name": network, "type": "bridge", "bridge": bridge, "isGateway": True,
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "subnet": subnet,
                     "routes": [{"dst": "0.0.0.0/0"}]}}


def firewall_conf(prev, network=NET, version="1.0.0", **keys):
    conf = {"cniVersion": version, "name": network, "type": "firewall", "prevResult": prev}
    conf.update(keys)
    return conf


def fake_result(*addresses, bridge=BRIDGE):
    """A bridge-like prevResult holding `addresses` (CIDRs)."""
    return {"cniVersion": "1.0.0",
            "interfaces": [{"name": bridge, "mac": "02:00:00:00:00:01"},
                           {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": a, "interface": 1} for a in addresses]}


def call(bin_dir, plugin, command, conf, node, cid="ctr1", netns="/var/run/netns/none", **kwargs):
    return run_cni(bin_dir, plugin, command, conf, node=node, netns=netns, container_id=cid,
                   timeout=TIMEOUT, **kwargs)


def ok(res):
    assert res.returncode == 0, "failed (%d): %s %s" % (res.returncode, res.stdout, res.stderr)
    return res.json


def attach(bin_dir, node, container, data_dir, cid, **bridge_keys):
    """ADD `bridge` for `container`; returns its result."""
    return ok(call(bin_dir, "bridge", "ADD", bridge_conf(data_dir, **bridge_keys), node, cid, netns=container))


def add_remote(make_netns, node):
    """An outside host on the node's link uplink0, routing back through the node."""
    remote = make_netns("remote")
    run([IP, "-n", node.name, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", remote.name])
    run([IP, "-n", node.name, "addr", "add", UPLINK_NODE + "/24", "dev", "uplink0"])
    run([IP, "-n", node.name, "link", "set", "uplink0", "up"])
    run([IP, "-n", remote.name, "addr", "add", UPLINK_REMOTE + "/24", "dev", "eth0"])
    run([IP, "-n", remote.name, "link", "set", "eth0", "up"])
    run([IP, "-n", remote.name, "route", "add", "default", "via", UPLINK_NODE])
    return remote


def pings(source, address, count=1):
    """Whether `source` gets an echo reply from `address` (bounded: about 1 s per try)."""
    for _ in range(count):
        if source.run("ping", "-c", "1", "-W", "1", address, check=False).returncode == 0:
            return True
    return False


def saved(node, family=4):
    """iptables-save (or ip6tables-save) of table filter in `node`, without its comment lines."""
    program = "iptables-save" if family == 4 else "ip6tables-save"
    proc = node.run(program, "-t", "filter")
    assert "Warning" not in proc.stderr and "unknown" not in proc.stdout, proc.stderr + proc.stdout
    return [line for line in proc.stdout.splitlines() if not line.startswith("#")]


def rules(node, family=4):
    return [line for line in saved(node, family) if line.startswith("-A ")]


def address_rules(node, family=4):
    return [line for line in rules(node, family) if line.startswith("-A CNI-FORWARD -") and " -j ACCEPT" in line
            and ("-d " in line or "-s " in line)]


def addr_of(result):
    return result["ips"][0]["address"].split("/")[0]


def has_filter_table(node, family=4):
    out = node.run("nft", "-j", "list", "tables").stdout
    tables = [t["table"] for t in json.loads(out)["nftables"] if "table" in t]
    return any(t["name"] == "filter" and t["family"] == ("ip" if family == 4 else "ip6") for t in tables)


# --- traffic -------------------------------------------------------------------------------------

def test_forward_drop_passes_after_add_and_stops_after_del(ours_bin, make_netns, data_dir):
    node, container = make_netns("node"), make_netns("ct")
    drop_forwarding(node)
    remote = add_remote(make_netns, node)
    result = attach(ours_bin, node, container, data_dir, "c1")
    assert not pings(container, UPLINK_REMOTE), "FORWARD DROP should stop the container before firewall ADD"
    added = ok(call(ours_bin, "firewall", "ADD", firewall_conf(result), node, "c1", netns=container))
    assert added["ips"] == result["ips"] and added["interfaces"] == result["interfaces"]
    assert pings(container, UPLINK_REMOTE, count=3), "outgoing traffic and its replies must pass after ADD"
    # Only replies are let in: a connection the remote starts stays dropped (the reference's rule).
    assert not pings(remote, addr_of(result))
    ok(call(ours_bin, "firewall", "CHECK", firewall_conf(result), node, "c1", netns=container))
    ok(call(ours_bin, "firewall", "DEL", firewall_conf(result), node, "c1", netns=container))
    assert address_rules(node) == []
    assert not pings(container, UPLINK_REMOTE)


def test_ipv6_forward_drop_passes_after_add(ours_bin, make_netns, data_dir):
    node, container = make_netns("node"), make_netns("ct")
    drop_forwarding(node)
    remote = add_remote(make_netns, node)
    run([IP, "-n", node.name, "addr", "add", "2001:db8:51::1/64", "dev", "uplink0", "nodad"])
    run([IP, "-n", remote.name, "addr", "add", "2001:db8:51::2/64", "dev", "eth0", "nodad"])
    run([IP, "-n", remote.name, "-6", "route", "add", "default", "via", "2001:db8:51::1"])
    conf = bridge_conf(data_dir)
    conf["ipam"] = {"type": "host-local", "dataDir": str(data_dir),
                    "ranges": [[{"subnet": SUBNET}], [{"subnet": "fd77::/64"}]],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}
    result = ok(call(ours_bin, "bridge", "ADD", conf, node, "c6", netns=container))
    assert not pings(container, "2001:db8:51::2")
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(result), node, "c6", netns=container))
    assert pings(container, "2001:db8:51::2", count=3), "IPv6 traffic and its replies must pass after ADD"
    assert pings(container, UPLINK_REMOTE)
    assert len(address_rules(node, 6)) == 2
    ok(call(ours_bin, "firewall", "DEL", firewall_conf(result), node, "c6", netns=container))
    assert address_rules(node, 6) == [] and not pings(container, "2001:db8:51::2")


@pytest.mark.parametrize("policy", ["same-bridge", "isolated"])
def test_ingress_policy_blocks_another_bridge(ours_bin, make_netns, data_dir, policy):
    node = make_netns("node")
    drop_forwarding(node)
    one, two = make_netns("ct"), make_netns("ct")
    first = attach(ours_bin, node, one, data_dir, "a1")
    second = attach(ours_bin, node, two, data_dir, "b1", network="fwnet2", bridge="fw1", subnet="10.78.0.0/24")
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(first), node, "a1", netns=one))
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(second, network="fwnet2"), node, "b1", netns=two))
    assert pings(one, addr_of(second)), "open policy: the bridges reach each other (control)"
    # As with Docker's networks, bridges with the policy keep each other out.
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(first, ingressPolicy=policy), node, "a1", netns=one))
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(second, network="fwnet2", ingressPolicy=policy),
            node, "b1", netns=two))
    assert not pings(one, addr_of(second)), "%s must keep the other bridge's container out" % policy
    assert not pings(two, addr_of(first))
    assert pings(two, "10.78.0.1"), "its own gateway stays reachable"
    lines = rules(node)
    stage1 = [l for l in lines if l.startswith("-A CNI-ISOLATION-STAGE-1 ")]
    assert '-A CNI-ISOLATION-STAGE-1 -i fw1 ! -o fw1 -m comment --comment "CNI firewall plugin rules ' \
           '(ingressPolicy: %s)" -j CNI-ISOLATION-STAGE-2' % policy in stage1
    assert any(" -i fw1 -o fw1 " in l and l.endswith("-j DROP") for l in stage1) == (policy == "isolated")
    assert stage1[-1].endswith("-j RETURN")
    assert lines.index([l for l in lines if l.endswith("-j CNI-ISOLATION-STAGE-1")][0]) < \
        lines.index([l for l in lines if l.endswith("-j CNI-FORWARD")][0]), "isolation is checked first"


# --- what iptables reads back ----------------------------------------------------------------------

def test_iptables_reads_our_rules_as_its_own(ours_bin, node):
    drop_forwarding(node)
    prev = fake_result("10.77.0.5/24", "fd77::5/64")
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(prev, ingressPolicy="isolated"), node))
    for family, address in ((4, "10.77.0.5/32"), (6, "fd77::5/128")):
        program = "iptables" if family == 4 else "ip6tables"
        lines = saved(node, family)
        assert ":FORWARD DROP [0:0]" in lines, "the operator's policy is left alone"
        comment = [l for l in address_rules(node, family) if "-s " in l][0].split('--comment "')[1].split('"')[0]
        assert comment.startswith("CNI firewall plugin rules of ") and "net: fwnet, if: eth0, id: ctr1" in comment
        # iptables -C finds each rule from its command line: the encodings are iptables-nft's own.
        for spec in (["FORWARD", "-m", "comment", "--comment", "CNI firewall plugin rules", "-j", "CNI-FORWARD"],
                     ["CNI-FORWARD", "-m", "comment", "--comment", "CNI firewall plugin admin overrides",
                      "-j", "CNI-ADMIN"],
                     ["CNI-FORWARD", "-d", address, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                      "-m", "comment", "--comment", comment, "-j", "ACCEPT"],
                     ["CNI-FORWARD", "-s", address, "-m", "comment", "--comment", comment, "-j", "ACCEPT"],
                     ["CNI-ISOLATION-STAGE-1", "-i", BRIDGE, "-o", BRIDGE, "-m", "comment", "--comment",
                      "CNI firewall plugin rules (ingressPolicy: isolated)", "-j", "DROP"],
                     ["CNI-ISOLATION-STAGE-2", "-o", BRIDGE, "-m", "comment", "--comment",
                      "CNI firewall plugin rules (ingressPolicy: same-bridge|isolated)", "-j", "DROP"]):
            node.run(program, "-C", *spec)
        verbose = node.run(program, "-L", "CNI-FORWARD", "-v", "-n").stdout
        assert "ctstate RELATED,ESTABLISHED" in verbose and comment in verbose
        # The whole table goes through iptables-restore's parser.
        node.run(program + "-restore", "--test", input="\n".join(lines) + "\n")
    # A second ADD of the same attachment changes nothing.
    before = saved(node), saved(node, 6)
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(prev, ingressPolicy="isolated"), node))
    assert (saved(node), saved(node, 6)) == before


def test_no_filter_table_gets_what_iptables_nft_creates(ours_bin, node):
    """A node with no iptables tables at all: ADD creates table filter with an accepting FORWARD."""
    assert not has_filter_table(node)
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(fake_result("10.77.0.9/24")), node))
    assert has_filter_table(node) and not has_filter_table(node, 6)
    assert ":FORWARD ACCEPT [0:0]" in saved(node)
    assert len(address_rules(node)) == 2


def test_differential_against_reference(ours_bin, make_netns):
    if not (REF_DIR / "firewall").is_file():
        pytest.skip("reference firewall plugin not installed")
    prev = fake_result("10.77.0.5/24", "fd77::5/64")
    outputs = {}
    for who, bin_dir in (("ref", REF_DIR), ("ours", ours_bin)):
        node = make_netns("node")
        drop_forwarding(node)
        conf = firewall_conf(prev, ingressPolicy="same-bridge")
        added = ok(call(bin_dir, "firewall", "ADD", conf, node))
        tables = []
        for family in (4, 6):
            text = "\n".join(saved(node, family))
            text = ATTACHMENT_COMMENT.sub("", text)       # ours name their attachment; the reference's do not
            # Debian's 1.1.1 comments the shared rules "(ingressPolicy: same-bridge)", HEAD as below.
            tables.append(text.replace("(ingressPolicy: same-bridge|isolated)", "(ingressPolicy: same-bridge)"))
        outputs[who] = (added, tables)
    assert outputs["ours"][1] == outputs["ref"][1]
    # The result is prevResult passed through (an empty "dns" is optional in 1.0.0).
    assert {k: v for k, v in outputs["ours"][0].items() if v != {}} == \
        {k: v for k, v in outputs["ref"][0].items() if v != {}}


def test_reference_and_ours_remove_each_others_rules(ours_bin, node):
    if not (REF_DIR / "firewall").is_file():
        pytest.skip("reference firewall plugin not installed")
    drop_forwarding(node)
    prev = fake_result("10.77.0.5/24")
    conf = firewall_conf(prev)
    ok(call(REF_DIR, "firewall", "ADD", conf, node))
    assert len(address_rules(node)) == 2
    ok(call(ours_bin, "firewall", "ADD", conf, node))      # both sides' rules now
    assert len(address_rules(node)) == 4
    ok(call(ours_bin, "firewall", "DEL", conf, node))      # ours removes both (the reference's by prevResult)
    assert address_rules(node) == []
    # The reference deletes by exact rule text, which has no comment: it leaves ours (README).
    ok(call(ours_bin, "firewall", "ADD", conf, node))
    ok(call(REF_DIR, "firewall", "DEL", conf, node))
    assert len(address_rules(node)) == 2
    ok(call(ours_bin, "firewall", "DEL", dict(conf, prevResult=None), node))
    assert address_rules(node) == []


def test_after_the_reference_no_shared_rule_gets_a_twin(ours_bin, node):
    """Debian's reference comments the shared isolation rules "(ingressPolicy: same-bridge)";
    ours count them as present, so FORWARD keeps one jump to each chain."""
    if not (REF_DIR / "firewall").is_file():
        pytest.skip("reference firewall plugin not installed")
    drop_forwarding(node)
    conf = firewall_conf(fake_result("10.77.0.5/24"), ingressPolicy="same-bridge")
    ok(call(REF_DIR, "firewall", "ADD", conf, node, "r1"))
    ok(call(ours_bin, "firewall", "ADD", dict(conf, prevResult=fake_result("10.77.0.6/24")), node, "o1"))
    lines = rules(node)
    for target in ("CNI-FORWARD", "CNI-ISOLATION-STAGE-1"):
        assert len([l for l in lines if l.startswith("-A FORWARD ") and l.endswith("-j " + target)]) == 1, lines
    for chain in ("CNI-ISOLATION-STAGE-1", "CNI-ISOLATION-STAGE-2"):
        assert len([l for l in lines if l.startswith("-A %s " % chain) and l.endswith("-j RETURN")]) == 1, lines
    assert len(address_rules(node)) == 4
    ok(call(ours_bin, "firewall", "CHECK", dict(conf, prevResult=fake_result("10.77.0.6/24")), node, "o1"))


# --- DEL, GC, CHECK ----------------------------------------------------------------------------------

def test_del_with_namespace_gone_and_twice(ours_bin, make_netns, data_dir):
    node, container = make_netns("node"), make_netns("ct")
    drop_forwarding(node)
    result = attach(ours_bin, node, container, data_dir, "c1")
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(result), node, "c1", netns=container))
    path = container.path
    run([IP, "netns", "delete", container.name])
    for conf in (firewall_conf(result), firewall_conf(None)):       # with and without prevResult
        ok(call(ours_bin, "firewall", "DEL", conf, node, "c1", netns=path))
        assert address_rules(node) == []
    shared = [l for l in rules(node) if "CNI-FORWARD" in l or "CNI-ADMIN" in l]
    assert len(shared) == 2, "the shared jumps stay for other attachments"


def test_same_address_on_two_networks_keeps_its_rules(ours_bin, node):
    drop_forwarding(node)
    prev = fake_result("10.77.0.5/24")
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(prev), node, "c1"))
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(prev, network="other"), node, "c2"))
    ok(call(ours_bin, "firewall", "DEL", firewall_conf(prev), node, "c1"))
    left = address_rules(node)
    assert len(left) == 2 and all("net: other" in l for l in left)


def test_check_finds_a_missing_rule(ours_bin, node):
    drop_forwarding(node)
    conf = firewall_conf(fake_result("10.77.0.5/24"))
    ok(call(ours_bin, "firewall", "ADD", conf, node))
    ok(call(ours_bin, "firewall", "CHECK", conf, node))
    line = [l for l in address_rules(node) if "-s " in l][0]
    node.run("sh", "-c", "iptables -D " + line[3:])
    res = call(ours_bin, "firewall", "CHECK", conf, node)
    assert res.returncode != 0 and "missing" in res.json["msg"], res


def test_gc_removes_invalid_attachments_and_gone_bridges(ours_bin, node):
    drop_forwarding(node)
    node.run("ip", "link", "add", "fwgc0", "type", "bridge")
    for cid, address in (("keep", "10.77.0.5/24"), ("stale", "10.77.0.6/24")):
        ok(call(ours_bin, "firewall", "ADD", firewall_conf(fake_result(address, bridge="fwgc0"),
                                                           ingressPolicy="same-bridge"), node, cid))
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(fake_result("10.77.0.7/24"), network="other"), node, "x"))
    gc = {"cniVersion": "1.1.0", "name": NET, "type": "firewall",
          "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    ok(call(ours_bin, "firewall", "GC", gc, node))
    left = address_rules(node)
    assert len(left) == 4 and not any("id: stale" in l for l in left), left
    assert any(" -i fwgc0 " in l for l in rules(node)), "the bridge exists: its isolation rules stay"
    node.run("ip", "link", "del", "fwgc0")
    ok(call(ours_bin, "firewall", "GC", gc, node))
    assert not any("fwgc0" in l for l in rules(node))
    assert len(address_rules(node)) == 4


# --- concurrency and kill -9 ---------------------------------------------------------------------------

def test_concurrent_adds_and_dels(ours_bin, node):
    drop_forwarding(node)
    count = 32
    confs = [firewall_conf(fake_result("10.77.0.%d/24" % (10 + i)), ingressPolicy="same-bridge")
             for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda i: call(ours_bin, "firewall", "ADD", confs[i], node, "c%d" % i), range(count)))
    assert [r.returncode for r in results] == [0] * count, [r.stdout for r in results if r.returncode]
    lines = rules(node)
    assert len(address_rules(node)) == 2 * count
    for target in ("CNI-FORWARD", "CNI-ISOLATION-STAGE-1"):
        assert len([l for l in lines if l.startswith("-A FORWARD ") and l.endswith("-j " + target)]) == 1, lines
    assert len([l for l in lines if l.endswith("-j CNI-ADMIN")]) == 1
    assert len([l for l in lines if l.startswith("-A CNI-ISOLATION-STAGE-2 ")]) == 2
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda i: call(ours_bin, "firewall", "DEL", confs[i], node, "c%d" % i), range(count)))
    assert [r.returncode for r in results] == [0] * count, [r.stdout for r in results if r.returncode]
    assert address_rules(node) == []


def test_kill_9_leaves_all_or_nothing(ours_bin, node):
    drop_forwarding(node)
    rng = random.Random(16)
    conf = firewall_conf(fake_result("10.77.0.5/24", "fd77::5/64"), ingressPolicy="isolated")
    env = cni_env("ADD", ours_bin, netns="/var/run/netns/none", container_id="k1")
    for _ in range(6):
        proc = subprocess.Popen([IP, "netns", "exec", node.name, str(ours_bin / "firewall")], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.stdin.write(encode_conf(conf))
        proc.stdin.close()
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        for family in (4, 6):
            assert len(address_rules(node, family)) in (0, 2)
            lines = rules(node, family)
            for target in ("CNI-FORWARD", "CNI-ISOLATION-STAGE-1", "CNI-ADMIN"):
                assert len([l for l in lines if l.endswith("-j " + target)]) <= 1, lines
    ok(call(ours_bin, "firewall", "ADD", conf, node, "k1"))
    assert len(address_rules(node)) == 2 and len(address_rules(node, 6)) == 2
    ok(call(ours_bin, "firewall", "DEL", conf, node, "k1"))
    assert address_rules(node) == [] and address_rules(node, 6) == []


# --- the legacy iptables node --------------------------------------------------------------------------

def test_legacy_iptables_node_runs_iptables(ours_bin, node, tmp_path):
    legacy = shutil.which("iptables-legacy")
    if legacy is None or node.run(legacy, "-P", "FORWARD", "DROP", check=False).returncode != 0:
        pytest.skip("no iptables-legacy, or the kernel has no legacy ip_tables")
    shim = tmp_path / "sbin"
    shim.mkdir()
    for name in ("iptables", "ip6tables"):
        os.symlink(shutil.which(name + "-legacy"), str(shim / name))
    path = "%s:%s" % (shim, os.environ.get("PATH", "/usr/sbin:/usr/bin"))
    conf = firewall_conf(fake_result("10.77.0.5/24"))
    ok(call(ours_bin, "firewall", "ADD", conf, node, env={"PATH": path}))
    lines = node.run("iptables-legacy-save", "-t", "filter").stdout
    assert "-A FORWARD -m comment --comment \"CNI firewall plugin rules\" -j CNI-FORWARD" in lines
    assert len([l for l in lines.splitlines() if "-A CNI-FORWARD -" in l and "-j ACCEPT" in l]) == 2
    assert not has_filter_table(node), "a legacy node gets no nf_tables filter table"
    ok(call(ours_bin, "firewall", "CHECK", conf, node, env={"PATH": path}))
    ok(call(ours_bin, "firewall", "DEL", dict(conf, prevResult=None), node, env={"PATH": path}))
    lines = node.run("iptables-legacy-save", "-t", "filter").stdout
    assert not [l for l in lines.splitlines() if "-j ACCEPT" in l and "CNI-FORWARD -" in l], lines
    # GC: an attachment not listed as valid loses its rules there too.
    ok(call(ours_bin, "firewall", "ADD", conf, node, "gone", env={"PATH": path}))
    lines = node.run("iptables-legacy-save", "-t", "filter").stdout
    assert len([l for l in lines.splitlines() if "-j ACCEPT" in l and "id: gone" in l]) == 2, lines
    gc = {"cniVersion": "1.1.0", "name": NET, "type": "firewall", "cni.dev/valid-attachments": []}
    ok(call(ours_bin, "firewall", "GC", gc, node, env={"PATH": path}))
    lines = node.run("iptables-legacy-save", "-t", "filter").stdout
    assert not [l for l in lines.splitlines() if "-j ACCEPT" in l and "CNI-FORWARD -" in l], lines


# --- the plugin's face -------------------------------------------------------------------------------

def test_no_command_prints_the_version_nerdctl_parses(ours_bin):
    proc = subprocess.run([str(ours_bin / "firewall")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={"PATH": os.environ.get("PATH", "")}, timeout=TIMEOUT)
    assert proc.returncode == 0 and proc.stdout == b""
    # nerdctl takes the first stderr line starting "CNI firewall plugin " and parses the rest as semver.
    line = [l for l in proc.stderr.decode().splitlines() if l.startswith("CNI firewall plugin ")][0]
    version = re.fullmatch(r"CNI firewall plugin v(\d+)\.(\d+)\.(\d+)", line)
    assert version, line
    assert tuple(int(v) for v in version.groups()) >= (1, 7, 1), "nerdctl needs >= v1.7.1 for 'isolated'"


def test_version_and_old_config_versions(ours_bin, node):
    res = call(ours_bin, "firewall", "VERSION", b"", node)
    assert ok(res)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
    res = call(ours_bin, "firewall", "ADD", firewall_conf(fake_result("10.77.0.5/24"), version="0.3.1"), node)
    assert res.returncode != 0 and res.json["code"] == 1, res
    assert not has_filter_table(node)


@pytest.mark.parametrize("keys, words", [
    ({"backend": "firewalld"}, "firewalld"),
    ({"backend": "nftables"}, "backend"),
    ({"ingressPolicy": "closed"}, "ingress policy"),
    ({"iptablesAdminChainName": "-bad"}, "iptablesAdminChainName"),
    ({"iptablesAdminChainName": "A" * 29}, "iptablesAdminChainName"),
    ({"iptablesAdminChainName": "FORWARD"}, "iptablesAdminChainName"),
    ({"iptablesAdminChainName": 5}, "iptablesAdminChainName"),
    ({"ingressPolicy": "isolated", "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.5/24"}]}},
     "interface needs to be set"),
    ({"prevResult": None}, "prevResult"),
    ({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.500/24"}]}}, "parse"),
])
def test_bad_config_is_a_cni_error_and_leaves_nothing(ours_bin, node, keys, words):
    conf = firewall_conf(fake_result("10.77.0.5/24"))
    conf.update(keys)
    res = call(ours_bin, "firewall", "ADD", conf, node)
    assert res.returncode != 0 and isinstance(res.json, dict), res
    assert res.json["code"] in (6, 7) and words.lower() in (res.json["msg"] + res.json.get("details", "")).lower(), res
    assert "Traceback" not in res.stderr
    assert not has_filter_table(node) and not has_filter_table(node, 6)


def test_admin_chain_name_is_used(ours_bin, node):
    drop_forwarding(node)
    ok(call(ours_bin, "firewall", "ADD", firewall_conf(fake_result("10.77.0.5/24"), iptablesAdminChainName="MY-ADMIN"),
            node))
    lines = saved(node)
    assert ":MY-ADMIN - [0:0]" in lines
    assert '-A CNI-FORWARD -m comment --comment "CNI firewall plugin admin overrides" -j MY-ADMIN' in lines
    # An operator's rule in the admin chain wins over the accepts that follow it.
    node.run("iptables", "-A", "MY-ADMIN", "-s", "10.77.0.5", "-j", "DROP")
    assert rules(node).index("-A CNI-FORWARD -m comment --comment \"CNI firewall plugin admin overrides\" -j MY-ADMIN") \
        < min(rules(node).index(l) for l in address_rules(node))


# --- start-up: what the firewall path imports -----------------------------------------------------

HEAVY = ("os", "json", "re", "socket", "subprocess", "ipaddress", "hashlib", "ctypes", "shlex", "shutil")
LIST_MODULES = (
    "import sys; sys.path.insert(0, sys.argv[1]); import cni_bridge as cb; "
    "status = cb.run_plugin('firewall', cb.process_environment()); "
    "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); sys.exit(status)")


def test_firewall_verbs_import_no_heavy_module_and_run_nothing(ours_bin, node):
    """On an nf_tables node no program runs (no subprocess) and nothing heavy is imported."""
    archive = os.path.realpath(str(ours_bin / "firewall"))
    conf = firewall_conf(fake_result("10.77.0.5/24", "fd77::5/64"), version="1.1.0", ingressPolicy="isolated")
    gc = {"cniVersion": "1.1.0", "name": NET, "type": "firewall", "cni.dev/valid-attachments": []}
    for command, stdin in (("ADD", conf), ("CHECK", conf), ("DEL", conf), ("GC", gc), ("STATUS", gc)):
        proc = subprocess.run([IP, "netns", "exec", node.name, "/usr/bin/python3", "-IS", "-c", LIST_MODULES,
                               archive], input=encode_conf(stdin), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=TIMEOUT,
                              env=cni_env(command, ours_bin, netns="/var/run/netns/none"))
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        line = [t for t in proc.stderr.decode().splitlines() if t.startswith("MODULES ")][-1]
        loaded = set(line.split()[1:])
        assert loaded.isdisjoint(HEAVY), (command, sorted(loaded & set(HEAVY)))


# --- the encoding, against what iptables-nft wrote -------------------------------------------------
# Rule expressions as the kernel listed them after iptables-nft 1.8.9 (nf_tables) wrote, in a
# scratch namespace:
#   iptables -A CNI-FORWARD -d 10.1.2.3/32 -m conntrack --ctstate RELATED,ESTABLISHED \
#            -m comment --comment c1 -j ACCEPT
#   iptables -A CNI-FORWARD -i br0 ! -o br0 -m comment --comment x -j CNI-ISOLATION-STAGE-2
#   ip6tables -A FORWARD -s fd00::2/128 -j ACCEPT
IPTABLES_NFT_DUMPS = {
    "CONNTRACK_COMMENT_ACCEPT": (
        "340001000c0001007061796c6f61640024000200080001000000000108000200000000010800030000000010"
        "08000400000000042c00010008000100636d700020000200080001000000000108000200000000000c000300"
        "080001000a010203d80001000a0001006d61746368000000c80002000e000100636f6e6e747261636b000000"
        "0800020000000003ac0003000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000010000000600000000000000000000000000"
        "000000002c0101000a0001006d617463680000001c0102000c000100636f6d6d656e74000800020000000000"
        "0401030063310000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000000000000000000000002c000100"
        "0c000100636f756e746572001c0002000c00010000000000000000000c000200000000000000000030000100"
        "0e000100696d6d6564696174650000001c0002000800010000000000100002000c0002000800010000000001"
    ),
    "INTERFACES_COMMENT_JUMP": (
        "24000100090001006d6574610000000014000200080002000000000608000100000000012c00010008000100"
        "636d700020000200080001000000000108000200000000000c00030008000100627230002400010009000100"
        "6d6574610000000014000200080002000000000708000100000000012c00010008000100636d700020000200"
        "080001000000000108000200000000010c00030008000100627230002c0101000a0001006d61746368000000"
        "1c0102000c000100636f6d6d656e740008000200000000000401030078000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
        "00000000000000000000000000000000000000002c0001000c000100636f756e746572001c0002000c000100"
        "00000000000000000c00020000000000000000004c0001000e000100696d6d65646961746500000038000200"
        "08000100000000002c0002002800020008000100fffffffd1a000200434e492d49534f4c4154494f4e2d5354"
        "4147452d32000000"
    ),
    "IPV6_SOURCE_ACCEPT": (
        "340001000c0001007061796c6f61640024000200080001000000000108000200000000010800030000000008"
        "08000400000000103800010008000100636d70002c0002000800010000000001080002000000000018000300"
        "14000100fd0000000000000000000000000000022c0001000c000100636f756e746572001c0002000c000100"
        "00000000000000000c0002000000000000000000300001000e000100696d6d6564696174650000001c000200"
        "0800010000000000100002000c0002000800010000000001"
    ),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(IPTABLES_NFT_DUMPS))
def test_rules_encode_as_iptables_nft_writes_them(name):
    """Our expressions decode to what iptables-nft's did (counters aside): the same rule to
    iptables, byte for byte in every field."""
    rules = {
        "CONNTRACK_COMMENT_ACCEPT": cb.IptRule("CNI-FORWARD", 4, "ACCEPT", "c1", dst=(4, 0x0A010203),
                                               established=True),
        "INTERFACES_COMMENT_JUMP": cb.IptRule("CNI-FORWARD", 4, "CNI-ISOLATION-STAGE-2", "x",
                                              in_iface=("br0", False), out_iface=("br0", True)),
        "IPV6_SOURCE_ACCEPT": cb.IptRule("FORWARD", 6, "ACCEPT", src=(6, 0xFD00 << 112 | 2)),
    }
    captured = bytes.fromhex(IPTABLES_NFT_DUMPS[name])
    assert cb.expression_signature(rules[name].expressions()) == cb.expressions_signature(captured)
