"""Shared test infrastructure: tiers (markers), fixtures for network namespaces and the built
plugins.  Plain helpers and constants are in tests/helpers.py.

Tiers, registered below and given to every test module (`pytestmark`):
  unit     in-process tests of cni_bridge's functions: seconds (`-m unit`); the few that make a
           namespace are also `kernel` (`-m "unit and not kernel"` needs no root)
  kernel   the built plugins against namespaces the tests make: root, minutes
  podman   podman containers on our plugins (skipped when podman is absent)
  slow     long runs: crash loops, storms, generated hostile input, the Python matrix, podman
A test module without a tier is counted as `kernel`.

Every test works in namespaces it makes (`cbt-<prefix>-<8hex>`, deleted at teardown); the machine's
own network namespace is never touched.  Namespaces of test sessions that died are swept at the next
session start: each session records the namespaces it makes in a file it keeps locked while it runs,
so concurrent sessions never sweep each other's namespaces.
"""
import fcntl
import os
import secrets
from pathlib import Path

import pytest

from tests.helpers import (IP, NETNS_PREFIX, PLUGIN_NAMES, PYTHON_MATRIX, REF_DIR, REPO, Arena, Netns,
                           build_archive, delete_netns, pyenv_interpreter, run, verify_namespaces)

SESSIONS_DIR = Path("/run/cni-bridge-tests")  # one locked file per live test session

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

    def record_prefix(self, prefix):
        """Record that every namespace named `prefix`... is this session's (a program under test
        names them, e.g. `verify`)."""
        self.record(prefix + "*")

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
    prefixes = tuple(name[:-1] for name in owned if name.endswith("*"))     # see record_prefix
    for name in existing:
        if name.startswith(NETNS_PREFIX) and name not in owned and not name.startswith(prefixes):
            delete_netns(name)


TIERS = {
    "unit": "in-process tests of cni_bridge's functions (seconds)",
    "kernel": "runs the built plugins against namespaces the test makes (root)",
    "podman": "runs podman containers on our plugins",
    "slow": "long runs (crash loops, storms, generated input, the Python matrix, podman)",
}
# Fixtures that make namespaces or links: a test using one is `kernel` whatever its module says.
KERNEL_FIXTURES = {"make_netns", "node", "container", "kernel", "ours_bin", "ref_bin", "arena"}


def pytest_configure(config):
    for name, description in TIERS.items():
        config.addinivalue_line("markers", "%s: %s" % (name, description))


def pytest_collection_modifyitems(items):
    for item in items:
        names = set(m.name for m in item.iter_markers())
        if "kernel" not in names and (KERNEL_FIXTURES & set(item.fixturenames)
                                      or not names & {"unit", "podman"}):
            item.add_marker(pytest.mark.kernel)


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
def multi_archive(tmp_path_factory):
    """An archive for /usr/bin/python3 that also holds bytecode for every pyenv interpreter of
    PYTHON_MATRIX found (build.sh --python repeated)."""
    args = ["--python", "/usr/bin/python3"]
    for version in PYTHON_MATRIX:
        if pyenv_interpreter(version):
            args += ["--python", pyenv_interpreter(version)]
    proc, archive = build_archive(tmp_path_factory.mktemp("multi"), *args)
    if proc.returncode != 0:
        pytest.fail("build.sh %s failed:\n%s" % (" ".join(args), proc.stderr.decode()))
    return archive


@pytest.fixture(scope="session")
def ref_bin():
    """The reference Go plugins' directory; skips the test when they are not installed."""
    if not all((REF_DIR / name).is_file() for name in PLUGIN_NAMES):
        pytest.skip("reference plugins not installed: apt-get install containernetworking-plugins")
    return REF_DIR


@pytest.fixture
def arena(ours_bin, node, container, tmp_path):
    return Arena(ours_bin, node, container, tmp_path / "sandbox")


@pytest.fixture
def verify_env(netns_registry):
    """The environment `verify` runs in: its namespaces named cbt-v<hex>-..., recorded as this
    session's before they exist; any left behind are deleted at teardown."""
    prefix = "cbt-v%s-" % secrets.token_hex(4)
    netns_registry.record_prefix(prefix)
    yield dict(os.environ, CNI_BRIDGE_VERIFY_PREFIX=prefix)
    for name in verify_namespaces(prefix):
        delete_netns(name)
