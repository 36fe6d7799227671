"""A real runtime: podman 4.3 (CNI backend, calling plugins through libcni) runs busybox containers
on our plugins (PLUGIN_NAMES: bridge, host-local, portmap, tuning, firewall), with the reference's
for any chained plugin we do not have, in the chain as in the networks podman generates.  The
checks read the kernel (the container's addresses, MAC and routes through /proc/<pid>/ns/net, the
node's veths and nftables ruleset), the reservation files and libcni's result cache, and compare
them with what `podman inspect` reports.

Everything is private.  Podman runs in a node network namespace the test makes, always inside one
mount namespace held by a helper process (started with `ip netns exec <node>`), where /run and
/var/lib are private: podman's, conmon's and crun's run state, the containers' namespace files,
libcni's cache (/var/lib/cni/results) and host-local's default dataDir never reach the machine.
Storage, containers.conf, storage.conf, registries.conf, policy.json and the network config directory
are temporary too.  Teardown removes the containers and networks, then the rest.
"""
import ipaddress
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers import DEFAULT_PATH, IP, PLUGIN_NAMES, REF_DIR, reservations, run

RUNTIME_PROGRAMS = ("podman", "crun", "conmon", "iptables", "nsenter")
REFERENCE_CHAINED = ("portmap", "firewall", "tuning")   # what podman's generated networks add after bridge
BUSYBOX = Path("/bin/busybox")
APT = "apt-get install podman crun conmon busybox-static iptables containernetworking-plugins"


def is_static_elf(path):
    """True when `path` is an ELF executable without a program interpreter (statically linked)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:          # 64-bit only
                return False
            phoff, = struct.unpack_from("<Q", header, 32)
            phentsize, phnum = struct.unpack_from("<HH", header, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))  # PT_INTERP


def missing_runtime():
    """Why podman cannot run here, or None."""
    absent = [name for name in RUNTIME_PROGRAMS if shutil.which(name, path=DEFAULT_PATH) is None]
    if absent:
        return "%s not installed: %s" % (", ".join(absent), APT)
    if not is_static_elf(BUSYBOX):
        return "%s is absent or not statically linked: %s" % (BUSYBOX, APT)
    return None


pytestmark = [pytest.mark.kernel, pytest.mark.podman, pytest.mark.slow,
              pytest.mark.skipif(missing_runtime() is not None, reason=str(missing_runtime()))]

IMAGE = "localhost/cbt-busybox:test"
APPLETS = ("sh", "ping", "sleep", "cat", "httpd")
PAGE = "served from a container on cni-bridge\n"
TIMEOUT = 60                                    # seconds, for every podman command
DEFAULT_NET, DEFAULT_SUBNET, DEFAULT_GATEWAY = "podman", "10.88.0.0/16", "10.88.0.1"   # podman's own
V4_NET, V4_SUBNET, V4_GATEWAY = "cbtv4", "10.89.1.0/24", "10.89.1.1"
DUAL_NET, DUAL_SUBNETS, DUAL_GATEWAYS = "cbtdual", ("10.89.2.0/24", "fd89:2::/64"), ("10.89.2.1", "fd89:2::1")
HAND_NET, HAND_SUBNET, HAND_GATEWAY = "cbthand", "10.89.3.0/24", "10.89.3.1"

CONTAINERS_CONF = """\
[containers]
netns = "private"
# Where AppArmor is on, podman would load its profile into the kernel: machine-wide state.
apparmor_profile = "unconfined"
# crun would make cgroups in the machine's cgroup2 hierarchy: not ours to touch.
cgroups = "disabled"
log_driver = "k8s-file"
# podman's default (1048576 open files) is above the hard limit of many CI machines.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
tmp_dir = "{state}/libpod"
image_copy_tmp_dir = "{work}/tmp"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}"]
network_config_dir = "{netd}"
"""
STORAGE_CONF = """\
[storage]
driver = "vfs"
runroot = "{state}/run"
graphroot = "{state}/storage"
"""
POLICY = {"default": [{"type": "insecureAcceptAnything"}]}
# GET / from HOST PORT, printing the whole response (busybox-static's wget crashes on Debian 12).
HTTP_GET = """\
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    sys.stdout.write(b"".join(iter(lambda: conn.recv(65536), b"")).decode())
"""

# Run by `ip netns exec <node>` (a new mount namespace): a cgroup2 file system for crun (the fresh
# /sys has none), private /run and /var/lib; then wait until the test closes stdin.
HOLDER_SCRIPT = """\
set -e
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs -o mode=0755 none /run
mount --bind "$1" /var/lib
echo ready
read -r _ || true
"""


class Podman:
    """podman with private storage, configuration and state, run inside the node namespace.

    Every call joins the holder's mount and network namespaces: podman keeps the containers'
    namespace mounts there between calls, which one `ip netns exec` per call would lose.
    """

    def __init__(self, work, node, plugins):
        self.work = work
        self.var_lib = work / "var-lib"            # /var/lib in podman's mount namespace
        self.netd = work / "net.d"
        self.data_dirs = {}                        # network -> its host-local dataDir as seen from here
        self.networks = []                         # networks this test created
        home = work / "home"
        self.state = Path(tempfile.mkdtemp(prefix="cbtpm-", dir="/tmp"))   # short: conmon's socket paths
        for path in (self.var_lib, self.netd, work / "tmp", work / "xdg", home / ".config" / "containers"):
            path.mkdir(parents=True)
        (home / ".config" / "containers" / "policy.json").write_text(json.dumps(POLICY))
        (work / "registries.conf").write_text("")
        (work / "containers.conf").write_text(CONTAINERS_CONF.format(
            state=self.state, work=work, plugins=plugins, netd=self.netd))
        (work / "storage.conf").write_text(STORAGE_CONF.format(state=self.state))
        self.env = {"PATH": DEFAULT_PATH, "HOME": str(home), "TMPDIR": str(work / "tmp"),
                    "XDG_RUNTIME_DIR": str(work / "xdg"), "XDG_CONFIG_HOME": str(home / ".config"),
                    "CONTAINERS_CONF": str(work / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf")}
        self.holder = subprocess.Popen([IP, "netns", "exec", node.name, "sh", "-c", HOLDER_SCRIPT, "holder",
                                        str(self.var_lib)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("could not set up podman's mount namespace in %s" % node.name)
        self.data_dirs[DEFAULT_NET] = self.var_lib / "cni" / "networks" / DEFAULT_NET

    def __call__(self, *args, check=True, timeout=TIMEOUT, wrapper=()):
        """Run `podman args...` (after `wrapper`, e.g. strace) in the node; a CompletedProcess."""
        return run(["nsenter", "-t", self.holder.pid, "-m", "-n", *wrapper, "podman",
                    "--root", self.state / "storage", "--runroot", self.state / "run", *args],
                   check=check, timeout=timeout, env=self.env)

    def close(self):
        """Remove the containers and networks, end the mount namespace, delete the storage."""
        try:
            if self.holder.poll() is None:
                self("rm", "-af", "-t", "0", check=False)
                if self.networks:
                    self("network", "rm", "-f", *self.networks, check=False)
        finally:
            self.holder.stdin.close()
            try:
                self.holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
            shutil.rmtree(self.state, ignore_errors=True)

    def create_network(self, name, *subnets, options=()):
        """`podman network create` with these subnets: podman writes the conflist (bridge with
        host-local, then portmap, firewall, tuning) and host-local keeps the default dataDir."""
        self("network", "create", *["--subnet=" + s for s in subnets], *options, name)
        self.networks.append(name)
        self.data_dirs[name] = self.var_lib / "cni" / "networks" / name

    def write_network(self, name, version, subnet, data_dir, chained=REFERENCE_CHAINED):
        """A conflist written by hand: our bridge with host-local keeping its reservations in
        `data_dir`, then the reference plugins `chained` (configured as podman does)."""
        chain = {"portmap": {"type": "portmap", "capabilities": {"portMappings": True}},
                 "firewall": {"type": "firewall"}, "tuning": {"type": "tuning"}}
        bridge = {"type": "bridge", "bridge": "cbt-" + name, "isGateway": True, "ipMasq": True,
                  "hairpinMode": True, "capabilities": {"ips": True},
                  "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)}}
        conflist = {"cniVersion": version, "name": name, "plugins": [bridge] + [chain[c] for c in chained]}
        (self.netd / (name + ".conflist")).write_text(json.dumps(conflist))
        self.networks.append(name)
        self.data_dirs[name] = data_dir / name

    def run_container(self, name, *options, command=("sleep", "300")):
        """Start a container (sleeping by default); returns its ID."""
        return self("run", "-d", "--name", name, *options, IMAGE, *command).stdout.strip()

    def inspect(self, name):
        return json.loads(self("inspect", name).stdout)[0]

    def kernel(self, name, *args):
        """`ip -j args` in the container's network namespace, parsed."""
        pid = self.inspect(name)["State"]["Pid"]
        out = run(["nsenter", "-t", pid, "-n", IP, "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    def ping(self, name, address):
        self("exec", name, "ping", "-c", "1", "-W", "3", address)

    def cache(self, network, container_id):
        """libcni's cached result of the container's attachment to `network`, or None."""
        found = sorted((self.var_lib / "cni" / "results").glob("%s-%s-*" % (network, container_id)))
        return json.loads(found[0].read_text()) if found else None


class Attachment(NamedTuple):
    """One container interface on one network, as the runtime and the kernel saw it."""
    network: str
    container_id: str
    ifname: str
    addresses: list        # ["10.89.1.2", "fd89:2::2"]
    host_veth: str


@pytest.fixture
def podman(tmp_path, ours_bin, node):
    """A private podman in `node`, with the busybox image imported; our plugins in its CNI dir."""
    borrowed = [name for name in REFERENCE_CHAINED if name not in PLUGIN_NAMES]    # ours where we have it
    absent = [name for name in borrowed if not (REF_DIR / name).is_file()]
    if absent:
        pytest.skip("reference %s not installed: apt-get install containernetworking-plugins" % ", ".join(absent))
    plugins, rootfs = tmp_path / "cni-bin", tmp_path / "rootfs"
    plugins.mkdir()
    for name in PLUGIN_NAMES:
        (plugins / name).symlink_to(ours_bin / name)
    for name in borrowed:
        (plugins / name).symlink_to(REF_DIR / name)
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(str(BUSYBOX), str(rootfs / "bin" / "busybox"))
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "www").mkdir()
    (rootfs / "www" / "index.html").write_text(PAGE)
    run(["tar", "-C", rootfs, "-cf", tmp_path / "rootfs.tar", "."])
    pm = Podman(tmp_path / "podman", node, plugins)
    try:
        pm("import", tmp_path / "rootfs.tar", IMAGE)
        yield pm
    finally:
        pm.close()


def in_subnet(address, subnet):
    return ipaddress.ip_address(address) in ipaddress.ip_network(subnet)


def masqueraded(node):
    """Source addresses that have a masquerade rule in the node (our table inet cni_plugins_masquerade)."""
    found = set()
    for entry in json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]:
        rule = entry.get("rule")
        if not rule or rule["table"] != "cni_plugins_masquerade" or rule["chain"] != "masq_checks":
            continue
        for expr in rule["expr"]:
            match = expr.get("match", {})
            if match.get("op") == "==" and match.get("left", {}).get("payload", {}).get("field") == "saddr":
                found.add(match["right"])
    return found


def host_veths(node):
    return {name for name, link in node.links().items() if link.get("linkinfo", {}).get("info_kind") == "veth"}


def check_attached(podman, node, name, network):
    """Check a running container's attachment to `network` everywhere it shows; return it.

    podman inspect, the kernel inside the container (addresses, MAC, default routes), the reservation
    files, the host veth on the node, the masquerade rules and libcni's cache must all agree.
    """
    info = podman.inspect(name)
    container_id = info["Id"]
    seen = info["NetworkSettings"]["Networks"][network]
    cached = podman.cache(network, container_id)
    assert cached is not None, "libcni has no result for %s on %s" % (name, network)
    ifname = cached["ifName"]
    result = cached["result"]
    addresses = [ip["address"].split("/")[0] for ip in result["ips"]]
    v4 = [a for a in addresses if ":" not in a]
    v6 = [a for a in addresses if ":" in a]
    assert seen["IPAddress"] == (v4[0] if v4 else "")
    assert seen["GlobalIPv6Address"] == (v6[0] if v6 else "")

    link, = podman.kernel(name, "addr", "show", "dev", ifname)
    kernel_addresses = {"%s/%d" % (a["local"], a["prefixlen"]) for a in link["addr_info"]
                        if a.get("scope") == "global"}
    assert kernel_addresses == {ip["address"] for ip in result["ips"]}
    if v4:
        assert "%s/%d" % (seen["IPAddress"], seen["IPPrefixLen"]) in kernel_addresses
    if v6:
        assert "%s/%d" % (seen["GlobalIPv6Address"], seen["GlobalIPv6PrefixLen"]) in kernel_addresses
    assert link["address"] == seen["MacAddress"]
    for family, gateway_key in (("-4", "Gateway"), ("-6", "IPv6Gateway")):
        # With several networks only the first one's default route can be in the kernel.
        if seen[gateway_key] and len(info["NetworkSettings"]["Networks"]) == 1:
            routes = podman.kernel(name, family, "route", "show", "default")
            assert any(r.get("gateway") == seen[gateway_key] and r.get("dev") == ifname for r in routes), routes

    held = reservations(podman.data_dirs[network])
    for address in addresses:
        assert held.get(address, "").split() == [container_id, ifname], held
    on_node = [i["name"] for i in result["interfaces"] if "sandbox" not in i]     # bridge and veth
    host = [iface for iface in on_node if iface in host_veths(node)]
    assert len(host) == 1, (result["interfaces"], host_veths(node))
    bridge, = set(on_node) - set(host)
    assert node.links()[host[0]].get("master") == bridge
    assert set(addresses) <= masqueraded(node)
    return Attachment(network, container_id, ifname, addresses, host[0])


def check_gone(podman, node, attachment):
    """Nothing of `attachment` is left: reservation, host veth, masquerade rules, libcni cache."""
    held = reservations(podman.data_dirs[attachment.network])
    assert not set(attachment.addresses) & set(held), held
    assert not any(attachment.container_id in owner for owner in held.values()), held
    assert attachment.host_veth not in node.links()
    assert not set(attachment.addresses) & masqueraded(node)
    assert podman.cache(attachment.network, attachment.container_id) is None


def test_podman_validates_our_plugins_with_version_calls(podman):
    """Podman asks every plugin of every network for VERSION (CNI_NETNS, CNI_IFNAME and CNI_PATH
    "dummy") and drops the networks whose plugins do not answer: all of ours stay listed."""
    podman.create_network(V4_NET, V4_SUBNET)
    podman.create_network(DUAL_NET, *DUAL_SUBNETS)
    generated = json.loads((podman.netd / (V4_NET + ".conflist")).read_text())
    assert [p["type"] for p in generated["plugins"]] == ["bridge", *REFERENCE_CHAINED]
    assert generated["plugins"][0]["ipam"]["type"] == "host-local"
    if shutil.which("strace", path=DEFAULT_PATH) is None:
        pytest.skip("strace not installed (apt-get install strace): cannot see the VERSION calls")
    trace = podman.work / "strace.out"
    listing = podman("network", "ls", "--format", "{{.Name}}",
                     wrapper=("strace", "-f", "-qq", "-o", trace, "-e", "trace=execve", "-v", "-s", "4096"))
    assert "Error validating" not in listing.stderr and "does not support" not in listing.stderr, listing.stderr
    assert set(listing.stdout.split()) == {DEFAULT_NET, V4_NET, DUAL_NET}
    bridge_calls = []
    for line in trace.read_text().splitlines():
        if re.search(r'execve\("[^"]*/cni-bin/bridge"', line):
            bridge_calls.append(dict(re.findall(r'"(CNI_[A-Z]+)=([^"]*)"', line)))
    versions = [env for env in bridge_calls if env.get("CNI_COMMAND") == "VERSION"]
    assert len(versions) >= 2, bridge_calls                 # one per network file at least
    for env in versions:
        assert (env["CNI_NETNS"], env["CNI_IFNAME"], env["CNI_PATH"]) == ("dummy",) * 3, env


def test_default_network_pings_stop_start_and_rm(podman, node):
    """Two containers on podman's default network: addresses agree everywhere, they reach the
    gateway and each other; stop, start and rm -f each release everything."""
    podman.run_container("a")
    podman.run_container("b")
    a = check_attached(podman, node, "a", DEFAULT_NET)
    b = check_attached(podman, node, "b", DEFAULT_NET)
    assert all(in_subnet(x, DEFAULT_SUBNET) for x in a.addresses + b.addresses)
    assert a.addresses != b.addresses
    podman.ping("a", DEFAULT_GATEWAY)
    podman.ping("a", b.addresses[0])
    podman.ping("b", a.addresses[0])

    podman("stop", "-t", "0", "a")
    check_gone(podman, node, a)
    check_attached(podman, node, "b", DEFAULT_NET)
    podman("start", "a")
    a = check_attached(podman, node, "a", DEFAULT_NET)
    podman.ping("a", b.addresses[0])

    podman("rm", "-f", "-t", "0", "a")
    check_gone(podman, node, a)
    podman("rm", "-f", "-t", "0", "b")
    check_gone(podman, node, b)
    assert reservations(podman.data_dirs[DEFAULT_NET]) == {}
    assert host_veths(node) == set() and masqueraded(node) == set()


def test_static_ip_and_mac(podman, node, tmp_path):
    """--ip reaches host-local as CNI_ARGS IP=, --mac-address our bridge as MAC=; both land in the
    kernel.  No tuning in this network's chain: it would set the MAC from CNI_ARGS as well."""
    podman.write_network(HAND_NET, "0.4.0", HAND_SUBNET, tmp_path / "ipam", chained=("portmap", "firewall"))
    container_id = podman.run_container("s", "--network", HAND_NET, "--ip", "10.89.3.50",
                                        "--mac-address", "02:42:0a:59:03:32")
    cni_args = podman.cache(HAND_NET, container_id)["cniArgs"]
    assert ["IP", "10.89.3.50"] in cni_args and ["MAC", "02:42:0a:59:03:32"] in cni_args
    s = check_attached(podman, node, "s", HAND_NET)
    assert s.addresses == ["10.89.3.50"]
    link, = podman.kernel("s", "link", "show", "dev", s.ifname)
    assert link["address"] == "02:42:0a:59:03:32"
    podman.ping("s", HAND_GATEWAY)
    podman("rm", "-f", "-t", "0", "s")
    check_gone(podman, node, s)


def test_static_ip_on_each_of_two_networks(podman, node):
    """One container, two networks, a static IPv4 address on each (CNI_ARGS IP= per network); the
    dual-stack one also gets a dynamic IPv6 address."""
    podman.create_network(V4_NET, V4_SUBNET)
    podman.create_network(DUAL_NET, *DUAL_SUBNETS)
    podman.run_container("t", "--network", V4_NET + ":ip=10.89.1.60", "--network", DUAL_NET + ":ip=10.89.2.60")
    first = check_attached(podman, node, "t", V4_NET)
    second = check_attached(podman, node, "t", DUAL_NET)
    assert first.ifname != second.ifname
    assert first.addresses == ["10.89.1.60"]
    assert second.addresses[0] == "10.89.2.60" and in_subnet(second.addresses[1], DUAL_SUBNETS[1])
    podman.ping("t", V4_GATEWAY)
    podman.ping("t", DUAL_GATEWAYS[0])
    podman.ping("t", DUAL_GATEWAYS[1])
    podman("rm", "-f", "-t", "0", "t")
    check_gone(podman, node, first)
    check_gone(podman, node, second)


def test_dual_stack_dynamic_and_two_static_addresses(podman, node):
    """A dual-stack network: one container gets an address of each family from host-local, another
    asks for both (podman sends runtimeConfig.ips with bare addresses); they reach each other."""
    podman.create_network(DUAL_NET, *DUAL_SUBNETS)
    podman.run_container("d", "--network", DUAL_NET)
    static_id = podman.run_container("e", "--network", DUAL_NET, "--ip", "10.89.2.70", "--ip6", "fd89:2::70")
    cached = podman.cache(DUAL_NET, static_id)
    assert cached["capabilityArgs"]["ips"] == ["10.89.2.70", "fd89:2::70"]
    assert not any(key == "IP" for key, _ in cached["cniArgs"])
    d = check_attached(podman, node, "d", DUAL_NET)
    e = check_attached(podman, node, "e", DUAL_NET)
    assert [in_subnet(x, s) for x, s in zip(d.addresses, DUAL_SUBNETS)] == [True, True]
    assert e.addresses == ["10.89.2.70", "fd89:2::70"]
    for gateway in DUAL_GATEWAYS:
        podman.ping("d", gateway)
        podman.ping("e", gateway)
    for address in e.addresses:
        podman.ping("d", address)
    podman("rm", "-f", "-t", "0", "d", "e")
    check_gone(podman, node, d)
    check_gone(podman, node, e)
    assert reservations(podman.data_dirs[DUAL_NET]) == {} and masqueraded(node) == set()


def test_network_connect_and_disconnect(podman, node):
    """connect adds a second interface with its own attachment; disconnect removes all of it and
    leaves the first network working."""
    podman.create_network(V4_NET, V4_SUBNET)
    podman.create_network(DUAL_NET, *DUAL_SUBNETS)
    podman.run_container("c", "--network", V4_NET)
    first = check_attached(podman, node, "c", V4_NET)
    podman("network", "connect", DUAL_NET, "c")
    second = check_attached(podman, node, "c", DUAL_NET)
    assert second.ifname != first.ifname
    podman.ping("c", DUAL_GATEWAYS[1])
    podman("network", "disconnect", DUAL_NET, "c")
    check_gone(podman, node, second)
    assert [link["ifname"] for link in podman.kernel("c", "link", "show")] == ["lo", first.ifname]
    check_attached(podman, node, "c", V4_NET)
    podman.ping("c", V4_GATEWAY)
    podman("rm", "-f", "-t", "0", "c")
    check_gone(podman, node, first)


def test_hand_written_1_0_0_network_with_its_own_data_dir(podman, node, tmp_path):
    """A conflist written by hand in cniVersion 1.0.0 (libcni converts our result) with ipam.dataDir
    set: reservations live there, and nothing but the lock and last_reserved_ip.0 stays."""
    data_dir = tmp_path / "ipam"
    podman.write_network(HAND_NET, "1.0.0", HAND_SUBNET, data_dir)
    container_id = podman.run_container("h", "--network", HAND_NET)
    assert podman.cache(HAND_NET, container_id)["result"]["cniVersion"] == "1.0.0"
    h = check_attached(podman, node, "h", HAND_NET)
    assert in_subnet(h.addresses[0], HAND_SUBNET)
    podman.ping("h", HAND_GATEWAY)
    podman("rm", "-f", "-t", "0", "h")
    check_gone(podman, node, h)
    assert sorted(p.name for p in (data_dir / HAND_NET).iterdir()) == ["boot_id", "last_reserved_ip.0", "lock"]


def test_published_port_through_the_reference_portmap(podman, node):
    """-p: the reference portmap, chained after our bridge, reads the container address from our
    result; the node reaches the container's server through the published port."""
    podman.run_container("w", "-p", "8080:80", command=("httpd", "-f", "-p", "80", "-h", "/www"))
    w = check_attached(podman, node, "w", DEFAULT_NET)
    head, _, body = node.run(sys.executable, "-c", HTTP_GET, DEFAULT_GATEWAY, "8080").stdout.partition("\n\n")
    assert head.split()[1] == "200" and body == PAGE, (head, body)
    podman("rm", "-f", "-t", "0", "w")
    check_gone(podman, node, w)


def test_published_port_through_our_portmap(podman, node, ours_bin, tmp_path):
    """-p with our portmap in place of the reference's: its rules in table ip cni_hostport carry
    the attachment's comment, the node reaches the server through its gateway address and
    127.0.0.1, and `podman rm` leaves no rule."""
    ours = tmp_path / "cni-bin" / "portmap"
    ours.unlink()
    ours.symlink_to(ours_bin / "portmap")
    podman.run_container("w", "-p", "8080:80", command=("httpd", "-f", "-p", "80", "-h", "/www"))
    w = check_attached(podman, node, "w", DEFAULT_NET)
    mapped = [r for r in hostport_rules(node) if r["chain"] == "hostports"]
    assert [r["comment"].split()[0] for r in mapped] == ["net:" + DEFAULT_NET], mapped
    for host in (DEFAULT_GATEWAY, "127.0.0.1"):
        head, _, body = node.run(sys.executable, "-c", HTTP_GET, host, "8080").stdout.partition("\n\n")
        assert head.split()[1] == "200" and body == PAGE, (host, head, body)
    podman("rm", "-f", "-t", "0", "w")
    check_gone(podman, node, w)
    assert [r for r in hostport_rules(node) if r.get("comment")] == []


def hostport_rules(node):
    """The rules of the node's tables cni_hostport (portmap's), as `nft -j` lists them."""
    return [e["rule"] for e in json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
            if "rule" in e and e["rule"]["table"] == "cni_hostport"]


def test_network_reload_restores_rules_and_keeps_the_address(podman, node):
    """`podman network reload` (for after a firewall flush) tears down and sets up again with the
    same address: the masquerade rule is back and the container still reaches the gateway."""
    podman.run_container("r")
    before = check_attached(podman, node, "r", DEFAULT_NET)
    node.run("nft", "flush", "ruleset")
    assert masqueraded(node) == set()
    podman("network", "reload", "r")
    after = check_attached(podman, node, "r", DEFAULT_NET)
    # The new veth pair's host end takes the same name: it is derived from the attachment.
    assert after.addresses == before.addresses and after.host_veth == before.host_veth
    podman.ping("r", DEFAULT_GATEWAY)
    podman("rm", "-f", "-t", "0", "r")
    check_gone(podman, node, after)


def test_mtu_option_and_interface_name(podman, node):
    """`podman network create -o mtu=1400` puts "mtu" in our bridge's config: the bridge, the host
    veth and the container side get it; `interface_name=` becomes CNI_IFNAME."""
    podman.create_network(V4_NET, V4_SUBNET, options=("-o", "mtu=1400"))
    podman.run_container("m", "--network", V4_NET + ":interface_name=net0")
    m = check_attached(podman, node, "m", V4_NET)
    assert m.ifname == "net0"
    link, = podman.kernel("m", "link", "show", "dev", "net0")
    host = node.links()[m.host_veth]
    assert (link["mtu"], host["mtu"], node.links()[host["master"]]["mtu"]) == (1400, 1400, 1400)
    podman.ping("m", V4_GATEWAY)
    podman("rm", "-f", "-t", "0", "m")
    check_gone(podman, node, m)
