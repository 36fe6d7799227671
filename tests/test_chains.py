"""Runtimes' default networks on our file alone (issues 15, 16 and 17): the conflists of conf/ as
containerd, podman (CNI backend), nerdctl, CRI-O and k3s (the bridge chain flannel delegates to)
set them up, run as libcni runs them, with CNI_PATH holding nothing but our zipapp and its links
(no reference plugin reachable).

Each chain is driven by the zipapp's cnitool-like operator commands (`cni-bridge.pyz add|check|del
NETWORK NETNS`): ADD in order threading prevResult, CHECK and DEL (in reverse) with libcni's cached
result, capabilities from CAP_ARGS as a CRI runtime passes a pod's hostPorts and bandwidth
annotations.  Every test builds a node namespace, a "remote" namespace on the node's uplink (a
client outside the node) and containers; what the chain did is read back from the kernel (`ip -j`,
`nft -j`, `iptables-save`, `tc -j`) and proved with traffic; after DEL nothing of the attachment
may be left: veth, reservation, port-mapping, masquerade and firewall rules, qdiscs, IFB device,
cached result.
"""
import json
import os
import shutil

import pytest

from tests.helpers import (IP, MASQ_CHAIN, PLUGIN_NAMES, REPO, exchange, masq_table, reservations, run,
                           ruleset, serve_ports)

pytestmark = pytest.mark.kernel

NODE_UP, REMOTE, UP_PREFIX = "203.0.113.1", "203.0.113.2", 24       # the node's uplink, TEST-NET-3
TIMEOUT = 60
PYZ = "cni-bridge.pyz"


# --- the runtimes' conflists ----------------------------------------------------------------------
# README's conf/ examples, as each runtime writes its default network (no public IPv6 range), with
# the test's own host-local dataDir.

def runtime_conf(filename, data_dir, name=None):
    """conf/<filename> with ipam.dataDir set (and the network renamed to `name` when given)."""
    conflist = json.loads((REPO / "conf" / filename).read_text())
    for plugin in conflist["plugins"]:
        if "ipam" in plugin:
            plugin["ipam"]["dataDir"] = str(data_dir)
    if name:
        conflist["name"] = name
    return conflist


def containerd_net(data_dir):
    return runtime_conf("10-containerd-net.conflist", data_dir)


def podman_net(data_dir, name=None):
    return runtime_conf("87-podman.conflist", data_dir, name)


def nerdctl_net(data_dir):
    return runtime_conf("nerdctl-bridge.conflist", data_dir)


def k3s_net(data_dir):
    return runtime_conf("10-k3s-bridge.conflist", data_dir)


def host_port(port, container_port):
    """A Kubernetes hostPort as the CRI runtime passes it (CAP_ARGS portMappings)."""
    return {"hostPort": port, "containerPort": container_port, "protocol": "tcp", "hostIP": ""}


# --- the site ------------------------------------------------------------------------------------

class Site:
    """A node with an uplink to a remote namespace, a conflist directory and the operator commands
    of our zipapp, with CNI_PATH holding only our zipapp's links."""

    def __init__(self, make_netns, bin_dir, tmp_path):
        self.make_netns = make_netns
        self.bin = bin_dir
        self.data_dir = tmp_path / "ipam"
        self.conf_dir = tmp_path / "net.d"
        self.cache_dir = tmp_path / "cache"
        self.conf_dir.mkdir()
        self.node = make_netns("chn")
        self.remote = make_netns("chr")
        self.servers = []
        run([IP, "-n", self.node.name, "link", "add", "chup0", "type", "veth", "peer", "name", "up0",
             "netns", self.remote.name])
        for ns, dev, addr in ((self.node, "chup0", NODE_UP), (self.remote, "up0", REMOTE)):
            run([IP, "-n", ns.name, "addr", "add", "%s/%d" % (addr, UP_PREFIX), "dev", dev])
            run([IP, "-n", ns.name, "link", "set", dev, "up"])

    def install(self, conflist):
        (self.conf_dir / ("%s.conflist" % conflist["name"])).write_text(json.dumps(conflist))
        return conflist["name"]

    def operator(self, command, network, container, caps=None, check=True):
        """`cni-bridge.pyz COMMAND NETWORK NETNS` in the node, as cnitool would be run."""
        env = {"NETCONFPATH": self.conf_dir, "CNI_PATH": self.bin, "CNI_CACHE_DIR": self.cache_dir,
               "CNI_IFNAME": "eth0", "CAP_ARGS": json.dumps(caps or {})}
        proc = self.node.run("env", *["%s=%s" % kv for kv in env.items()], self.bin / PYZ, command,
                             network, container.path, check=False, timeout=TIMEOUT)
        if check:
            assert proc.returncode == 0, "%s %s: %s %s" % (command, network, proc.stdout, proc.stderr)
        return json.loads(proc.stdout) if command == "add" else proc

    def cached(self, network):
        """libcni's cached results of `network` (file names)."""
        results = self.cache_dir / "results"
        return sorted(p.name for p in results.glob(network + "-*")) if results.is_dir() else []

    def serve(self, ns, *ports):
        self.servers.append(serve_ports(ns, *ports))

    def connect(self, ns, host, port, wait=5.0):
        """(source the server saw, address it was reached on) over TCP, or None when nothing
        answered."""
        return exchange(ns, "tcp", host, port, wait)

    def close(self):
        for proc in self.servers:
            proc.kill()
            proc.wait()


@pytest.fixture
def site(make_netns, ours_bin, tmp_path):
    """The site, after checking that CNI_PATH reaches nothing but our zipapp."""
    entries = sorted(os.listdir(ours_bin))
    assert entries == sorted(PLUGIN_NAMES + (PYZ,)), entries
    for name in PLUGIN_NAMES:
        assert os.path.realpath(ours_bin / name) == os.path.realpath(ours_bin / PYZ), name
    s = Site(make_netns, ours_bin, tmp_path)
    yield s
    s.close()


# --- reading the kernel ----------------------------------------------------------------------------

def container_address(result, family=4):
    return [ip["address"].split("/")[0] for ip in result["ips"] if (":" in ip["address"]) == (family == 6)][0]


def host_veth(result):
    """The node-side veth of the attachment: the result's interface with no sandbox that is not
    the bridge (which comes first)."""
    on_node = [i["name"] for i in result["interfaces"] if not i.get("sandbox")]
    return on_node[1]


def portmap_rules(node, network):
    """Rules of the portmap tables commented with `network`'s attachments."""
    return [e["rule"] for e in ruleset(node) if "rule" in e and e["rule"]["table"] == "cni_hostport"
            and e["rule"].get("comment", "").startswith("net:%s " % network)]


def masquerade_rules(node):
    return masq_table(node)[1].get(MASQ_CHAIN, [])


def iptables_lines(node, address):
    """iptables-save lines of the node's filter table that name `address`."""
    return [line for line in node.run("iptables-save", "-t", "filter").stdout.splitlines()
            if address + "/32" in line]


def ifb_links(node):
    return [link["ifname"] for link in node.ip_json("link", "show", "type", "ifb")]


def qdisc_kinds(node, dev):
    return sorted(q["kind"] for q in json.loads(node.run("tc", "-j", "qdisc", "show", "dev", dev).stdout))


def check_attached(site, network, container, result, gateway):
    """The container holds the result's address, reaches the gateway; the host veth is the bridge's."""
    address = container_address(result)
    held = [a["local"] for link in container.ip_json("addr", "show", "dev", "eth0") for a in link["addr_info"]]
    assert address in held, held
    container.run("ping", "-c", "1", "-W", "3", gateway, timeout=10)
    veth = host_veth(result)
    assert site.node.links()[veth]["master"] == result["interfaces"][0]["name"]
    assert reservations(site.data_dir / network).get(address, "").split()[1:] == ["eth0"]
    assert site.cached(network)
    return address, veth


def check_gone(site, network, address, veth):
    """Nothing of the attachment is left on the node, in host-local's state or libcni's cache."""
    assert veth not in site.node.links()
    assert reservations(site.data_dir / network) == {}
    assert portmap_rules(site.node, network) == []
    assert masquerade_rules(site.node) == []
    assert site.cached(network) == []


# --- the chains --------------------------------------------------------------------------------------

def test_containerd_default_network_with_a_host_port(site, make_netns):
    """containerd's CRI: the loopback plugin for lo (conf/99-loopback.conf, as containerd runs it
    before the pod's network), then its default conflist (bridge cni0 with isGateway, ipMasq and
    promiscMode, portmap): lo is up, the pod reaches its gateway, a hostPort answers a client
    outside the node (which the pod sees as itself), CHECK passes, DEL leaves nothing and closes
    the port."""
    shutil.copy(str(REPO / "conf" / "99-loopback.conf"), str(site.conf_dir))
    network = site.install(containerd_net(site.data_dir))
    pod = make_netns("pod")
    pod.run(IP, "link", "set", "lo", "down")                                # as a runtime makes it
    site.operator("add", "lo", pod)
    assert "UP" in pod.links()["lo"]["flags"]
    caps = {"portMappings": [host_port(30080, 80)]}
    result = site.operator("add", network, pod, caps)
    assert [i["name"] for i in result["interfaces"] if i.get("sandbox")] == ["eth0"]
    address, veth = check_attached(site, network, pod, result, "10.88.0.1")
    assert ":" in container_address(result, 6)
    assert "PROMISC" in site.node.links()["cni0"]["flags"]
    mapped = sorted(r["family"] for r in portmap_rules(site.node, network) if r["chain"] == "hostports")
    assert mapped == ["ip", "ip6"], mapped                                 # one rule per family
    assert masquerade_rules(site.node)
    site.serve(pod, 80)
    assert site.connect(site.remote, NODE_UP, 30080) == (REMOTE, address)
    site.operator("check", network, pod, caps)
    site.operator("del", network, pod, caps)
    site.operator("del", "lo", pod)
    check_gone(site, network, address, veth)
    assert [link for link in pod.links() if link != "lo"] == []
    assert site.connect(site.remote, NODE_UP, 30080, wait=0.5) is None
    site.operator("del", network, pod, caps)                                 # a second DEL is fine


def test_k3s_chain_with_a_host_port_and_bandwidth(site, make_netns):
    """k3s's chain (bridge with hairpinMode, forceAddress, isDefaultGateway; portmap; bandwidth):
    the pod's default route is its gateway, the hostPort answers from outside, the pod's bandwidth
    annotations become a token bucket on the host veth and an IFB with its own; DEL removes the
    qdiscs and the IFB with the rest."""
    network = site.install(k3s_net(site.data_dir))
    pod = make_netns("pod")
    caps = {"portMappings": [host_port(30081, 8080)],
            "bandwidth": {"ingressRate": 10000000, "ingressBurst": 200000,
                          "egressRate": 5000000, "egressBurst": 100000}}
    result = site.operator("add", network, pod, caps)
    address, veth = check_attached(site, network, pod, result, "10.42.0.1")
    routes = pod.ip_json("route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.42.0.1", "eth0")], routes
    ifbs = ifb_links(site.node)
    assert len(ifbs) == 1 and ifbs[0] in [i["name"] for i in result["interfaces"]], (ifbs, result)
    assert qdisc_kinds(site.node, veth) == ["ingress", "tbf"]
    assert "tbf" in qdisc_kinds(site.node, ifbs[0])
    site.serve(pod, 8080)
    assert site.connect(site.remote, NODE_UP, 30081) == (REMOTE, address)
    site.operator("check", network, pod, caps)
    site.operator("del", network, pod, caps)
    check_gone(site, network, address, veth)
    assert ifb_links(site.node) == []
    assert site.connect(site.remote, NODE_UP, 30081, wait=0.5) is None


@pytest.mark.parametrize("shape", ["podman", "nerdctl"])
def test_podman_and_nerdctl_default_networks(site, make_netns, shape):
    """podman's CNI default network and nerdctl's default network (bridge, portmap, firewall,
    tuning; nerdctl's firewall with ingressPolicy same-bridge): the published port answers from
    outside, the firewall's FORWARD rules name the container (iptables-save), and DEL removes
    them with the rest."""
    conflist = (podman_net if shape == "podman" else nerdctl_net)(site.data_dir)
    network = site.install(conflist)
    bridge, gateway = conflist["plugins"][0]["bridge"], "10.88.0.1" if shape == "podman" else "10.4.0.1"
    ctr = make_netns("ctr")
    caps = {"portMappings": [host_port(8080, 80)]}
    result = site.operator("add", network, ctr, caps)
    address, veth = check_attached(site, network, ctr, result, gateway)
    site.serve(ctr, 80)
    assert site.connect(site.remote, NODE_UP, 8080) == (REMOTE, address)
    forward = iptables_lines(site.node, address)
    assert any(l.startswith("-A CNI-FORWARD -s %s/32" % address) and l.endswith("-j ACCEPT") for l in forward), forward
    assert any(l.startswith("-A CNI-FORWARD -d %s/32" % address) and "RELATED,ESTABLISHED" in l for l in forward)
    isolation = [l for l in site.node.run("iptables-save", "-t", "filter").stdout.splitlines()
                 if l.startswith("-A CNI-ISOLATION-STAGE-1 -i %s " % bridge)]
    assert bool(isolation) == (shape == "nerdctl"), isolation
    site.operator("check", network, ctr, caps)
    site.operator("del", network, ctr, caps)
    check_gone(site, network, address, veth)
    assert iptables_lines(site.node, address) == []


def test_podman_network_lets_the_container_out_through_a_dropping_forward(site, make_netns):
    """With the node's FORWARD policy DROP (as Docker leaves it), the container of podman's default
    network reaches a server outside the node only because the chain's firewall lets it; after DEL
    its rules are gone and a second container (not added through the chain) stays blocked."""
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed: cannot set the FORWARD policy")
    site.node.run("iptables", "-P", "FORWARD", "DROP")
    network = site.install(podman_net(site.data_dir))
    site.serve(site.remote, 9090)
    ctr = make_netns("ctr")
    result = site.operator("add", network, ctr)
    address, veth = check_attached(site, network, ctr, result, "10.88.0.1")
    assert site.connect(ctr, REMOTE, 9090) == (NODE_UP, REMOTE)              # masqueraded, answered
    site.operator("del", network, ctr)
    check_gone(site, network, address, veth)
    assert iptables_lines(site.node, address) == []
    # The same container address, attached by our bridge alone (no firewall in its chain): dropped.
    bridge_only = podman_net(site.data_dir, name="podman-bare")
    bridge_only["plugins"] = bridge_only["plugins"][:1]
    site.install(bridge_only)
    other = make_netns("ctr")
    site.operator("add", "podman-bare", other)
    assert site.connect(other, REMOTE, 9090, wait=1.0) is None
    site.operator("del", "podman-bare", other)


def test_crio_default_network(site, make_netns):
    """CRI-O's default conflist (bridge cni0 with isGateway, ipMasq, hairpinMode; host-local): two
    containers get addresses, reach the gateway and each other; CHECK passes; DEL leaves nothing."""
    network = site.install(runtime_conf("11-crio-ipv4-bridge.conflist", site.data_dir))
    first, second = make_netns("ctr"), make_netns("ctr")
    attached = []
    for ctr in (first, second):
        result = site.operator("add", network, ctr)
        attached.append(check_attached(site, network, ctr, result, "10.85.0.1"))
    assert attached[0][0] != attached[1][0]
    first.run("ping", "-c", "1", "-W", "3", attached[1][0], timeout=10)
    for ctr, (address, veth) in zip((first, second), attached):
        site.operator("check", network, ctr)
        site.operator("del", network, ctr)
    assert all(veth not in site.node.links() for _, veth in attached)
    assert reservations(site.data_dir / network) == {} and masquerade_rules(site.node) == []
    assert site.cached(network) == []


def test_chains_run_no_program_but_the_plugins(site, make_netns, tmp_path):
    """containerd's and k3s's chains on an nf_tables node: no `ip`, `tc`, `nft` or `iptables` is
    run (a PATH of recording stand-ins sees nothing), everything still works and goes."""
    spy_dir, log = tmp_path / "spy", tmp_path / "spy.log"
    spy_dir.mkdir()
    for program in ("ip", "tc", "nft", "iptables", "ip6tables", "iptables-nft", "iptables-legacy"):
        spy = spy_dir / program
        spy.write_text("#!/bin/sh\necho %s \"$@\" >> %s\nexit 1\n" % (program, log))
        spy.chmod(0o755)
    shutil.copy(str(REPO / "conf" / "99-loopback.conf"), str(site.conf_dir))
    for network in ("lo", site.install(containerd_net(site.data_dir)), site.install(k3s_net(site.data_dir))):
        pod = make_netns("pod")
        caps = {"portMappings": [host_port(30090, 80)],
                "bandwidth": {"ingressRate": 10000000, "ingressBurst": 200000}}
        env = {"PATH": "%s:%s" % (spy_dir, os.environ.get("PATH", "")), "NETCONFPATH": site.conf_dir,
               "CNI_PATH": site.bin, "CNI_CACHE_DIR": site.cache_dir, "CAP_ARGS": json.dumps(caps)}
        envs = ["%s=%s" % kv for kv in env.items()]
        for command in ("add", "check", "del"):
            proc = site.node.run("env", *envs, site.bin / PYZ, command, network, pod.path, check=False,
                                 timeout=TIMEOUT)
            assert proc.returncode == 0, "%s %s: %s %s" % (command, network, proc.stdout, proc.stderr)
        assert reservations(site.data_dir / network) == {} and portmap_rules(site.node, network) == []
        if network != "lo":
            site.node.run(IP, "link", "del", "cni0")    # both name their bridge cni0, set up differently
    assert not log.exists(), log.read_text()
