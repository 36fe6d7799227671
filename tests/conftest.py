"""Shared test infrastructure: network namespaces, the built plugins, and a CNI invoker.

Every test works in namespaces it makes (`cbt-<prefix>-<8hex>`, deleted at teardown); the machine's
own network namespace is never touched.  Namespaces of test sessions that died are swept at the next
session start: each session records the namespaces it makes in a file it keeps locked while it runs,
so concurrent sessions never sweep each other's namespaces.
"""
import fcntl
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
REF_DIR = Path("/usr/lib/cni")
VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
REF_VERSIONS = VERSIONS[:-1]  # Debian's reference plugins speak up to 1.0.0

PLUGIN_NAMES = ("bridge", "host-local", "loopback", "bandwidth")
NETNS_PREFIX = "cbt-"
SESSIONS_DIR = Path("/run/cni-bridge-tests")  # one locked file per live test session
IP = shutil.which("ip") or "/usr/sbin/ip"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CommandFailed(subprocess.CalledProcessError):
    """A failed command whose message shows its output (CalledProcessError's does not)."""

    def __str__(self):
        return "%s\nstdout: %s\nstderr: %s" % (super().__str__(), self.stdout, self.stderr)


def run(argv, check=True, input=None, timeout=30, **kwargs):
    """subprocess.run in text mode with output captured; raises CommandFailed when `check` and it fails."""
    proc = subprocess.run([str(a) for a in argv], input=input, timeout=timeout, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


class Netns:
    """A named network namespace made by a test (`ip netns add`), mounted at /run/netns/<name>."""

    def __init__(self, name):
        self.name = name
        self.path = "/run/netns/" + name

    def __repr__(self):
        return "Netns(%r)" % self.name

    def run(self, *argv, check=True, input=None, timeout=30):
        """Run argv inside this namespace (`ip netns exec`), text mode, output captured."""
        return run([IP, "netns", "exec", self.name, *argv], check=check, input=input, timeout=timeout)

    def ip_json(self, *args):
        """`ip -j <args>` inside this namespace, parsed ([] when ip prints nothing)."""
        out = run([IP, "-n", self.name, "-j", *args]).stdout
        return json.loads(out) if out.strip() else []

    def links(self):
        """ifname -> its `ip -j -d link show` entry."""
        return {link["ifname"]: link for link in self.ip_json("-d", "link", "show")}

    def addrs(self, ifname):
        """[(family, "addr/prefix"), ...] of `ifname`; raises CommandFailed when the link does not exist."""
        return [(a["family"], "%s/%d" % (a["local"], a["prefixlen"]))
                for entry in self.ip_json("addr", "show", "dev", ifname)
                for a in entry.get("addr_info", [])]

    def sysctl(self, key):
        """The value of /proc/sys/<key> (e.g. "net/ipv4/ip_forward") as seen inside this namespace."""
        return self.run("cat", "/proc/sys/" + key.strip("/")).stdout.strip()


def delete_netns(name):
    run([IP, "netns", "del", name], check=False)


class NetnsRegistry:
    """This session's record of the namespaces it made: a file held locked for the whole session."""

    def __init__(self):
        SESSIONS_DIR.mkdir(mode=0o755, exist_ok=True)
        name = "%d-%s" % (os.getpid(), secrets.token_hex(4))
        # Locked before it gets the name sweeps look for, so no sweep ever takes it for a dead session's.
        self.file = open(SESSIONS_DIR / (name + ".tmp"), "a")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        self.path = SESSIONS_DIR / (name + ".session")
        os.rename(self.file.name, self.path)

    def record(self, name):
        """Record `name` before it is created, so a concurrent sweep sees it as owned."""
        self.file.write(name + "\n")
        self.file.flush()

    def close(self):
        self.file.close()
        self.path.unlink()


def sweep_stale_netns():
    """Delete `cbt-*` namespaces not owned by a live session (left behind by sessions that died)."""
    existing = [line.split()[0] for line in run([IP, "netns", "list"]).stdout.splitlines() if line.strip()]
    owned = set()
    for session in SESSIONS_DIR.glob("*.session"):
        try:
            with open(session) as f:
                names = f.read().split()
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its session is still running
                    owned.update(names)
                    continue
                session.unlink()
        except FileNotFoundError:  # swept meanwhile by another session
            pass
    for name in existing:
        if name.startswith(NETNS_PREFIX) and name not in owned:
            delete_netns(name)


@pytest.fixture(scope="session")
def netns_registry():
    """Sweep namespaces of dead sessions, then record this session's own."""
    registry = NetnsRegistry()
    sweep_stale_netns()
    yield registry
    registry.close()


@pytest.fixture
def make_netns(netns_registry):
    """Factory: make_netns(prefix="ct") -> a new Netns with lo up; all are deleted at teardown."""
    made = []

    def factory(prefix="ct"):
        ns = Netns("%s%s-%s" % (NETNS_PREFIX, prefix, secrets.token_hex(4)))
        netns_registry.record(ns.name)
        made.append(ns)
        run([IP, "netns", "add", ns.name])
        run([IP, "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    yield factory
    for ns in made:
        delete_netns(ns.name)


@pytest.fixture
def node(make_netns):
    """A fresh namespace acting as the node (host side): plugins run in here."""
    return make_netns("node")


@pytest.fixture
def container(make_netns):
    """A fresh container namespace."""
    return make_netns("ct")


@pytest.fixture
def data_dir(tmp_path):
    """A temporary, empty host-local dataDir."""
    path = tmp_path / "ipam"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture(scope="session")
def ours_bin(tmp_path_factory):
    """Directory holding bridge, host-local and loopback symlinks to our built zipapp.

    Runs `./build.sh install <tmpdir>` (build, then install) once per session; when the environment
    variable CNI_BRIDGE_BIN names a directory, that installation is used and nothing is built.
    """
    given = os.environ.get("CNI_BRIDGE_BIN")
    if given:
        bin_dir = Path(given).resolve()
    else:
        bin_dir = tmp_path_factory.mktemp("bin")
        proc = run([REPO / "build.sh", "install", bin_dir], check=False, timeout=300, cwd=REPO)
        if proc.returncode != 0:
            pytest.fail("./build.sh install failed (%d):\n%s%s" % (proc.returncode, proc.stdout, proc.stderr))
    missing = [name for name in PLUGIN_NAMES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        pytest.fail("%s lacks executable %s" % (bin_dir, ", ".join(missing)))
    return bin_dir


@pytest.fixture(scope="session")
def ref_bin():
    """The reference Go plugins' directory; skips the test when they are not installed."""
    if not all((REF_DIR / name).is_file() for name in PLUGIN_NAMES):
        pytest.skip("reference plugins not installed: apt-get install containernetworking-plugins")
    return REF_DIR


class CNIRun(NamedTuple):
    """Outcome of one plugin call; `json` is the parsed stdout, or None when it is not JSON."""
    returncode: int
    stdout: str
    stderr: str
    json: Optional[object]


def cni_env(command, bin_dir, *, netns=None, ifname="eth0", container_id="ctr1", cni_args=None,
            cni_path=None, env=None):
    """The environment of a CNI call: PATH, the CNI_* variables, then `env` overrides (None removes).

    `netns` is a Netns, a path string, or None (CNI_NETNS unset); `ifname`/`container_id` None leave
    their variable unset; `cni_args` is the CNI_ARGS string.  CNI_PATH defaults to `bin_dir`.
    """
    variables = {
        "PATH": os.environ.get("PATH", DEFAULT_PATH),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns.path if isinstance(netns, Netns) else netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": cni_args,
        "CNI_PATH": str(cni_path) if cni_path is not None else str(bin_dir),
    }
    variables.update(env or {})
    return {key: str(value) for key, value in variables.items() if value is not None}


def encode_conf(conf):
    """stdin bytes for a config given as a dict (JSON-encoded), str or bytes."""
    if isinstance(conf, bytes):
        return conf
    if isinstance(conf, str):
        return conf.encode()
    return json.dumps(conf).encode()


def parse_output(proc):
    """CNIRun from a finished process with binary output (decoded leniently)."""
    stdout = proc.stdout.decode("utf-8", "replace")
    try:
        parsed = json.loads(stdout)
    except ValueError:
        parsed = None
    return CNIRun(proc.returncode, stdout, proc.stderr.decode("utf-8", "replace"), parsed)


def run_cni(bin_dir, plugin, command, conf, *, node=None, netns=None, ifname="eth0", container_id="ctr1",
            cni_args=None, cni_path=None, env=None, timeout=60):
    """Run <bin_dir>/<plugin> as a runtime would (inside `node` when given) and return a CNIRun."""
    argv = [str(Path(bin_dir) / plugin)]
    if node is not None:
        argv = [IP, "netns", "exec", node.name] + argv
    proc = subprocess.run(argv, input=encode_conf(conf), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout,
                          env=cni_env(command, bin_dir, netns=netns, ifname=ifname, container_id=container_id,
                                      cni_args=cni_args, cni_path=cni_path, env=env))
    return parse_output(proc)
