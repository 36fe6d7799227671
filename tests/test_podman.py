"""A real runtime: podman 4.3 (CNI backend, through libcni) runs containers with our bridge,
host-local and loopback; the reference portmap, firewall and tuning follow ours in the chain, as in
podman's generated networks.  Everything is private: podman runs inside a node namespace the test
makes, with its own storage, configuration and state directories."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import IP, REF_DIR, run

pytestmark = pytest.mark.skipif(shutil.which("podman") is None or shutil.which("crun") is None
                                or not os.path.exists("/bin/busybox"),
                                reason="podman not installed: apt-get install podman crun conmon busybox-static")

IMAGE = "localhost/cbt-busybox:test"
SUBNET, GATEWAY = "10.89.7.0/24", "10.89.7.1"
CONTAINERS_CONF = """[containers]
netns = "private"
cgroups = "disabled"
log_driver = "k8s-file"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}"]
network_config_dir = "{netd}"
default_network = "cbtpm"
"""


class Podman:
    """podman with private storage and configuration, run inside the node namespace.

    Every call joins one long-lived mount namespace (held by a sleeping process) in which a cgroup2
    file system is mounted for crun: podman keeps its containers' namespace mounts there between
    calls, which one `ip netns exec` per call (a new mount namespace each time) would lose.
    """

    def __init__(self, root, node):
        self.root = root
        self.node = node
        self.state = Path(tempfile.mkdtemp(prefix="cbtpm-", dir="/tmp"))   # podman wants a short runroot
        self.env = dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
                        XDG_RUNTIME_DIR=str(root / "xdg"), TMPDIR=str(root / "tmp"))
        self.holder = subprocess.Popen([IP, "netns", "exec", node.name, "sh", "-c",
                                        "mount -t cgroup2 none /sys/fs/cgroup && echo ready && exec sleep 3600"],
                                       stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline().strip() == "ready"

    def __call__(self, *args, check=True, timeout=90):
        return run(["nsenter", "-t", self.holder.pid, "-m", "-n", "podman", "--root", self.state / "storage",
                    "--runroot", self.state / "run", "--storage-driver", "vfs"] + list(args),
                   check=check, timeout=timeout, env=self.env)

    def close(self):
        self("rm", "-af", "-t", "0", check=False)
        self.holder.kill()
        self.holder.wait()
        run(["rm", "-rf", self.state], check=False)

    def address(self, name, network="cbtpm"):
        info = json.loads(self("inspect", name).stdout)[0]
        return info["NetworkSettings"]["Networks"][network]["IPAddress"]


def network(name, data_dir, bridge, ranges):
    return {"cniVersion": "0.4.0", "name": name, "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
         "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}], "ranges": ranges,
                  "dataDir": str(data_dir)}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "firewall", "backend": "iptables"},
        {"type": "tuning"}]}


@pytest.fixture
def podman(tmp_path, ours_bin, node):
    for name in ("portmap", "firewall", "tuning"):
        if not (REF_DIR / name).exists():
            pytest.skip("reference %s not installed: apt-get install containernetworking-plugins" % name)
    bin_dir, netd, rootfs = tmp_path / "bin", tmp_path / "net.d", tmp_path / "rootfs"
    for path in (bin_dir, netd, rootfs / "bin", tmp_path / "xdg", tmp_path / "tmp"):
        path.mkdir(parents=True)
    for name in ("bridge", "host-local", "loopback"):
        (bin_dir / name).symlink_to(ours_bin / name)
    for name in ("portmap", "firewall", "tuning"):
        (bin_dir / name).symlink_to(REF_DIR / name)
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF.format(bin=bin_dir, netd=netd))
    data_dir = tmp_path / "ipam"
    (netd / "cbtpm.conflist").write_text(json.dumps(network("cbtpm", data_dir, "cbt-pm0", [[{"subnet": SUBNET}]])))
    (netd / "cbtpm2.conflist").write_text(json.dumps(network("cbtpm2", data_dir, "cbt-pm1", [[{"subnet": "10.89.8.0/24"}]])))
    (netd / "cbtpm6.conflist").write_text(json.dumps(network(
        "cbtpm6", data_dir, "cbt-pm6", [[{"subnet": "10.89.9.0/24"}], [{"subnet": "fd89:9::/64"}]])))
    shutil.copy("/bin/busybox", str(rootfs / "bin" / "busybox"))
    for applet in ("sh", "ping", "ip", "sleep", "cat"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    run(["tar", "-C", rootfs, "-cf", tmp_path / "rootfs.tar", "."])
    pm = Podman(tmp_path, node)
    try:
        pm("import", tmp_path / "rootfs.tar", IMAGE)
        pm.data_dir = data_dir
        yield pm
    finally:
        pm.close()


def reservations(data_dir, network):
    directory = data_dir / network
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name[0].isdigit() or ":" in p.name)


def masq_rule_count(node):
    rules = json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return sum(1 for e in rules if "rule" in e and e["rule"]["chain"] == "masq_checks")


def host_veths(node):
    return [name for name in node.links() if name.startswith("veth")]


def start(podman, name, *options):
    podman("run", "-d", "--name", name, *options, IMAGE, "sleep", "600")


def test_containers_get_addresses_reach_each_other_and_leave_nothing(podman, node):
    start(podman, "a")
    start(podman, "b")
    a, b = podman.address("a"), podman.address("b")
    assert a.startswith("10.89.7.") and b.startswith("10.89.7.") and a != b
    assert reservations(podman.data_dir, "cbtpm") == sorted([a, b])
    inside = podman("exec", "a", "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert a + "/24" in inside
    podman("exec", "a", "ping", "-c1", "-W2", GATEWAY)
    podman("exec", "a", "ping", "-c1", "-W2", b)
    assert masq_rule_count(node) == 2
    podman("stop", "-t", "0", "a")
    assert reservations(podman.data_dir, "cbtpm") == [b]
    podman("start", "a")
    podman("exec", "a", "ping", "-c1", "-W2", GATEWAY)
    podman("rm", "-f", "-t", "0", "a", "b")
    assert reservations(podman.data_dir, "cbtpm") == []
    assert host_veths(node) == [] and masq_rule_count(node) == 0


def test_static_address_and_mac(podman, node):
    start(podman, "s", "--ip", "10.89.7.50", "--mac-address", "02:42:0a:59:07:32")
    assert podman.address("s") == "10.89.7.50"
    inside = podman("exec", "s", "ip", "-o", "link", "show", "eth0").stdout
    assert "02:42:0a:59:07:32" in inside
    podman("rm", "-f", "-t", "0", "s")
    assert reservations(podman.data_dir, "cbtpm") == [] and host_veths(node) == []


def test_dual_stack_network(podman, node):
    start(podman, "d", "--network", "cbtpm6")
    addresses = podman("exec", "d", "ip", "-o", "addr", "show", "eth0").stdout
    assert "inet 10.89.9." in addresses and "inet6 fd89:9::" in addresses
    assert len(reservations(podman.data_dir, "cbtpm6")) == 2
    podman("rm", "-f", "-t", "0", "d")
    assert reservations(podman.data_dir, "cbtpm6") == [] and masq_rule_count(node) == 0


def test_network_connect_and_disconnect(podman, node):
    start(podman, "c")
    podman("network", "connect", "cbtpm2", "c")
    assert "inet 10.89.8." in podman("exec", "c", "ip", "-o", "addr").stdout
    assert len(reservations(podman.data_dir, "cbtpm2")) == 1
    podman("network", "disconnect", "cbtpm2", "c")
    assert "10.89.8." not in podman("exec", "c", "ip", "-o", "addr").stdout
    assert reservations(podman.data_dir, "cbtpm2") == []
    podman("rm", "-f", "-t", "0", "c")
    assert host_veths(node) == [] and masq_rule_count(node) == 0
