"""portmap over nf_tables netlink (issue 15), proved on the kernel.

Every test builds a site of namespaces it owns: a "node" where the plugins run, a "remote" client
on its own link of the node (198.51.100.0/24 and 2001:db8:51::/64; the node holds .1 and .3 there),
and containers attached by our `bridge` (hairpinMode, so a container can reach itself through the
node).  What the plugin wrote is read back with `nft -j list ruleset`, `iptables-save` and `sysctl`;
what it does is proved with real TCP and UDP traffic whose server reports the source it saw and the
address it was reached on.
"""
import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import (IP, PLUGIN_NAMES, REF_DIR, cni_env, encode_conf, exchange, run, run_cni,
                           serve_ports)

pytestmark = pytest.mark.kernel

NODE_UP = {4: "198.51.100.1", 6: "2001:db8:51::1"}
NODE_UP2 = {4: "198.51.100.3", 6: "2001:db8:51::3"}
REMOTE = {4: "198.51.100.2", 6: "2001:db8:51::2"}
UP_PREFIX = {4: 24, 6: 64}
TABLE = "cni_hostport"
FAMILY_NAMES = {4: "ip", 6: "ip6"}
TIMEOUT = 60

# --- the site ----------------------------------------------------------------------------------

class Site:
    """A node, a remote client on its uplink, and helpers to attach containers and map ports."""

    def __init__(self, make_netns, bin_dir, tmp_path):
        self.make_netns = make_netns
        self.bin = bin_dir
        self.tmp = tmp_path
        self.node = make_netns("pmn")
        self.remote = make_netns("pmr")
        self.servers = []
        # Bridges made here skip duplicate address detection: their gateways are usable at once.
        self.node.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        run([IP, "-n", self.node.name, "link", "add", "pmup0", "type", "veth", "peer", "name", "up0",
             "netns", self.remote.name])
        for family in (4, 6):
            for ns, dev, addrs in ((self.node, "pmup0", (NODE_UP, NODE_UP2)),
                                   (self.remote, "up0", (REMOTE,))):
                for addr in addrs:
                    run([IP, "-n", ns.name, "addr", "add", "%s/%d" % (addr[family], UP_PREFIX[family]),
                         "dev", dev] + (["nodad"] if family == 6 else []))
        run([IP, "-n", self.node.name, "link", "set", "pmup0", "up"])
        run([IP, "-n", self.remote.name, "link", "set", "up0", "up"])

    def network(self, name="pmnet", index=1, **options):
        """A bridge network config (dual stack, gateway, hairpin) named `name` on bridge pm<index>."""
        config = {"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": "pmbr%d" % index,
                  "isGateway": True, "hairpinMode": True,
                  "ipam": {"type": "host-local", "dataDir": str(self.tmp / "ipam"),
                           "ranges": [[{"subnet": "10.66.%d.0/24" % index}],
                                      [{"subnet": "fd66:%d::/64" % index}]],
                           "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}}
        config.update(options)
        return config

    def attach(self, network, ctr, cid, ifname="eth0"):
        """Our bridge ADD: the prevResult portmap gets."""
        res = run_cni(self.bin, "bridge", "ADD", network, node=self.node, netns=ctr, container_id=cid,
                      ifname=ifname, timeout=TIMEOUT)
        assert res.returncode == 0, res.stdout + res.stderr
        # The gateway's IPv6 address does duplicate address detection first (a second or two);
        # until then the node cannot resolve the container's IPv6 neighbour.
        deadline = time.monotonic() + 5
        while self.node.run(IP, "-6", "addr", "show", "dev", network["bridge"], "tentative").stdout.strip():
            assert time.monotonic() < deadline, "the gateway's IPv6 address stays tentative"
            time.sleep(0.1)
        return res.json

    def portmap(self, command, conf, ctr=None, cid="ctr1", ifname="eth0", bin_dir=None, ok=True, **kwargs):
        res = run_cni(bin_dir or self.bin, "portmap", command, conf, node=self.node, netns=ctr,
                      container_id=cid, ifname=ifname, timeout=TIMEOUT, **kwargs)
        if ok:
            assert res.returncode == 0, "%s failed: %s %s" % (command, res.stdout, res.stderr)
        return res

    def serve(self, ctr, *ports):
        proc = serve_ports(ctr, *ports)
        self.servers.append(proc)
        return proc

    def connect(self, ns, proto, host, port, wait=5.0, sport=0):
        """(source the server saw, address it was reached on), or None when nothing answered."""
        return exchange(ns, proto, host, port, wait, sport)

    def close(self):
        for proc in self.servers:
            proc.kill()
            proc.wait()


@pytest.fixture
def site(make_netns, ours_bin, tmp_path):
    s = Site(make_netns, ours_bin, tmp_path)
    yield s
    s.close()


def portmap_conf(prev, mappings, name="pmnet", version="1.0.0", **options):
    conf = {"cniVersion": version, "name": name, "type": "portmap",
            "runtimeConfig": {"portMappings": mappings}}
    if prev is not None:
        conf["prevResult"] = prev
    conf.update(options)
    return conf


def mapping(host_port, container_port, protocol="tcp", host_ip=None):
    entry = {"hostPort": host_port, "containerPort": container_port, "protocol": protocol}
    if host_ip:
        entry["hostIP"] = host_ip
    return entry


def address(result, family=4, ifname=None):
    ips = [ip["address"].split("/")[0] for ip in result["ips"] if (":" in ip["address"]) == (family == 6)]
    return ips[0]


def comment(cid, ifname="eth0", network="pmnet"):
    return "net:%s id:%s if:%s" % (network, cid, ifname)


# --- reading nf_tables -----------------------------------------------------------------------------

def nft_rules(ns):
    """[(family, chain, comment, expr)] of every rule in the portmap tables."""
    entries = json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [(e["rule"]["family"], e["rule"]["chain"], e["rule"].get("comment"), e["rule"]["expr"])
            for e in entries if "rule" in e and e["rule"]["table"] == TABLE]


def nft_tables(ns):
    entries = json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return sorted((e["table"]["family"], e["table"]["name"]) for e in entries if "table" in e)


def rules_by_comment(ns, text):
    return [r for r in nft_rules(ns) if r[2] == text]


def dnat_targets(ns, text):
    """{(family, host port, protocol): (address, port)} of the DNAT rules commented `text`."""
    targets = {}
    for family, chain, _comment, expr in rules_by_comment(ns, text):
        if chain != "hostports":
            continue
        dport = [e["match"] for e in expr
                 if "match" in e and e["match"]["left"].get("payload", {}).get("field") == "dport"][0]
        dnat = [e["dnat"] for e in expr if "dnat" in e][0]
        targets[(family, dport["right"], dport["left"]["payload"]["protocol"])] = (dnat["addr"], dnat["port"])
    return targets


def skeleton(ns, family="ip"):
    """{chain: [rule text]} of the shared chains, as `nft -j` reads them (expressions only)."""
    out = {}
    for fam, chain, _comment, expr in nft_rules(ns):
        if fam == family and chain in ("prerouting", "output", "hostports_all"):
            out.setdefault(chain, []).append(json.dumps(expr, sort_keys=True))
    return out


SKELETON = {
    "prerouting": [json.dumps([{"match": {"left": {"fib": {"flags": ["daddr"], "result": "type"}}, "op": "==",
                                          "right": "local"}}, {"jump": {"target": "hostports_all"}}], sort_keys=True)],
    "hostports_all": [json.dumps([{"jump": {"target": "hostip_hostports"}}], sort_keys=True),
                      json.dumps([{"jump": {"target": "hostports"}}], sort_keys=True)],
}
SKELETON["output"] = SKELETON["prerouting"]


# --- ADD, traffic ----------------------------------------------------------------------------------

def test_tcp_and_udp_from_outside_reach_the_container_in_both_families(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    conf = portmap_conf(prev, [mapping(8080, 80, "tcp"), mapping(8081, 81, "udp")])
    res = site.portmap("ADD", conf, container)
    assert res.json == prev                              # prevResult passes through unchanged
    site.serve(container, 80, 81)
    for family in (4, 6):
        ip = address(prev, family)
        # From outside, the container sees the client itself (snat only touches hairpin/localhost).
        assert site.connect(site.remote, "tcp", NODE_UP[family], 8080) == (REMOTE[family], ip)
        assert site.connect(site.remote, "udp", NODE_UP[family], 8081) == (REMOTE[family], ip)
        assert site.connect(site.remote, "tcp", NODE_UP[family], 8081, wait=0.5) is None   # udp only
    assert dnat_targets(site.node, comment("ctr1")) == {
        ("ip", 8080, "tcp"): (address(prev, 4), 80), ("ip", 8081, "udp"): (address(prev, 4), 81),
        ("ip6", 8080, "tcp"): (address(prev, 6), 80), ("ip6", 8081, "udp"): (address(prev, 6), 81)}
    for family in ("ip", "ip6"):
        assert skeleton(site.node, family) == SKELETON
    site.portmap("CHECK", conf, container)
    site.portmap("DEL", conf, container)
    assert rules_by_comment(site.node, comment("ctr1")) == []
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080, wait=0.5) is None


def test_masq_all_makes_the_node_the_source(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)], masqAll=True), container)
    site.serve(container, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == ("10.66.1.1", address(prev))
    assert site.connect(site.remote, "tcp", NODE_UP[6], 8080) == ("fd66:1::1", address(prev, 6))


def test_host_ip_restricts_the_mapping_to_that_address(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    mappings = [mapping(8080, 80, "tcp", NODE_UP[4]), mapping(8080, 80, "tcp", NODE_UP[6]),
                mapping(8082, 80, "udp", NODE_UP[4])]
    site.portmap("ADD", portmap_conf(prev, mappings), container)
    site.serve(container, 80)
    for family in (4, 6):
        assert site.connect(site.remote, "tcp", NODE_UP[family], 8080) == (REMOTE[family], address(prev, family))
        assert site.connect(site.remote, "tcp", NODE_UP2[family], 8080, wait=0.5) is None
    assert site.connect(site.remote, "udp", NODE_UP[4], 8082) == (REMOTE[4], address(prev))
    assert site.connect(site.remote, "udp", NODE_UP[6], 8082, wait=0.5) is None     # an IPv4 hostIP
    assert ("ip6", 8082, "udp") not in dnat_targets(site.node, comment("ctr1"))


def test_hairpin_neighbours_and_localhost_with_snat(site, make_netns):
    network = site.network()
    first, second = make_netns("pmc"), make_netns("pmc")
    prev = site.attach(network, first, "ctr1")
    neighbour = site.attach(network, second, "ctr2")
    site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80), mapping(8081, 81, "udp")]), first)
    site.serve(first, 80, 81)
    me = address(prev)
    # Hairpin: the container itself and a neighbour, through the node's address, masqueraded.
    assert site.connect(first, "tcp", NODE_UP[4], 8080) == ("10.66.1.1", me)
    assert site.connect(second, "tcp", NODE_UP[4], 8080) == ("10.66.1.1", me)
    assert site.connect(second, "udp", NODE_UP[4], 8081) == ("10.66.1.1", me)
    assert site.connect(second, "tcp", NODE_UP[6], 8080) == ("fd66:1::1", address(prev, 6))
    # The neighbour talking to the container directly is not rewritten.
    assert site.connect(second, "tcp", me, 80) == (address(neighbour), me)
    # From the node: 127.0.0.1 (route_localnet on the bridge) and its own address.
    assert site.node.sysctl("net/ipv4/conf/pmbr1/route_localnet") == "1"
    assert site.connect(site.node, "tcp", "127.0.0.1", 8080) == ("10.66.1.1", me)
    assert site.connect(site.node, "tcp", NODE_UP[4], 8080)[1] == me


def test_without_snat_there_is_no_masquerade_rule(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)], snat=False), container)
    assert {r[1] for r in rules_by_comment(site.node, comment("ctr1"))} == {"hostports"}
    assert site.node.sysctl("net/ipv4/conf/pmbr1/route_localnet") == "0"
    site.serve(container, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev))


def test_sctp_rules_are_written(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    conf = portmap_conf(prev, [mapping(9000, 90, "sctp"), mapping(9001, 91, "SCTP", NODE_UP[6])])
    site.portmap("ADD", conf, container)
    assert dnat_targets(site.node, comment("ctr1")) == {
        ("ip", 9000, "sctp"): (address(prev, 4), 90), ("ip6", 9000, "sctp"): (address(prev, 6), 90),
        ("ip6", 9001, "sctp"): (address(prev, 6), 91)}
    site.portmap("CHECK", conf, container)


def test_stale_udp_flow_is_forgotten_after_add(site, container):
    """A UDP flow that hit the node before the mapping existed is tracked without NAT; ADD
    deletes that conntrack entry, so the same flow (same source port) reaches the container."""
    prev = site.attach(site.network(ipMasq=True), container, "ctr1")   # its nat chain: conntrack on
    site.serve(container, 81)
    for family in (4, 6):
        assert site.connect(site.remote, "udp", NODE_UP[family], 8081, wait=0.3, sport=40123) is None
    conntrack = site.node.sysctl("net/netfilter/nf_conntrack_count")
    assert int(conntrack) >= 2, conntrack        # both flows are tracked, without NAT
    site.portmap("ADD", portmap_conf(prev, [mapping(8081, 81, "udp")]), container)
    for family in (4, 6):
        assert site.connect(site.remote, "udp", NODE_UP[family], 8081, wait=3, sport=40123) == (
            REMOTE[family], address(prev, family))


# --- several networks and containers ------------------------------------------------------------------

def test_two_networks_same_host_port_on_different_host_ips(site, make_netns):
    """A container on two networks (eth0, eth1), the same host port on two node addresses, and
    a DEL of one attachment that leaves the other's rules and traffic alone."""
    ctr = make_netns("pmc")
    net1 = site.network("pmnet", 1)
    net2 = site.network("pmnet2", 2)
    net2["ipam"] = dict(net2["ipam"], routes=[])      # eth0 holds the default routes
    prev1 = site.attach(net1, ctr, "pod", "eth0")
    prev2 = site.attach(net2, ctr, "pod", "eth1")
    conf1 = portmap_conf(prev1, [mapping(8080, 80, "tcp", NODE_UP[4])], "pmnet")
    conf2 = portmap_conf(prev2, [mapping(8080, 80, "tcp", NODE_UP2[4])], "pmnet2",
                         conditionsV4=["ip saddr", "198.51.100.0/24"])
    site.portmap("ADD", conf1, ctr, "pod", "eth0")
    site.portmap("ADD", conf2, ctr, "pod", "eth1")
    site.serve(ctr, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev1))
    assert site.connect(site.remote, "tcp", NODE_UP2[4], 8080) == (REMOTE[4], address(prev2))
    site.portmap("DEL", conf1, ctr, "pod", "eth0")
    assert rules_by_comment(site.node, comment("pod", "eth0")) == []
    assert len(rules_by_comment(site.node, comment("pod", "eth1", "pmnet2"))) == 3   # dnat, 2 masquerade
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080, wait=0.5) is None
    assert site.connect(site.remote, "tcp", NODE_UP2[4], 8080) == (REMOTE[4], address(prev2))
    site.portmap("CHECK", conf2, ctr, "pod", "eth1")


def test_two_containers_same_host_port_on_different_host_ips(site, make_netns):
    first, second = make_netns("pmc"), make_netns("pmc")
    network = site.network()
    prev1 = site.attach(network, first, "ctr1")
    prev2 = site.attach(network, second, "ctr2")
    conf1 = portmap_conf(prev1, [mapping(8080, 80, "tcp", NODE_UP[4]), mapping(8080, 80, "udp", NODE_UP[6])])
    conf2 = portmap_conf(prev2, [mapping(8080, 80, "tcp", NODE_UP2[4]), mapping(8080, 80, "udp", NODE_UP2[6])])
    site.portmap("ADD", conf1, first, "ctr1")
    site.portmap("ADD", conf2, second, "ctr2")
    site.serve(first, 80)
    site.serve(second, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev1))
    assert site.connect(site.remote, "tcp", NODE_UP2[4], 8080) == (REMOTE[4], address(prev2))
    assert site.connect(site.remote, "udp", NODE_UP[6], 8080) == (REMOTE[6], address(prev1, 6))
    assert site.connect(site.remote, "udp", NODE_UP2[6], 8080) == (REMOTE[6], address(prev2, 6))
    site.portmap("DEL", conf2, second, "ctr2")
    assert site.connect(site.remote, "tcp", NODE_UP2[4], 8080, wait=0.5) is None
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev1))


def test_conditions_apply_to_their_own_network_only(site, make_netns):
    first, second = make_netns("pmc"), make_netns("pmc")
    prev1 = site.attach(site.network("pmnet", 1), first, "ctr1")
    prev2 = site.attach(site.network("pmnet2", 2), second, "ctr2")
    blocked = portmap_conf(prev1, [mapping(8080, 80)], "pmnet", conditionsV4=["ip", "saddr", "!=", REMOTE[4]],
                           conditionsV6=['iifname != { "pmup0", "nothing*" }'])
    site.portmap("ADD", blocked, first, "ctr1")
    site.portmap("ADD", portmap_conf(prev2, [mapping(8081, 80)], "pmnet2"), second, "ctr2")
    site.serve(first, 80)
    site.serve(second, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080, wait=0.5) is None
    assert site.connect(site.remote, "tcp", NODE_UP[6], 8080, wait=0.5) is None
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8081) == (REMOTE[4], address(prev2))
    assert site.connect(site.node, "tcp", "127.0.0.1", 8080)[1] == address(prev1)   # not from the remote
    site.portmap("CHECK", blocked, first, "ctr1")
    # A positive set: one rule per element, the remote among them.
    allowed = dict(blocked, conditionsV4=["ip saddr { 192.0.2.7,", REMOTE[4] + " }"], conditionsV6=[])
    site.portmap("ADD", allowed, first, "ctr1")
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev1))
    assert len([r for r in rules_by_comment(site.node, comment("ctr1")) if r[1] == "hostports"]) == 3
    site.portmap("CHECK", allowed, first, "ctr1")


@pytest.mark.parametrize("conditions, what", [
    ({"conditionsV4": ["tcp dport 22"]}, "conditionsV4"),
    ({"conditionsV4": ["ip6 saddr ::1"]}, "conditionsV4"),
    ({"conditionsV6": ["ip6 saddr { ::1, "]}, "conditionsV6"),
    ({"conditionsV4": ["ip saddr 1.2.3.4 counter"]}, "counter"),
    ({"conditionsV4": ["-s", "1.2.3.4"], "backend": "nftables"}, "iptables-specific"),
    ({"externalSetMarkChain": "KUBE-MARK-MASQ", "backend": "nftables"}, "externalSetMarkChain"),
    ({"backend": "bpf"}, "backend"),
    ({"markMasqBit": 32}, "markMasqBit"),
    ({"markMasqBit": 3, "externalSetMarkChain": "X"}, "externalSetMarkChain"),
])
def test_unsupported_options_are_config_errors(site, container, conditions, what):
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.66.1.2/24"}]}
    res = site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)], **conditions), container, ok=False)
    assert res.returncode != 0 and res.json["code"] == 7, res.json
    assert what in res.json["msg"] + res.json.get("details", ""), res.json
    assert (("ip", TABLE) not in nft_tables(site.node)), "a refused ADD wrote rules"


@pytest.mark.parametrize("entry, what", [
    ({"hostPort": 0, "containerPort": 80, "protocol": "tcp"}, "host port"),
    ({"hostPort": 70000, "containerPort": 80, "protocol": "tcp"}, "host port"),
    ({"hostPort": 80, "containerPort": -1, "protocol": "tcp"}, "container port"),
    ({"hostPort": 80, "containerPort": 80, "protocol": "icmp"}, "protocol"),
    ({"hostPort": 80, "containerPort": 80}, "protocol"),
    ({"hostPort": 80, "containerPort": 80, "protocol": "tcp", "hostIP": "1.2.3"}, "hostIP"),
    ({"hostPort": "80", "containerPort": 80, "protocol": "tcp"}, "hostPort"),
    ("tcp:80", "portMappings[0]"),
])
def test_bad_port_mappings_are_config_errors(site, container, entry, what):
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.66.1.2/24"}]}
    res = site.portmap("ADD", portmap_conf(prev, [entry]), container, ok=False)
    assert res.returncode != 0 and res.json["code"] == 7 and what in res.json["msg"], res.json
    assert nft_tables(site.node) == []


def test_add_without_mappings_passes_through_and_writes_nothing(site, container):
    prev = {"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": container.path}],
            "ips": [{"version": "4", "address": "10.66.1.2/24", "interface": 0}], "dns": {}}
    for version in ("0.3.1", "0.4.0", "1.0.0", "1.1.0"):
        res = site.portmap("ADD", portmap_conf(prev, [], version=version), container)
        assert res.json["cniVersion"] == version and res.json["ips"][0]["address"] == "10.66.1.2/24"
    assert nft_tables(site.node) == []
    res = site.portmap("ADD", portmap_conf(None, [mapping(8080, 80)]), container, ok=False)
    assert res.returncode != 0 and res.json["code"] == 7 and "chained" in res.json["msg"]


def test_only_the_container_interface_address_is_mapped(site, container):
    """An address whose interface is not the container's CNI_IFNAME is skipped (as upstream)."""
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "pmbr1"}, {"name": "eth0", "sandbox": container.path}],
            "ips": [{"address": "10.66.9.9/24", "interface": 0}, {"address": "10.66.1.7/24", "interface": 1}]}
    site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)]), container)
    assert dnat_targets(site.node, comment("ctr1")) == {("ip", 8080, "tcp"): ("10.66.1.7", 80)}


def test_mappings_command_lists_what_the_kernel_holds(site, container):
    """`cni-bridge.pyz mappings` reads the rules back (no nft program) and names their attachment."""
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.66.1.2/24"}, {"address": "fd66:1::2/64"}]}
    conf = portmap_conf(prev, [mapping(8080, 80), mapping(9000, 90, "udp", NODE_UP[6])],
                        conditionsV4=["iifname != lo"])
    site.portmap("ADD", conf, container, cid="ctr1")
    site.portmap("ADD", portmap_conf(prev, [mapping(8081, 81, "sctp", NODE_UP[4])], "pmnet2"), container,
                 cid="ctr2", ifname="net1")
    listed = json.loads(site.node.run(str(site.bin / "cni-bridge.pyz"), "mappings", "--json").stdout)
    row = lambda net, cid, ifname, proto, host, target, conditions: {
        "network": net, "container": cid, "ifname": ifname, "proto": proto, "host": host, "target": target,
        "conditions": conditions}
    assert sorted(listed, key=json.dumps) == sorted([
        row("pmnet", "ctr1", "eth0", "tcp", "*:8080", "10.66.1.2:80", "1"),
        row("pmnet", "ctr1", "eth0", "tcp", "*:8080", "[fd66:1::2]:80", "-"),
        row("pmnet", "ctr1", "eth0", "udp", "[2001:db8:51::1]:9000", "[fd66:1::2]:90", "-"),
        row("pmnet2", "ctr2", "net1", "sctp", "198.51.100.1:8081", "10.66.1.2:81", "-")], key=json.dumps)
    table = site.node.run(str(site.bin / "cni-bridge.pyz"), "mappings").stdout.splitlines()
    assert table[0].split() == ["NETWORK", "CONTAINER", "IFNAME", "PROTO", "HOST", "TARGET", "CONDITIONS"]
    assert len(table) == 5


# --- DEL, CHECK, GC ---------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["netns gone", "no prevResult", "twice", "no runtimeConfig"])
def test_del_removes_the_rules_whatever_is_left(site, make_netns, how):
    ctr = make_netns("pmc")
    prev = site.attach(site.network(), ctr, "ctr1")
    conf = portmap_conf(prev, [mapping(8080, 80), mapping(8081, 81, "udp")])
    site.portmap("ADD", conf, ctr)
    other = dict(conf, runtimeConfig={"portMappings": [mapping(9090, 80)]})
    site.portmap("ADD", other, ctr, cid="ctr2")
    assert len(rules_by_comment(site.node, comment("ctr1"))) == 2 * 2 + 3
    netns = ctr
    del_conf = conf
    if how == "netns gone":
        run([IP, "netns", "del", ctr.name])
        netns = ctr.path
    elif how == "no prevResult":
        del_conf = {k: v for k, v in conf.items() if k != "prevResult"}
    elif how == "no runtimeConfig":
        del_conf = {k: v for k, v in conf.items() if k not in ("prevResult", "runtimeConfig")}
    site.portmap("DEL", del_conf, netns)
    if how == "twice":
        site.portmap("DEL", del_conf, netns)
    assert rules_by_comment(site.node, comment("ctr1")) == []
    assert len(rules_by_comment(site.node, comment("ctr2"))) == 2 + 3
    assert skeleton(site.node) == SKELETON


def test_check_fails_after_a_rule_is_deleted_by_hand(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    conf = portmap_conf(prev, [mapping(8080, 80), mapping(8081, 81)])
    site.portmap("ADD", conf, container)
    site.portmap("CHECK", conf, container)
    entries = json.loads(site.node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    victim = [e["rule"] for e in entries if "rule" in e and e["rule"].get("comment") == comment("ctr1")
              and e["rule"]["family"] == "ip6" and e["rule"]["chain"] == "hostports"][1]
    site.node.run("nft", "delete", "rule", "ip6", TABLE, "hostports", "handle", str(victim["handle"]))
    res = site.portmap("CHECK", conf, container, ok=False)
    assert res.returncode != 0 and "missing or changed" in res.json["msg"], res.json
    site.portmap("ADD", conf, container)                 # a repeated ADD repairs
    site.portmap("CHECK", conf, container)
    assert len(rules_by_comment(site.node, comment("ctr1"))) == 4 + 3
    # CHECK compares what the rules say: the same count pointing elsewhere fails too.
    moved = dict(conf, runtimeConfig={"portMappings": [mapping(8080, 80), mapping(8081, 82)]})
    res = site.portmap("CHECK", moved, container, ok=False)
    assert res.returncode != 0, res.stdout
    site.node.run("nft", "flush", "chain", "ip", TABLE, "prerouting")
    res = site.portmap("CHECK", conf, container, ok=False)
    assert res.returncode != 0 and "chains" in res.json["msg"], res.json
    site.portmap("ADD", conf, container)
    assert skeleton(site.node) == SKELETON


def test_gc_removes_rules_of_attachments_not_valid(site, container):
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.66.1.2/24"}]}
    for name in ("pmnet", "pmnet2"):
        for cid in ("keep", "stale"):
            site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)], name, version="1.1.0"), container, cid=cid)
    long_id = "x" * 100
    site.portmap("ADD", portmap_conf(prev, [mapping(8080, 80)], version="1.1.0"), container, cid=long_id)
    assert len(rules_by_comment(site.node, "net:pmnet id:#%s if:eth0" % __import__("hashlib").sha512(
        long_id.encode()).hexdigest()[:16])) == 3
    gc = {"cniVersion": "1.1.0", "name": "pmnet", "type": "portmap", "conditionsV4": ["tcp dport 1"],
          "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"},
                                        {"containerID": long_id, "ifname": "eth0"}]}
    site.portmap("GC", gc, None, cid=None, ifname=None)
    owners = sorted({r[2] for r in nft_rules(site.node) if r[2]})
    assert [o for o in owners if "#" not in o] == sorted([comment("keep"), comment("keep", network="pmnet2"),
                                                          comment("stale", network="pmnet2")])
    assert len(owners) == 4          # a config that no longer validates still collects
    status = {k: v for k, v in gc.items() if k != "conditionsV4"}
    site.portmap("STATUS", status, None, cid=None, ifname=None)
    res = site.portmap("STATUS", gc, None, cid=None, ifname=None, ok=False)
    assert res.returncode != 0 and res.json["code"] == 7, res.stdout


# --- concurrency and crashes --------------------------------------------------------------------------

def test_32_concurrent_adds_and_dels_leave_exactly_the_survivors(site, container):
    prevs = {"c%02d" % i: {"cniVersion": "1.0.0", "ips": [{"address": "10.66.1.%d/24" % (i + 2)},
                                                         {"address": "fd66:1::%x/64" % (i + 2)}]}
             for i in range(32)}

    def add(cid):
        return site.portmap("ADD", portmap_conf(prevs[cid], [mapping(10000 + int(cid[1:]), 80)]), container,
                            cid=cid, ok=False)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(add, sorted(prevs)))
    assert all(r.returncode == 0 for r in results), [r.stdout for r in results if r.returncode]
    doomed = sorted(prevs)[::2]

    def delete(cid):
        return site.portmap("DEL", portmap_conf(None, []), container, cid=cid, ok=False)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(delete, doomed)) + list(pool.map(add, sorted(prevs)[1::4]))
    assert all(r.returncode == 0 for r in results), [r.stdout for r in results if r.returncode]
    owners = {}
    for _family, _chain, text, _expr in nft_rules(site.node):
        if text:
            owners[text] = owners.get(text, 0) + 1
    assert owners == {comment(cid): 2 + 3 for cid in sorted(prevs)[1::2]}
    for family in ("ip", "ip6"):
        assert skeleton(site.node, family) == SKELETON


def test_kill_9_at_random_instants_leaves_nothing_del_does_not_remove(site, container):
    rng = random.Random(int(os.environ.get("CNI_BRIDGE_SEED", "15")))
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.66.1.2/24"}, {"address": "fd66:1::2/64"}]}
    site.portmap("ADD", portmap_conf(prev, [mapping(7000, 70)]), container, cid="bystander")
    conf = portmap_conf(prev, [mapping(8000 + i, 80, "udp" if i % 2 else "tcp") for i in range(6)])
    runs = int(os.environ.get("CNI_BRIDGE_CRASH_RUNS", "6"))
    for attempt in range(runs):
        command = "ADD" if attempt % 3 else "DEL"
        argv = [IP, "netns", "exec", site.node.name, str(site.bin / "portmap")]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=cni_env(command, site.bin, netns=container, container_id="victim"))
        proc.stdin.write(encode_conf(conf))
        proc.stdin.close()
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        victims = rules_by_comment(site.node, comment("victim"))
        assert len(victims) in (0, 12 + 3), "a killed %s left %d rules: not one transaction" % (
            command, len(victims))
    site.portmap("DEL", conf, container, cid="victim")
    assert rules_by_comment(site.node, comment("victim")) == []
    assert len(rules_by_comment(site.node, comment("bystander"))) == 2 + 3
    for family in ("ip", "ip6"):
        assert skeleton(site.node, family) == SKELETON


# --- the runtime's chain --------------------------------------------------------------------------------

def run_chain(bin_dir, node, conflist, command, netns, cid, capability_args, cached=None):
    """Drive a conflist as libcni does: ADD in order threading prevResult, DEL in reverse with the
    cached result; capabilities from `capability_args`. Returns the final ADD result."""
    plugins = conflist["plugins"] if command != "DEL" else list(reversed(conflist["plugins"]))
    result = cached
    for plugin in plugins:
        conf = dict(plugin, cniVersion=conflist["cniVersion"], name=conflist["name"])
        conf.pop("capabilities", None)
        runtime = {k: v for k, v in capability_args.items() if (plugin.get("capabilities") or {}).get(k)}
        if runtime:
            conf["runtimeConfig"] = runtime
        if result is not None:
            conf["prevResult"] = result
        res = run_cni(bin_dir, plugin["type"], command, conf, node=node, netns=netns, container_id=cid,
                      timeout=TIMEOUT)
        assert res.returncode == 0, "%s %s: %s %s" % (plugin["type"], command, res.stdout, res.stderr)
        if command == "ADD":
            result = res.json
    return result


def test_containerd_default_chain_with_only_our_file(site, container, tmp_path):
    """containerd's default conflist (loopback, bridge, portmap) with a Kubernetes hostPort,
    CNI_PATH holding nothing but our zipapp and its links."""
    conflist = {"cniVersion": "1.0.0", "name": "containerd-net", "plugins": [
        {"type": "loopback"},
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "promiscMode": True,
         "ipam": {"type": "host-local", "dataDir": str(tmp_path / "ipam"),
                  "ranges": [[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd88::/64"}]],
                  "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    assert sorted(os.listdir(site.bin)) == sorted(PLUGIN_NAMES + ("cni-bridge.pyz",))
    caps = {"portMappings": [{"hostPort": 30080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
                             {"hostPort": 30081, "containerPort": 81, "protocol": "udp"}]}
    result = run_chain(site.bin, site.node, conflist, "ADD", container, "pod1", caps)
    site.serve(container, 80, 81)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 30080) == (REMOTE[4], address(result))
    assert site.connect(site.remote, "udp", NODE_UP[6], 30081) == (REMOTE[6], address(result, 6))
    run_chain(site.bin, site.node, conflist, "CHECK", container, "pod1", caps, result)
    run_chain(site.bin, site.node, conflist, "DEL", container, "pod1", caps, result)
    assert rules_by_comment(site.node, comment("pod1", network="containerd-net")) == []
    assert site.connect(site.remote, "tcp", NODE_UP[4], 30080, wait=0.5) is None


# --- against the reference ------------------------------------------------------------------------------

def reference_portmap():
    if not (REF_DIR / "portmap").is_file():
        pytest.skip("reference portmap not installed: apt-get install containernetworking-plugins")
    return REF_DIR


SCENARIOS = {
    "plain": ([mapping(8080, 80), mapping(8081, 81, "udp")], {}),
    "host ip, no snat": ([mapping(8080, 80, "tcp", NODE_UP[4]), mapping(8081, 81, "udp", NODE_UP[6])],
                         {"snat": False}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_results_and_reachability_as_the_reference(make_netns, ours_bin, tmp_path, scenario):
    """The same scenario on two sites, one with our portmap and one with the reference's
    (iptables backend): the same result, the same peers reachable with the same sources.
    (The reference's CHECK is not compared: 1.1.1 checks its IPv4 rules in ip6tables and fails
    on every dual-stack attachment.)"""
    ref_bin = reference_portmap()
    mappings, options = SCENARIOS[scenario]
    observed = {}
    for who, bin_dir in (("ours", ours_bin), ("reference", ref_bin)):
        s = Site(make_netns, ours_bin, tmp_path / who)
        try:
            first, second = make_netns("pmc"), make_netns("pmc")
            network = s.network(cniVersion="0.4.0")
            prev = s.attach(network, first, "ctr1")
            s.attach(network, second, "ctr2")
            conf = portmap_conf(prev, mappings, version="0.4.0", **options)
            res = s.portmap("ADD", conf, first, bin_dir=bin_dir)
            s.serve(first, 80, 81)
            seen = {"prevResult passed through": res.json == prev}
            for family in (4, 6):
                for proto, port in (("tcp", 8080), ("udp", 8081)):
                    targets = (NODE_UP, NODE_UP2) if "host ip" in scenario else (NODE_UP,)
                    for target in targets:
                        seen[("remote", family, proto, target[family])] = s.connect(
                            s.remote, proto, target[family], port, wait=1.0)
                if options.get("snat", True):
                    seen[("neighbour", family)] = s.connect(second, "tcp", NODE_UP[family], 8080, wait=1.0)
            s.portmap("DEL", conf, first, bin_dir=bin_dir)
            seen["after DEL"] = s.connect(s.remote, "tcp", NODE_UP[4], 8080, wait=0.5)
            observed[who] = seen
        finally:
            s.close()
    assert observed["ours"] == observed["reference"]
    assert observed["ours"]["after DEL"] is None


@pytest.mark.parametrize("entry, words", [
    ({"hostPort": 0, "containerPort": 80, "protocol": "tcp"}, "Invalid host port number: 0"),
    ({"hostPort": 80, "containerPort": 0, "protocol": "tcp"}, "Invalid container port number: 0"),
    (None, "chained"),
])
def test_refused_like_the_reference(site, container, entry, words):
    """Both refuse, with a CNI error naming the problem the same way; ours says code 7 where
    the reference says 999, and neither leaves a rule."""
    ref_bin = reference_portmap()
    prev = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.66.1.2/24"}]}
    conf = portmap_conf(prev if entry else None, [entry or mapping(8080, 80)], version="0.4.0")
    answers = {}
    for who, bin_dir in (("ours", None), ("reference", ref_bin)):
        res = site.portmap("ADD", conf, container, bin_dir=bin_dir, ok=False)
        assert res.returncode != 0 and words in res.json["msg"], (who, res.stdout)
        answers[who] = res.json["code"]
    assert answers == {"ours": 7, "reference": 999}
    assert nft_rules(site.node) == [] and "CNI-DN-" not in site.node.run("iptables-save", "-t", "nat").stdout


def test_reference_iptables_rules_and_ours_live_side_by_side(site, make_netns):
    """The reference (iptables-nft here) and ours on one node: each maps its own container, and
    our DEL leaves the reference's chains alone."""
    ref_bin = reference_portmap()
    first, second = make_netns("pmc"), make_netns("pmc")
    network = site.network(cniVersion="0.4.0")
    prev1 = site.attach(network, first, "ours")
    prev2 = site.attach(network, second, "theirs")
    ours = portmap_conf(prev1, [mapping(8080, 80)], version="0.4.0")
    theirs = portmap_conf(prev2, [mapping(8081, 80)], version="0.4.0")
    site.portmap("ADD", ours, first, cid="ours")
    site.portmap("ADD", theirs, second, cid="theirs", bin_dir=ref_bin)
    site.serve(first, 80)
    site.serve(second, 80)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev1))
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8081) == (REMOTE[4], address(prev2))
    site.portmap("DEL", ours, first, cid="ours")
    assert "CNI-DN-" in site.node.run("iptables-save", "-t", "nat").stdout
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8081) == (REMOTE[4], address(prev2))
    site.portmap("DEL", theirs, second, cid="theirs", bin_dir=ref_bin)


def test_our_del_removes_the_reference_iptables_mapping(site, container):
    """A container mapped by the reference (iptables-nft) and unmapped by our DEL, as after
    switching plugins on a node: its CNI-DN chain and the jump to it are gone, iptables not run."""
    ref_bin = reference_portmap()
    prev = site.attach(site.network(cniVersion="0.4.0"), container, "ctr1")
    conf = portmap_conf(prev, [mapping(8080, 80), mapping(8081, 81, "udp")], version="0.4.0")
    site.portmap("ADD", conf, container, bin_dir=ref_bin)
    assert "CNI-DN-" in site.node.run("iptables-save", "-t", "nat").stdout
    assert "CNI-DN-" in site.node.run("ip6tables-save", "-t", "nat").stdout
    site.portmap("DEL", conf, container, env={"PATH": "/nonexistent"})
    for program in ("iptables-save", "ip6tables-save"):
        saved = site.node.run(program, "-t", "nat").stdout
        assert "CNI-DN-" not in saved and "-A CNI-HOSTPORT-DNAT" not in saved, saved


def test_iptables_backend_on_request(site, container):
    prev = site.attach(site.network(), container, "ctr1")
    conf = portmap_conf(prev, [mapping(8080, 80), mapping(8081, 81, "udp", NODE_UP[4])], backend="iptables",
                        conditionsV4=["-s", "198.51.100.0/24"])
    site.portmap("ADD", conf, container)
    saved = site.node.run("iptables-save", "-t", "nat").stdout
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT" in saved
    assert "--to-destination %s:80" % address(prev) in saved
    assert nft_rules(site.node) == []
    site.serve(container, 80, 81)
    assert site.connect(site.remote, "tcp", NODE_UP[4], 8080) == (REMOTE[4], address(prev))
    assert site.connect(site.remote, "udp", NODE_UP[4], 8081) == (REMOTE[4], address(prev))
    site.portmap("CHECK", conf, container)
    site.portmap("DEL", conf, container)
    assert "CNI-DN-" not in site.node.run("iptables-save", "-t", "nat").stdout
