"""Issue 19: a kubenet replacement.  A small cluster out of namespaces: an underlay segment (a
namespace holding a bridge), two nodes on it with routes to each other's podCIDR, and an
"outside" host on the same segment with no route to any pod.  Pods are added through the plugins
as libcni does (our `add`/`check`/`del`/`gc` commands run the conflist's chain: bridge with
host-local, portmap, loopback), inside each node's namespace.

With `ipMasqExclude` set to the cluster CIDR, pods see each other's real addresses on the same
node and across nodes, reach the outside masqueraded to their node's address, a hostPort answers
from outside and from a pod on another node; CHECK, GC and DEL handle the exclusion rules; both
masquerade backends.  Without the key, the same cluster behaves as the reference plugins do.
Everything is read back from the kernel (`nft -j list ruleset`, `iptables-save`) and from the
sources real TCP and UDP peers see.
"""
import json
import subprocess

import pytest

from tests.helpers import (IP, PORT, REF_DIR, SERVER, explain, reservations, ruleset, run, skip_without_iptables,
                           sources_seen)

pytestmark = pytest.mark.kernel

NET = "kubenet"
CLUSTER_CIDR = "10.244.0.0/16"
OTHER_FAMILY_CIDR = "fd00:244::/48"           # applies to IPv6 only: excludes nothing here
OUTSIDE = "192.168.77.100"
HOST_PORT = int(PORT)                         # the server of sources_seen listens on PORT


def node_address(index):
    return "192.168.77.%d" % (10 + index)


def pod_cidr(index):
    return "10.244.%d.0/24" % index


class Pod:
    def __init__(self, ns, node, address):
        self.ns, self.node, self.address = ns, node, address


class Cluster:
    """The segment, the nodes (1-based), the outside host, and the pods added so far."""

    def __init__(self, make_netns, tmp_path, tool, cni_path, nodes=2, version="1.1.0",
                 **bridge_keys):
        self.make_netns, self.tmp, self.tool, self.cni_path = make_netns, tmp_path, tool, cni_path
        self.segment = make_netns("kseg")
        self.segment.run(IP, "link", "add", "seg0", "type", "bridge")
        self.segment.run(IP, "link", "set", "seg0", "up")
        self.nodes = [None] + [make_netns("knode") for _ in range(nodes)]
        self.outside = make_netns("kout")
        hosts = [(self.nodes[i], node_address(i)) for i in range(1, nodes + 1)]
        for port, (ns, address) in enumerate(hosts + [(self.outside, OUTSIDE)]):
            self.segment.run(IP, "link", "add", "p%d" % port, "type", "veth", "peer", "name",
                             "eth0", "netns", ns.name)
            self.segment.run(IP, "link", "set", "p%d" % port, "master", "seg0", "up")
            ns.run(IP, "addr", "add", address + "/24", "dev", "eth0")
            ns.run(IP, "link", "set", "eth0", "up")
        for i in range(1, nodes + 1):       # what the cloud's route table would do
            for j in range(1, nodes + 1):
                if i != j:
                    self.nodes[i].run(IP, "route", "add", pod_cidr(j), "via", node_address(j))
            directory = tmp_path / ("node%d" % i)
            (directory / "net.d").mkdir(parents=True)
            bridge = {"type": "bridge", "bridge": "cbr0", "isGateway": True,
                      "isDefaultGateway": True, "ipMasq": True, "hairpinMode": True,
                      "ipam": {"type": "host-local", "dataDir": str(directory / "ipam"),
                               "ranges": [[{"subnet": pod_cidr(i)}]]}}
            bridge.update(bridge_keys)
            conflist = {"cniVersion": version, "name": NET,
                        "plugins": [bridge, {"type": "portmap",
                                             "capabilities": {"portMappings": True}},
                                    {"type": "loopback"}]}
            (directory / "net.d" / "10-kubenet.conflist").write_text(json.dumps(conflist))
        self.pods = []

    def env(self, i, port_mappings=()):
        directory = self.tmp / ("node%d" % i)
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NETCONFPATH": str(directory / "net.d"),
                "CNI_PATH": str(self.cni_path), "CNI_CACHE_DIR": str(directory / "cache"),
                "CAP_ARGS": json.dumps({"portMappings": list(port_mappings)})}

    def command(self, command, pod, check=True, port_mappings=()):
        """Our cnitool-like command for a pod, run in its node's namespace."""
        proc = run([IP, "netns", "exec", self.nodes[pod.node].name, self.tool, command, NET,
                    pod.ns.path], check=False, env=self.env(pod.node, port_mappings), timeout=60)
        if check:
            assert proc.returncode == 0, "%s: %s %s" % (command, proc.stdout, proc.stderr)
        return proc

    def add_pod(self, i, host_port=False):
        mappings = [{"hostPort": HOST_PORT, "containerPort": HOST_PORT, "protocol": proto}
                    for proto in ("tcp", "udp")] if host_port else []
        pod = Pod(self.make_netns("kpod"), i, None)
        result = json.loads(self.command("add", pod, port_mappings=mappings).stdout)
        pod.address = result["ips"][0]["address"].split("/")[0]
        self.pods.append(pod)
        return pod

    def cache_file(self, pod):
        """The cached ADD result of `pod` (libcni's layout)."""
        cache = self.tmp / ("node%d" % pod.node) / "cache" / "results"
        (found,) = [p for p in cache.iterdir()
                    if json.loads(p.read_text()).get("netns") == pod.ns.path]
        return found

    def seen(self, server, client, address):
        """{"tcp": source, "udp": source} a server in `server` sees from `client`."""
        return sources_seen(server, client, 4, address)


def both(address):
    return {"tcp": address, "udp": address}


def local_sources_seen(node, pod):
    """The source the node sees on a UDP datagram that the node itself sends from `pod`'s address
    to its own underlay address: such a packet passes POSTROUTING with a local destination, the
    one case where the `fib daddr type local` exclusion decides."""
    server = subprocess.Popen([IP, "netns", "exec", node.name, "python3", "-c", SERVER, "4", PORT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = ("import socket, sys, time\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "s.setsockopt(socket.SOL_IP, 19, 1)      # IP_TRANSPARENT: any source\n"
              "s.bind((sys.argv[1], 0))\n"
              "for _ in range(20):\n"
              "    s.sendto(b'x', (sys.argv[2], int(sys.argv[3])))\n"
              "    time.sleep(0.1)\n")
    try:
        node.run("python3", "-c", sender, pod.address, node_address(pod.node), PORT)
    finally:
        server.kill()
        out, err = server.communicate(timeout=10)
    seen = set(line.split()[1] for line in out.splitlines() if line.startswith("udp "))
    assert seen, "nothing arrived: %s" % err
    return seen


# --- reading the rules back ----------------------------------------------------------------------

def masq_rule_texts(node):
    """`nft list chain inet cni_plugins_masquerade masq_checks` rules, comments dropped."""
    proc = node.run("nft", "list", "chain", "inet", "cni_plugins_masquerade", "masq_checks",
                    check=False)
    return [line.strip().split(" comment ")[0] for line in proc.stdout.splitlines()
            if "saddr" in line]


def iptables_lines(node):
    """Every `-A` line of table nat (iptables-save), both families, that concerns CNI chains."""
    return [line for program in ("iptables-save", "ip6tables-save")
            for line in node.run(program, "-t", "nat").stdout.splitlines()
            if line.startswith("-A") and "CNI-" in line]


def portmap_rules(node):
    """Rules of the cni_hostport tables that map a port (dnat) or masquerade a mapping."""
    return [e["rule"] for e in ruleset(node) if "rule" in e
            and e["rule"]["table"] == "cni_hostport"
            and any("dnat" in x or "masquerade" in x for x in e["rule"]["expr"])]


def exclusion_layout(pod, backend):
    """The rules a pod's address must have, in the backend's text."""
    if backend == "iptables":
        return ["-d %s -j ACCEPT" % pod_cidr(pod.node), "-d %s -j ACCEPT" % CLUSTER_CIDR,
                "-m addrtype --dst-type LOCAL -j ACCEPT", "! -d 224.0.0.0/4 -j MASQUERADE"]
    return ["ip saddr %s ip daddr %s return" % (pod.address, CLUSTER_CIDR),
            "ip saddr %s fib daddr type local return" % pod.address,
            "ip saddr %s ip daddr != %s masquerade" % (pod.address, pod_cidr(pod.node))]


def pod_rules(node, pod, backend):
    """The pod's masquerade rules as `exclusion_layout` writes them."""
    if backend == "iptables":
        comment = ' -m comment --comment "name: \\"%s\\" id: \\"' % NET
        chain_lines = [line for line in iptables_lines(node)
                       if not line.startswith("-A POSTROUTING")]
        jumps = [line for line in iptables_lines(node)
                 if line.startswith("-A POSTROUTING -s %s/32 " % pod.address)]
        assert len(jumps) <= 1, jumps
        if not jumps:
            return []
        chain = jumps[0].split(" -j ")[-1]
        return [line.split(" ", 2)[2].split(comment)[0] + " -j " + line.split(" -j ")[-1]
                for line in chain_lines if line.startswith("-A %s " % chain)]
    return [text for text in masq_rule_texts(node) if text.startswith("ip saddr %s " % pod.address)]


# --- the cluster with ipMasqExclude --------------------------------------------------------------

@pytest.fixture
def tool(ours_bin):
    return str(ours_bin / "cni-bridge.pyz")


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_pods_keep_their_addresses_across_nodes_and_are_masqueraded_outside(
        make_netns, tmp_path, tool, ours_bin, backend):
    if backend == "iptables":
        skip_without_iptables()
    cluster = Cluster(make_netns, tmp_path, tool, ours_bin, ipMasqBackend=backend,
                      ipMasqExclude=[CLUSTER_CIDR, OTHER_FAMILY_CIDR])
    node1, node2 = cluster.nodes[1], cluster.nodes[2]
    a1 = cluster.add_pod(1, host_port=True)
    a2 = cluster.add_pod(1)
    b1 = cluster.add_pod(2)
    for pod in (a1, a2, b1):
        assert pod_rules(cluster.nodes[pod.node], pod, backend) == exclusion_layout(pod, backend)

    # Pod to pod, TCP and UDP: the sender's own address, on one node and across nodes.
    assert cluster.seen(a2.ns, a1.ns, a2.address) == both(a1.address)
    assert cluster.seen(b1.ns, a2.ns, b1.address) == both(a2.address)
    assert cluster.seen(a2.ns, b1.ns, a2.address) == both(b1.address)
    # Outside the cluster: masqueraded to the node's address (the outside has no route to pods).
    assert cluster.seen(cluster.outside, a2.ns, OUTSIDE) == both(node_address(1))
    assert cluster.seen(cluster.outside, b1.ns, OUTSIDE) == both(node_address(2))
    # The node's own addresses are not masqueraded, even on a path through POSTROUTING (node 2:
    # node 1's PORT is a1's hostPort).
    assert cluster.seen(node2, b1.ns, node_address(2)) == both(b1.address)
    assert local_sources_seen(node2, b1) == {b1.address}
    # The hostPort, from outside and from a pod on another node (whose node masquerades it:
    # node addresses are outside the cluster CIDR, as with kubenet).
    assert cluster.seen(a1.ns, cluster.outside, node_address(1)) == both(OUTSIDE)
    assert cluster.seen(a1.ns, b1.ns, node_address(1)) == both(node_address(2))

    # CHECK passes, and fails once an exclusion rule is removed by hand.
    for pod in (a1, a2, b1):
        cluster.command("check", pod)
    if backend == "iptables":
        (jump,) = [line for line in iptables_lines(node1)
                   if line.startswith("-A POSTROUTING -s %s/32 " % a2.address)]
        chain = jump.split(" -j ")[-1]
        node1.run("iptables", "-t", "nat", "-D", chain, "-d", CLUSTER_CIDR, "-m", "comment",
                  "--comment", 'name: "%s" id: "%s"' % (NET, cluster_id(a2)), "-j", "ACCEPT")
    else:
        listing = node1.run("nft", "-a", "list", "chain", "inet", "cni_plugins_masquerade",
                            "masq_checks").stdout
        (handle,) = [line.rsplit("handle ", 1)[1] for line in listing.splitlines()
                     if "ip saddr %s fib daddr type local return" % a2.address in line]
        node1.run("nft", "delete", "rule", "inet", "cni_plugins_masquerade", "masq_checks",
                  "handle", handle)
    failed = cluster.command("check", a2, check=False)
    assert failed.returncode != 0 and "masquerade rule" in failed.stdout + failed.stderr, \
        explain(failed)
    cluster.command("check", a1)

    # GC: a pod the runtime forgot (its cached result gone) loses its rules; the others keep
    # theirs.
    cluster.cache_file(a2).unlink()
    cluster.command("gc", a2)
    assert pod_rules(node1, a2, backend) == [] and a2.address not in reservations(
        tmp_path / "node1" / "ipam")
    assert pod_rules(node1, a1, backend) == exclusion_layout(a1, backend)
    assert cluster.seen(b1.ns, a1.ns, b1.address) == both(a1.address)

    # DEL of the rest leaves no rule of any kind, and no reservation.
    for pod in (a1, b1):
        cluster.command("del", pod)
    for i in (1, 2):
        node = cluster.nodes[i]
        assert masq_rule_texts(node) == [] and iptables_lines(node) == []
        assert portmap_rules(node) == []
        assert reservations(tmp_path / ("node%d" % i) / "ipam") == {}


def cluster_id(pod):
    """The container ID our `add` command gives a pod (cnitool's rule: from the netns path)."""
    import hashlib
    return "cnitool-" + hashlib.sha512(pod.ns.path.encode()).hexdigest()[:20]


# --- without the key: exactly the reference ------------------------------------------------------

@pytest.mark.parametrize("plugins", ["ours", "reference"])
def test_without_the_key_the_cluster_behaves_as_the_reference(make_netns, tmp_path, tool, ours_bin,
                                                              plugins):
    if plugins == "reference":
        if not all((REF_DIR / name).is_file() for name in ("bridge", "host-local", "portmap",
                                                           "loopback")):
            pytest.skip("reference plugins not installed: apt-get install "
                        "containernetworking-plugins")
        skip_without_iptables()
    cni_path = ours_bin if plugins == "ours" else REF_DIR
    cluster = Cluster(make_netns, tmp_path, tool, cni_path, version="1.0.0")
    a1, a2, b1 = cluster.add_pod(1), cluster.add_pod(1), cluster.add_pod(2)
    if plugins == "ours":           # today's layout: one rule per address, nothing else
        assert masq_rule_texts(cluster.nodes[1]) == [
            "ip saddr %s ip daddr != %s masquerade" % (pod.address, pod_cidr(1))
            for pod in (a1, a2)]
    # The same sources with either plugin set: across nodes, the sending node's address.
    assert cluster.seen(a2.ns, a1.ns, a2.address) == both(a1.address)
    assert cluster.seen(b1.ns, a1.ns, b1.address) == both(node_address(1))
    assert cluster.seen(a1.ns, b1.ns, a1.address) == both(node_address(2))
    assert cluster.seen(cluster.outside, a1.ns, OUTSIDE) == both(node_address(1))
    assert cluster.seen(cluster.nodes[1], a1.ns, node_address(1)) == both(a1.address)
    assert a1.address not in local_sources_seen(cluster.nodes[1], a1)
    for pod in (a1, a2, b1):
        cluster.command("del", pod)
    for i in (1, 2):
        assert masq_rule_texts(cluster.nodes[i]) == [] and iptables_lines(cluster.nodes[i]) == []


# --- bad values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, named", [(["10.244.0.0"], "'10.244.0.0'"),
                                          ([CLUSTER_CIDR, "10.96.0.0/99"], "'10.96.0.0/99'"),
                                          ([24], "24"), ("10.244.0.0/16", "must be a list")])
def test_malformed_exclusion_is_code_7_naming_it_and_nothing_is_left(ours_bin, node, container,
                                                                     data_dir, value, named):
    from tests.helpers import run_cni
    config = {"cniVersion": "1.0.0", "name": NET, "type": "bridge", "bridge": "cbr0",
              "isGateway": True, "ipMasq": True, "ipMasqExclude": value,
              "ipam": {"type": "host-local", "dataDir": str(data_dir),
                       "ranges": [[{"subnet": pod_cidr(1)}]]}}
    res = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container)
    assert res.returncode != 0 and res.json["code"] == 7, explain(res)
    assert "ipMasqExclude" in res.json["msg"] and named in res.json["msg"], res.json
    assert sorted(node.links()) == ["lo"] and sorted(container.links()) == ["lo"]
    assert reservations(data_dir) == {} and masq_rule_texts(node) == []


# --- both families ---------------------------------------------------------------------------------

def test_each_family_gets_its_own_exclusions(ours_bin, node, container, data_dir):
    """A dual-stack attachment: the IPv4 CIDRs guard its IPv4 address, the IPv6 ones its IPv6
    address, each with the node's own addresses; CHECK passes; DEL removes them all."""
    from tests.helpers import run_cni
    node.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    config = {"cniVersion": "1.0.0", "name": NET, "type": "bridge", "bridge": "cbr0",
              "isGateway": True, "ipMasq": True,
              "ipMasqExclude": [CLUSTER_CIDR, OTHER_FAMILY_CIDR, "192.168.0.0/16"],
              "ipam": {"type": "host-local", "dataDir": str(data_dir),
                       "ranges": [[{"subnet": pod_cidr(1)}], [{"subnet": "fd00:244:1::/64"}]]}}
    res = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container)
    assert res.returncode == 0, explain(res)
    v4, v6 = (ip["address"].split("/")[0] for ip in res.json["ips"])
    assert masq_rule_texts(node) == [
        "ip saddr %s ip daddr %s return" % (v4, CLUSTER_CIDR),
        "ip saddr %s ip daddr 192.168.0.0/16 return" % v4,
        "ip saddr %s fib daddr type local return" % v4,
        "ip saddr %s ip daddr != %s masquerade" % (v4, pod_cidr(1)),
        "ip6 saddr %s ip6 daddr %s return" % (v6, OTHER_FAMILY_CIDR),
        "ip6 saddr %s fib daddr type local return" % v6,
        "ip6 saddr %s ip6 daddr != fd00:244:1::/64 masquerade" % v6]
    check = run_cni(ours_bin, "bridge", "CHECK", dict(config, prevResult=res.json), node=node,
                    netns=container)
    assert check.returncode == 0, explain(check)
    # CHECK compares the rules with the config: another exclusion list fails it.
    other = dict(config, prevResult=res.json, ipMasqExclude=[CLUSTER_CIDR])
    check = run_cni(ours_bin, "bridge", "CHECK", other, node=node, netns=container)
    assert check.returncode != 0 and check.json["code"] == 999, explain(check)
    res = run_cni(ours_bin, "bridge", "DEL", config, node=node, netns=container)
    assert res.returncode == 0, explain(res)
    assert masq_rule_texts(node) == [] and reservations(data_dir) == {}
