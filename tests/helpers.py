"""Shared test code: constants, running commands and plugins, namespaces made by tests, reading
back what the kernel and the disk hold, the hostile-input arena, interpreters and archives, the
answers of a call, traffic between namespaces, and the reliability network (relnet).

Plain code only (fixtures and pytest hooks are in conftest.py).  Test modules import it as
`tests.helpers`: tests/ is a package, so pytest puts the repository root on sys.path (which also
makes `import cni_bridge` work) with no sys.path patching, under `pytest` and `python3 -m pytest`.
"""
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
REF_DIR = Path("/usr/lib/cni")
VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
REF_VERSIONS = VERSIONS[:-1]  # Debian's reference plugins speak up to 1.0.0

PLUGIN_NAMES = ("bridge", "host-local", "loopback", "portmap", "tuning", "firewall",
                "bandwidth")
NETNS_PREFIX = "cbt-"
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


# --- plugin outcome and kernel state ------------------------------------------------------------

def explain(res):
    """A failed assertion's message: the call's exit code and output."""
    return "exit %d\nstdout: %s\nstderr: %s" % (res.returncode, res.stdout, res.stderr)


def kind(link):
    """The link kind ("bridge", "veth" ...) of an `ip -j -d link` entry."""
    return link.get("linkinfo", {}).get("info_kind")


def host_veths(node):
    """ifname -> link entry of every veth in the node namespace."""
    return {name: link for name, link in node.links().items() if kind(link) == "veth"}


def global_addrs(ns, ifname):
    """Non-link-local addresses of `ifname` as "addr/prefix" strings."""
    return [entry["local"] + "/%d" % entry["prefixlen"]
            for link in ns.ip_json("addr", "show", "dev", ifname)
            for entry in link.get("addr_info", []) if entry.get("scope") != "link"]


def is_address(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def reservations(directory, raw=False):
    """host-local's reservations in one network's state directory `directory`, or in every
    network of a dataDir when `directory` holds no reservation file itself:
    {address file name: content} (bytes when `raw`), regular files only."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    files = [p for p in directory.iterdir() if is_address(p.name)]
    if not files:
        files = [p for p in directory.glob("*/*") if is_address(p.name)]
    found = {}
    for path in files:
        if path.is_symlink() or not path.is_file():
            continue
        try:
            content = path.read_bytes()
        except FileNotFoundError:      # removed while we listed
            continue
        found[path.name] = content if raw else content.decode()
    return found


# --- nf_tables --------------------------------------------------------------------------------------

# The reference's nftables masquerade layout (cni-reference.md decision 4).
MASQ_TABLE, MASQ_CHAIN, POSTROUTING = "cni_plugins_masquerade", "masq_checks", "postrouting"


def ruleset(node):
    """`nft -j list ruleset` of `node`, parsed."""
    return json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]


def masq_table(node):
    """(chain names, {chain: [rule]}) of table inet cni_plugins_masquerade; (None, {}) when absent."""
    entries = ruleset(node)
    if not any("table" in e and e["table"]["name"] == MASQ_TABLE and e["table"]["family"] == "inet"
               for e in entries):
        return None, {}
    chains = sorted(e["chain"]["name"] for e in entries
                    if "chain" in e and e["chain"]["table"] == MASQ_TABLE and e["chain"]["family"] == "inet")
    rules = {}
    for e in entries:
        if "rule" in e and e["rule"]["table"] == MASQ_TABLE and e["rule"]["family"] == "inet":
            rules.setdefault(e["rule"]["chain"], []).append(e["rule"])
    return chains, rules


# --- the hostile-input arena (test_reliability section 4 and test_hostile) ---------------------------

HOSTILE_NET = "hostnet"
HOSTILE_BRIDGE = "cbt-hb0"
# Paths nothing hostile may change: the default dataDir, the runtime's config and state, the root.
MARKER_DIRS = ("/", "/var/lib/cni", "/var/lib/cni/networks", "/etc/cni", "/etc/cni/net.d", "/run/cni")


def tree(root):
    """Every path under `root`, relative, as a set."""
    return set(str(p.relative_to(root)) for p in root.rglob("*"))


def markers():
    """The entries of MARKER_DIRS (None for an absent one)."""
    return {d: sorted(os.listdir(d)) if os.path.isdir(d) else None for d in MARKER_DIRS}


def interfaces(ns):
    """{name: (kind, [addr/prefix])} of every link in `ns`, read so that names which are not UTF-8
    (hostile input can make them) survive."""
    out = subprocess.run([IP, "-n", ns.name, "-j", "-d", "addr", "show"], stdout=subprocess.PIPE,
                         check=True, timeout=30).stdout.decode("utf-8", "surrogateescape")
    links = json.loads(out) if out.strip() else []
    return {link["ifname"]: (kind(link), ["%s/%d" % (a["local"], a["prefixlen"]) for a in link.get("addr_info", ())])
            for link in links}


def read_folded(obj, key):
    """obj[key] as the plugin reads config keys: the exact key, else the first key equal to it
    ignoring case; None when absent or null."""
    value = obj.get(key)
    if value is None:
        value = next((v for k, v in obj.items() if isinstance(k, str) and k.lower() == key.lower()), None)
    return value


def state_location(stdin):
    """(dataDir, network name) host-local would use for this stdin, or None when it cannot get as
    far (not a JSON object, no ipam object).  Python's json accepts all the plugin's parser does."""
    try:
        config = json.loads(stdin)
    except (ValueError, RecursionError):
        return None
    ipam = read_folded(config, "ipam") if isinstance(config, dict) else None
    if not isinstance(ipam, dict):
        return None
    data_dir = read_folded(ipam, "dataDir")
    return ("/var/lib/cni/networks" if data_dir is None else data_dir), config.get("name")


def assert_cni_answer(res, command):
    """Exit 0 with a valid result (ADD) or nothing (DEL), or non-zero with exactly one error object
    (int code, str msg) on stdout; no traceback, and no unhandled exception turned into an
    "internal error"."""
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    if res.returncode == 0 and command == "DEL":
        assert res.stdout.strip() == "", explain(res)
        return None
    obj, end = json.JSONDecoder().raw_decode(res.stdout.strip()) if res.stdout.strip() else (None, 0)
    assert isinstance(obj, dict) and res.stdout.strip()[end:] == "", "not one JSON object: " + explain(res)
    if res.returncode == 0:
        assert isinstance(obj.get("cniVersion"), str), explain(res)
        for ip in obj.get("ips", []):
            ipaddress.ip_interface(ip["address"])
        assert obj.get("ips") or obj.get("ip4") or obj.get("ip6") or obj.get("interfaces"), explain(res)
        return obj
    assert type(obj.get("code")) is int and isinstance(obj.get("msg"), str), explain(res)
    assert not obj["msg"].startswith("internal error"), "unhandled exception: " + explain(res)
    return None


def hostile_config(data_dir, version="1.0.0"):
    """A valid config holding most keys bridge and host-local read, its state in `data_dir`."""
    return {"cniVersion": version, "name": HOSTILE_NET, "type": "bridge", "bridge": HOSTILE_BRIDGE,
            "isGateway": True, "isDefaultGateway": False, "forceAddress": False, "ipMasq": True,
            "mtu": 1500, "hairpinMode": False, "promiscMode": False, "vlan": 0, "macspoofchk": False,
            "dns": {"nameservers": ["10.94.0.53"], "domain": "example.test", "search": ["a.test"]},
            "ipam": {"type": "host-local", "dataDir": str(data_dir),
                     "ranges": [[{"subnet": "10.94.0.0/24", "rangeStart": "10.94.0.10",
                                  "rangeEnd": "10.94.0.200", "gateway": "10.94.0.1"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
            "runtimeConfig": {"ips": []}, "args": {"cni": {"ips": []}}}


class Arena(object):
    """A node, a container and a sandbox (the dataDir and the plugin's working directory) in which
    hostile input is tried; `exercise` runs ADD and the runtime's DEL and checks what they left."""

    def __init__(self, bin_dir, node, container, sandbox):
        self.bin_dir, self.node, self.container, self.sandbox = bin_dir, node, container, sandbox
        self.data_dir = sandbox / "up" / "two" / "ipam"      # so that "../.." stays in view
        self.cwd = sandbox / "cwd"
        self.data_dir.mkdir(parents=True)
        self.cwd.mkdir()
        self.calls = 0

    def config(self, version="1.0.0"):
        return hostile_config(self.data_dir, version)

    def call(self, command, stdin, env):
        argv = [IP, "netns", "exec", self.node.name, str(self.bin_dir / "bridge")]
        variables = cni_env(command, self.bin_dir, netns=self.container, container_id="hostile%d" % self.calls)
        variables.update(env)
        proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120,
                              cwd=str(self.cwd), env={k: v for k, v in variables.items() if v is not None})
        return parse_output(proc)

    def state_dir(self, stdin):
        """Where host-local may write for `stdin`, relative to the sandbox: <dataDir>/<network> when
        dataDir lies in the sandbox and the name is one directory entry, else None (nowhere).
        Raises ValueError when the (trusted) dataDir lies outside the sandbox: such a case would
        write there legitimately and is not tried."""
        location = state_location(stdin)
        if location is None or not isinstance(location[0], str) or not location[0].startswith("/"):
            return None
        data_dir, name = os.path.normpath(location[0]), location[1]
        if os.path.commonpath([data_dir, str(self.sandbox)]) != str(self.sandbox):
            raise ValueError("dataDir %r is outside the sandbox" % location[0])
        plain = isinstance(name, str) and name and "/" not in name and name not in (".", "..")
        return os.path.join(os.path.relpath(data_dir, str(self.sandbox)), name) if plain else None

    def confined(self, stdin):
        """True when `stdin` keeps host-local inside the sandbox (see state_dir)."""
        try:
            self.state_dir(stdin)
            return True
        except ValueError:
            return False

    def exercise(self, stdin, env=None):
        """ADD then DEL with the same stdin bytes and environment overrides (values: str, may hold
        surrogate escapes for non-UTF-8 bytes; None unsets).  Returns the ADD's result or None."""
        self.calls += 1
        env = env or {}
        state_dir = self.state_dir(stdin)
        files_before, markers_before = tree(self.sandbox), markers()
        added = self.call("ADD", stdin, env)
        result = assert_cni_answer(added, "ADD")
        if result and result.get("ips"):
            held = [a for _, addresses in interfaces(self.container).values() for a in addresses]
            assert result["ips"][0]["address"] in held, explain(added)
        assert_cni_answer(self.call("DEL", stdin, env), "DEL")

        files = tree(self.sandbox)
        outside = sorted(p for p in files - files_before      # <dataDir> and its parents may be made
                         if state_dir is None or not ((p + "/").startswith(state_dir + "/")
                                                      or state_dir.startswith(p + "/")))
        for path in outside:                   # undone, so that a failing case reproduces
            if (self.sandbox / path).is_dir():
                shutil.rmtree(str(self.sandbox / path), ignore_errors=True)
            elif (self.sandbox / path).exists():
                os.unlink(str(self.sandbox / path))
        assert outside == [], "files made outside <dataDir>/<network>: %s" % outside
        assert markers() == markers_before
        reserved = [p for p in files
                    if state_dir and os.path.dirname(p) == state_dir and is_address(os.path.basename(p))]
        assert reserved == [], "reservations left after DEL: %s" % reserved
        left = {n: k for n, (k, _) in interfaces(self.node).items() if n != "lo"}
        assert all(k == "bridge" for k in left.values()), "links left in the node: %s" % left
        inside = interfaces(self.container)
        assert sorted(inside) == ["lo"], "container still holds %s" % inside
        _, rules = masq_table(self.node)
        assert rules.get(MASQ_CHAIN, []) == [], "masquerade rules left: %s" % rules[MASQ_CHAIN]
        for name in left:                      # bridges stay by design; the next case starts afresh
            subprocess.run([IP, "-n", self.node.name, "link", "del", os.fsencode(name)], check=True,
                           timeout=30)
        return result


def set_path(config, path, value):
    """Set config[path[0]][path[1]]... = value, making the objects and lists on the way."""
    target = config
    for key, following in zip(path, path[1:]):
        fresh = [] if isinstance(following, int) else {}
        if isinstance(target, list):
            while len(target) <= key:
                target.append(type(fresh)())
            if not isinstance(target[key], type(fresh)):
                target[key] = fresh
        elif not isinstance(target.get(key), type(fresh)):
            target[key] = fresh
        target = target[key]
    if isinstance(target, list):
        while len(target) <= path[-1]:
            target.append(None)
    target[path[-1]] = value


# Every key bridge and host-local read, as a path into the config.
KEY_PATHS = [
    ("cniVersion",), ("name",), ("type",), ("bridge",), ("isGateway",), ("isDefaultGateway",), ("forceAddress",),
    ("ipMasq",), ("ipMasqBackend",), ("mtu",), ("hairpinMode",), ("promiscMode",), ("portIsolation",), ("vlan",),
    ("vlanTrunk",), ("vlanTrunk", 0), ("vlanTrunk", 0, "id"), ("vlanTrunk", 0, "minID"), ("vlanTrunk", 0, "maxID"),
    ("preserveDefaultVlan",), ("macspoofchk",), ("enabledad",), ("disableContainerInterface",),
    ("dns",), ("dns", "nameservers"), ("dns", "nameservers", 0), ("dns", "domain"), ("dns", "search"),
    ("dns", "options"),
    ("ipam",), ("ipam", "type"), ("ipam", "subnet"), ("ipam", "rangeStart"), ("ipam", "rangeEnd"),
    ("ipam", "gateway"), ("ipam", "ranges"), ("ipam", "ranges", 0), ("ipam", "ranges", 0, 0),
    ("ipam", "ranges", 0, 0, "subnet"), ("ipam", "ranges", 0, 0, "rangeStart"),
    ("ipam", "ranges", 0, 0, "rangeEnd"), ("ipam", "ranges", 0, 0, "gateway"), ("ipam", "routes"),
    ("ipam", "routes", 0), ("ipam", "routes", 0, "dst"),
    ("ipam", "routes", 0, "gw"), ("ipam", "routes", 0, "mtu"), ("ipam", "routes", 0, "priority"),
    ("ipam", "routes", 0, "table"), ("ipam", "routes", 0, "scope"), ("ipam", "dataDir"), ("ipam", "resolvConf"),
    ("runtimeConfig",), ("runtimeConfig", "mac"), ("runtimeConfig", "ips"), ("runtimeConfig", "ips", 0),
    ("runtimeConfig", "ipRanges"), ("runtimeConfig", "ipRanges", 0), ("runtimeConfig", "ipRanges", 0, 0, "subnet"),
    ("args",), ("args", "cni"), ("args", "cni", "ips"), ("args", "cni", "ips", 0), ("args", "cni", "mac"),
    ("prevResult",), ("prevResult", "ips"), ("prevResult", "ips", 0, "address"), ("prevResult", "interfaces"),
]


def confine(config, data_dir):
    """Keep a generated config from naming another state directory (null or absent means the
    default, /var/lib/cni/networks) or reading arbitrary files: dataDir and resolvConf are trusted
    (root's), so only wrong types and relative paths are tried there."""
    ipam = config.get("ipam")
    if not isinstance(ipam, dict):
        return config
    for key in ("dataDir", "resolvConf"):
        spellings = [k for k in ipam if isinstance(k, str) and k.lower() == key.lower()]
        value = next((v for v in (ipam.pop(k) for k in spellings) if v is not None), None)
        if isinstance(value, str) and value.startswith("/") and value != str(data_dir):
            value = value.lstrip("/") or "relative"
        if key == "dataDir" and value is None:
            value = str(data_dir)
        if value is not None:
            ipam[key] = value
    return config


def kernel_filters_vlans(ns):
    """Whether this kernel's bridge filters VLANs, probed in `ns` with `ip` (never decided from a
    plugin's error text: a regression would then skip instead of failing)."""
    probe = ns.run(IP, "link", "add", "cbt-vlprobe", "type", "bridge", "vlan_filtering", "1", check=False)
    ns.run(IP, "link", "del", "cbt-vlprobe", check=False)
    return probe.returncode == 0


# --- interpreters and archives (tests/test_portable.py, tests/test_zipapp.py) ---------------------

PYENV = "/root/.pyenv/versions"
PYTHON_MATRIX = ("3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13")


def pyenv_interpreter(version):
    """The newest pyenv CPython `version` ("3.12": .../3.12.1/bin/python3.12), or None."""
    import glob
    found = sorted(glob.glob("%s/%s.*/bin/python%s" % (PYENV, version, version)),
                   key=lambda p: [int(n) for n in p.split("/versions/")[1].split("/")[0].split(".")])
    return found[-1] if found else None


def build_archive(workdir, *args):
    """Run build.sh from a copy of the source in `workdir`: (the finished process, the archive)."""
    workdir.mkdir(exist_ok=True)
    for name in ("build.sh", "cni_bridge.py"):
        shutil.copy2(str(REPO / name), str(workdir / name))
    proc = subprocess.run([str(workdir / "build.sh")] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=300, cwd="/")
    return proc, workdir / "dist" / "cni-bridge.pyz"


def archive_for(source, workdir, interpreter=None):
    """A directory holding a copy of archive `source` whose preamble runs `interpreter` instead of
    /usr/bin/python3, with every plugin name linked to it."""
    data = Path(source).read_bytes()
    if interpreter is not None:
        data = data.replace(b"/usr/bin/python3", str(interpreter).encode())
    directory = workdir / "bin"
    directory.mkdir(exist_ok=True)
    archive = directory / "cni-bridge.pyz"
    archive.write_bytes(data)
    archive.chmod(0o755)
    for name in PLUGIN_NAMES:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to("cni-bridge.pyz")
    return directory


# --- answers, waiting, skipping, `verify`'s namespaces -------------------------------------------

def ok(res):
    """The call succeeded without a traceback; returns its parsed stdout."""
    assert res.returncode == 0, explain(res)
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    return res.json


def cni_error(res):
    """The call failed the CNI way: non-zero exit, one error object (int code, str msg), no traceback."""
    assert res.returncode != 0, explain(res)
    assert "Traceback" not in res.stdout + res.stderr, explain(res)
    assert isinstance(res.json, dict), explain(res)
    assert type(res.json.get("code")) is int and isinstance(res.json.get("msg"), str), explain(res)
    return res.json


def eventually(condition, timeout=10):
    """Poll `condition` every 20 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def skip_without_iptables(nf_tables_based=False):
    """Skip the test where iptables/ip6tables are missing or, if asked, not nf_tables-based (then
    the rules they write are out of sight of an nf_tables netlink client such as our DEL)."""
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("iptables/ip6tables are not installed")
    version = run(["iptables", "--version"], check=False).stdout.strip()
    if nf_tables_based and "nf_tables" not in version:
        pytest.skip("iptables is not nf_tables-based (%s): its rules are not in nf_tables" % version)


def verify_namespaces(prefix):
    """Namespaces whose name starts with `prefix` (those `verify` made)."""
    if not os.path.isdir("/run/netns"):
        return set()
    return set(n for n in os.listdir("/run/netns") if n.startswith(prefix))


# --- traffic through the nodes the tests make (tests/test_masquerade.py, tests/test_kubenet.py) ----

PORT = "5001"    # what SERVER listens on and CLIENT connects to (sources_seen)

# A TCP and UDP server: answers "ok" to everyone and prints "<protocol> <source address>" per peer.
SERVER = r"""
import select, socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
port = int(sys.argv[2])
tcp = socket.socket(family, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("", port))
tcp.listen(8)
udp = socket.socket(family, socket.SOCK_DGRAM)
# Replies leave from the address a datagram was sent to (its packet info sent back), as a
# connected client expects: on a node, routing alone would pick another of its addresses.
udp.setsockopt(*((socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO) if family == socket.AF_INET6
                 else (socket.IPPROTO_IP, 8)), 1)      # 8: IP_PKTINFO
udp.bind(("", port))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for sock in select.select([tcp, udp], [], [], 1)[0]:
        if sock is tcp:
            conn, peer = tcp.accept()
            conn.sendall(b"ok")
            conn.close()
            print("tcp", peer[0], flush=True)
        else:
            _data, info, _flags, peer = udp.recvmsg(64, 256)
            udp.sendmsg([b"ok"], info, 0, peer)
            print("udp", peer[0], flush=True)
"""

# A client that gets "ok" back over TCP, then over UDP, retrying until its deadline (the server
# may still be starting, an IPv6 gateway address may still be tentative); exits 0 on success.
CLIENT = r"""
import socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
target = (sys.argv[2], int(sys.argv[3]))
deadline = time.monotonic() + 15

def tcp():
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(target)
        return sock.recv(16)

def udp():
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.connect(target)
        sock.send(b"hello")
        return sock.recv(16)

for exchange in (tcp, udp):
    while True:
        try:
            reply = exchange()
        except OSError as err:
            reply = err
        if reply == b"ok":
            break
        if time.monotonic() > deadline:
            sys.exit("%s to %s failed: %r" % (exchange.__name__, target, reply))
        time.sleep(0.1)
"""


def sources_seen(server_ns, client_ns, family, address):
    """Exchange TCP and UDP from `client_ns` with a server in `server_ns` at `address`; returns
    {"tcp": source address the server saw, "udp": ...}."""
    server = subprocess.Popen([IP, "netns", "exec", server_ns.name, "python3", "-c", SERVER, str(family),
                               PORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = client_ns.run("python3", "-c", CLIENT, str(family), address, PORT, check=False, timeout=40)
    finally:
        server.kill()
        out, err = server.communicate(timeout=10)
    assert client.returncode == 0, "client: %s\nserver: %s%s" % (client.stderr, out, err)
    return dict(line.split() for line in out.splitlines())


# --- the reliability network (tests/test_reliability.py, tests/test_defects.py) --------------------
# The bridge plugin with ipMasq (nftables backend) and host-local, as one network "relnet".

RELNET = "relnet"
RELNET_BRIDGE = "cbt-rel0"
RELNET_SUBNET, RELNET_GATEWAY = "10.92.0.0/24", "10.92.0.1"


def relnet_conf(data_dir, version="1.0.0", **ipam_keys):
    """bridge RELNET_BRIDGE as gateway with ipMasq (nftables), host-local on RELNET_SUBNET (override with ipam_keys)."""
    ipam = {"type": "host-local", "subnet": RELNET_SUBNET, "dataDir": str(data_dir)}
    ipam.update(ipam_keys)
    return {"cniVersion": version, "name": RELNET, "type": "bridge", "bridge": RELNET_BRIDGE, "isGateway": True,
            "ipMasq": True, "ipam": ipam}


def bridge(bin_dir, command, config, node, netns, cid, **kwargs):
    """One bridge call inside `node` for container `cid`."""
    return run_cni(bin_dir, "bridge", command, config, node=node, netns=netns, container_id=cid, **kwargs)


def state_files(data_dir):
    """{name: bytes} of every file in the network's state directory."""
    directory = data_dir / RELNET
    found = {}
    for name in os.listdir(str(directory)) if directory.is_dir() else ():
        try:
            found[name] = (directory / name).read_bytes()
        except FileNotFoundError:      # removed while we listed
            pass
    return found


def assert_only_bookkeeping(data_dir, context=""):
    """The state directory holds nothing but `lock` and `last_reserved_ip.*`."""
    extra = [name for name in state_files(data_dir)
             if name not in ("lock", "boot_id") and not name.startswith("last_reserved_ip.")]
    assert extra == [], "%s state dir still holds %s" % (context, extra)


def lock_is_free(data_dir):
    """Nobody holds the flock on <dataDir>/<net>/lock (true when there is no lock file yet)."""
    try:
        fd = os.open(str(data_dir / RELNET / "lock"), os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def masq_comments(node):
    return sorted(rule.get("comment", "") for rule in masq_table(node)[1].get(MASQ_CHAIN, []))


def assert_masq_base_only(node, context=""):
    """No container rule: the table is absent, or holds only its two chains and postrouting's 3 rules."""
    chains, rules = masq_table(node)
    if chains is None:
        return
    assert chains == sorted([MASQ_CHAIN, POSTROUTING]), "%s chains %s" % (context, chains)
    assert rules.get(MASQ_CHAIN, []) == [], "%s leftover rules %s" % (
        context, [r.get("comment") for r in rules[MASQ_CHAIN]])
    assert len(rules.get(POSTROUTING, [])) == 3, "%s postrouting %s" % (context, rules.get(POSTROUTING))


def assert_nothing_left(node, data_dir, containers, context=""):
    """No reservation, veth, container interface or masquerade rule; nobody holds the lock."""
    assert_only_bookkeeping(data_dir, context)
    assert host_veths(node) == {}, "%s veths left: %s" % (context, sorted(host_veths(node)))
    for ns in containers:
        assert sorted(ns.links()) == ["lo"], "%s %s holds %s" % (context, ns.name, sorted(ns.links()))
    assert_masq_base_only(node, context)
    assert lock_is_free(data_dir), "%s the lock is still held" % context


# --- mapped ports: a server in a container, a client anywhere ---------------------------------------

# A TCP and UDP server on the given ports (both families): answers every peer with
# "<peer address> <local address>" and stops after a minute at most.
MAPPED_PORT_SERVER = r"""
import select, socket, sys, time
socks = []
for port in map(int, sys.argv[1:]):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if kind == socket.SOCK_DGRAM:       # to learn the address a datagram was sent to
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        socks.append(s)
print("ready", flush=True)
plain = lambda a: a[7:] if a.startswith("::ffff:") else a
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for s in select.select(socks, [], [], 1)[0]:
        if s.type == socket.SOCK_STREAM:
            conn, peer = s.accept()
            conn.sendall(("%s %s" % (plain(peer[0]), plain(conn.getsockname()[0]))).encode())
            conn.close()
        else:
            _data, ancillary, _flags, peer = s.recvmsg(64, 256)
            local = socket.inet_ntop(socket.AF_INET6, ancillary[0][2][:16]) if ancillary else "?"
            s.sendto(("%s %s" % (plain(peer[0]), plain(local))).encode(), peer)
"""

# A client: one exchange over tcp or udp with host:port, retried until `wait` seconds have passed;
# prints the server's answer ("<source it saw> <address it was reached on>") or exits 1.
MAPPED_PORT_CLIENT = r"""
import socket, sys, time
proto, host, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
sport = int(sys.argv[5]) if len(sys.argv) > 5 else 0
family = socket.AF_INET6 if ":" in host else socket.AF_INET
deadline = time.monotonic() + wait
while True:
    try:
        with socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sport:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
            s.settimeout(0.5)
            s.connect((host, port))
            if proto == "udp":
                s.send(b"hello")
            reply = s.recv(200)
        if reply:
            print(reply.decode())
            sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
"""


def serve_ports(ns, *ports):
    """Start MAPPED_PORT_SERVER in `ns` on `ports`, once it listens; the caller kills it."""
    proc = subprocess.Popen([IP, "netns", "exec", ns.name, "python3", "-c", MAPPED_PORT_SERVER]
                            + [str(p) for p in ports],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def exchange(ns, proto, host, port, wait=5.0, sport=0):
    """(source the server saw, address it was reached on) of one exchange from `ns`, or None when
    nothing answered within `wait` seconds."""
    proc = ns.run("python3", "-c", MAPPED_PORT_CLIENT, proto, host, str(port), str(wait), str(sport),
                  check=False, timeout=wait + 10)
    return tuple(proc.stdout.split()) if proc.returncode == 0 else None
