#!/usr/bin/env python3
"""Side-by-side benchmark of cni-bridge against the reference Go CNI plugins (issue 6).

Run as root:  python3 bench/bench.py [--quick] [--json FILE]      (see bench/README.md)

It builds and installs our zipapp into a temporary directory, makes its own "node" network
namespace and enters it (setns, this process only), and runs every workload for our plugins and
for the reference plugins in /usr/lib/cni interleaved in one run.  Each plugin process is timed
alone, from spawn to exit, with its environment and stdin prepared before the clock starts.
Every namespace, bridge, rule and file it makes is removed at exit, also on Ctrl-C.

Standard library only; runs on CPython 3.6 and later.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipapp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF_DIR = "/usr/lib/cni"
PLUGIN_NAMES = ("bridge", "host-local", "loopback", "portmap", "tuning", "firewall", "bandwidth")
NS_PREFIX = "cbb-"                      # bench namespaces: cbb-<pid>-<tag>
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLONE_NEWNET = 0x40000000
BOOTSTRAP_SEED = 20240601
BOOTSTRAP_ITERATIONS = 2000
LEAK_CHECK_EVERY = 5                    # cycles between leak checks (and after every workload)
IP = shutil.which("ip") or "/usr/sbin/ip"

SIZES = {   # samples per ADD/CHECK/DEL workload, VERSION/STATUS/floor samples, burst rounds, sequential
            # containers, first-call rounds, peak-RSS and per-interpreter rounds
    "quick": {"samples": 15, "version": 30, "bursts": 3, "sequential": 200, "first": 5, "rss": 5},
    "full": {"samples": 60, "version": 150, "bursts": 10, "sequential": 1000, "first": 15, "rss": 15},
}

try:
    now_ns = time.perf_counter_ns
except AttributeError:                  # Python 3.6
    def now_ns():
        return int(time.perf_counter() * 1e9)


def log(text):
    sys.stderr.write("[%6.1fs] %s\n" % (time.monotonic() - START, text))
    sys.stderr.flush()


START = time.monotonic()


# ==============================================================================================
# Timed process runs
# ==============================================================================================

class Call(object):
    """One plugin process, fully prepared: argv (argv[0] is the path executed), env, stdin bytes."""

    def __init__(self, argv, env, stdin=b"", node=None):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.stdin = stdin
        self.node = node                # the Node to run in (entered before the clock starts)


class Outcome(object):
    """What one process did: wall time (ns), exit status (negative: signal), output, and ru_maxrss
    (a true peak only from measure_peak_rss: see there)."""

    def __init__(self, ns, status, stdout, stderr, maxrss_kib):
        self.ns = ns
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.maxrss_kib = maxrss_kib

    def json(self):
        return json.loads(self.stdout.decode("utf-8", "replace"))


LIVE_PIDS = set()   # children not reaped yet (killed and reaped at exit after an interruption)
_POPENS = {}        # Python < 3.8: pid -> Popen, kept so that its __del__ does not reap the child


def _scratch_fd():
    """An anonymous read/write file for a child's stdout or stderr (never blocks the child)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("bench")
    fd, path = tempfile.mkstemp(prefix="bench-out-")
    os.unlink(path)
    return fd


def _prepare(call):
    """(stdin read end already holding the bytes, stdout fd, stderr fd)."""
    if len(call.stdin) > 60000:
        stdin = _scratch_fd()
        os.write(stdin, call.stdin)
        os.lseek(stdin, 0, os.SEEK_SET)
    else:
        stdin, writer = os.pipe()
        os.write(writer, call.stdin)
        os.close(writer)
    return stdin, _scratch_fd(), _scratch_fd()


def _spawn(call, fds):
    stdin, out, err = fds
    if hasattr(os, "posix_spawn"):
        actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, out, 1),
                   (os.POSIX_SPAWN_DUP2, err, 2)]
        pid = os.posix_spawn(call.argv[0], call.argv, call.env, file_actions=actions)
    else:                               # Python < 3.8
        proc = subprocess.Popen(call.argv, executable=call.argv[0], env=call.env, stdin=stdin,
                                stdout=out, stderr=err)
        pid = proc.pid
        _POPENS[pid] = proc
    LIVE_PIDS.add(pid)
    return pid


def _reap(pid, flags=0):
    pid, status, usage = os.wait4(pid, flags)
    LIVE_PIDS.discard(pid)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    if pid in _POPENS:
        _POPENS.pop(pid).returncode = code
    return pid, code, usage.ru_maxrss


def _read_all(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def run_one(call):
    """Run one process; the clock covers spawn to exit and nothing else."""
    enter(call.node)
    fds = _prepare(call)
    try:
        start = now_ns()
        pid = _spawn(call, fds)
        _, code, maxrss = _reap(pid)
        elapsed = now_ns() - start
    finally:
        os.close(fds[0])
    return Outcome(elapsed, code, _read_all(fds[1]), _read_all(fds[2]), maxrss)


def run_many(calls):
    """Start all processes at once; (wall ns from the first spawn to the last exit, outcomes)."""
    enter(calls[0].node)
    prepared = [_prepare(call) for call in calls]
    ends = {}
    try:
        start = now_ns()
        pids = [_spawn(call, fds) for call, fds in zip(calls, prepared)]
        waiting = set(pids)
        while waiting:
            pid, code, maxrss = _reap(-1)
            if pid in waiting:
                waiting.discard(pid)
                ends[pid] = (now_ns() - start, code, maxrss)
        wall = now_ns() - start
    finally:
        for fds in prepared:
            os.close(fds[0])
    outcomes = []
    for pid, fds in zip(pids, prepared):
        elapsed, code, maxrss = ends[pid]
        outcomes.append(Outcome(elapsed, code, _read_all(fds[1]), _read_all(fds[2]), maxrss))
    return wall, outcomes


def set_child_subreaper(on):
    """Become (or stop being) the reaper of orphaned descendants (prctl PR_SET_CHILD_SUBREAPER)."""
    if _libc.prctl(36, 1 if on else 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_CHILD_SUBREAPER): %s" % os.strerror(err))


def measure_peak_rss(call):
    """(peak RSS in KiB, Outcome) of one process, not timed.

    A child's ru_maxrss includes the memory map it had before exec, and a child spawned from this
    big Python process starts from a copy of (or, with vfork, shares) ours.  So the process is
    started by `setsid`, which as a process-group leader forks a small child that execs the plugin
    and exits at once; the plugin is orphaned to us (we are its subreaper) and wait4 gives its own
    peak, bounded below only by setsid's small map (see the /bin/true row).  Our VERSION is
    answered by /bin/sh, which leaves a background reader draining stdin: every orphan is
    reaped, the peak is the largest, and the exit status the first that is not 0.
    """
    enter(call.node)
    fds = _prepare(call)
    launcher = shutil.which("setsid") or "/usr/bin/setsid"
    argv = [launcher] + call.argv
    try:
        if hasattr(os, "posix_spawn"):
            actions = [(os.POSIX_SPAWN_DUP2, fds[0], 0), (os.POSIX_SPAWN_DUP2, fds[1], 1),
                       (os.POSIX_SPAWN_DUP2, fds[2], 2)]
            pid = os.posix_spawn(launcher, argv, call.env, file_actions=actions, setpgroup=0)
        else:
            proc = subprocess.Popen(argv, env=call.env, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                    preexec_fn=os.setpgrp)
            pid = proc.pid
            _POPENS[pid] = proc
        LIVE_PIDS.add(pid)
        _reap(pid)
        code, maxrss = 0, 0
        while True:                     # the orphaned plugin and whatever it left running
            try:
                _, status, rss = _reap(-1)
            except ChildProcessError:
                break
            code = code or status
            maxrss = max(maxrss, rss)
    finally:
        os.close(fds[0])
    return maxrss, Outcome(0, code, _read_all(fds[1]), _read_all(fds[2]), maxrss)


def stop_children():
    """Kill and reap children left running by an interruption (only processes we started)."""
    for pid in list(LIVE_PIDS):
        try:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
        except OSError:
            LIVE_PIDS.discard(pid)


# ==============================================================================================
# Network namespaces
# ==============================================================================================

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns(fd):
    """Move this (single-threaded) process into the network namespace `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


class Node(object):
    """A node namespace made by the bench, held open by fd."""

    def __init__(self, name):
        self.name = name
        self.fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)


_current_node = [None]


def enter(node):
    """Move this process into `node` (no-op when already there or when `node` is None)."""
    if node is not None and _current_node[0] is not node:
        setns(node.fd)
        _current_node[0] = node


def run_tool(argv, input=None, check=True):
    """A helper command (ip, nft, iptables-save), outside every timed region; stdout as text."""
    proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), proc.returncode, proc.stderr.strip()))
    return proc.stdout


class Namespaces(object):
    """The named network namespaces this run makes (cbb-<pid>-<tag>), created and deleted in batches."""

    def __init__(self):
        self.prefix = "%s%d-" % (NS_PREFIX, os.getpid())
        self.count = 0
        self.live = set()

    def create(self, count, tag="c"):
        names = []
        for _ in range(count):
            self.count += 1
            names.append("%s%s%d" % (self.prefix, tag, self.count))
        self.live.update(names)
        run_tool([IP, "-batch", "-"], "".join("netns add %s\n" % n for n in names))
        return names

    def delete(self, names):
        names = [n for n in names if n in self.live]
        for start in range(0, len(names), 200):
            chunk = names[start:start + 200]
            run_tool([IP, "-batch", "-"], "".join("netns del %s\n" % n for n in chunk), check=False)
            self.live.difference_update(chunk)

    def delete_all(self):
        self.delete(sorted(self.live))


def netns_path(name):
    return "/run/netns/" + name


def sweep_stale_namespaces():
    """Delete cbb-<pid>-* namespaces of bench runs whose process is gone."""
    for line in run_tool([IP, "netns", "list"], check=False).splitlines():
        name = line.split(" ")[0]
        if not name.startswith(NS_PREFIX):
            continue
        pid = name[len(NS_PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists("/proc/" + pid):
            run_tool([IP, "netns", "del", name], check=False)


# ==============================================================================================
# The two implementations
# ==============================================================================================

class Network(object):
    """One bridge network of one implementation."""

    def __init__(self, name, bridge, subnet, data_dir):
        self.name = name
        self.bridge = bridge
        self.subnet = subnet
        self.data_dir = data_dir

    def config(self, version, masq):
        return {"cniVersion": version, "name": self.name, "type": "bridge", "bridge": self.bridge,
                "isGateway": True, "ipMasq": masq,
                "ipam": {"type": "host-local", "subnet": self.subnet, "dataDir": self.data_dir,
                         "routes": [{"dst": "0.0.0.0/0"}]}}


class Impl(object):
    """Our zipapp or the reference binaries: where they are, their own node namespace (so neither
    sees the other's bridges or rules) and the networks each one uses."""

    def __init__(self, key, bin_dir, octet, scratch, node):
        self.key = key                  # "ours" or "ref"
        self.bin_dir = bin_dir
        self.node = node
        data_dir = os.path.join(scratch, "ipam-" + key)
        tag = key[0]                    # o / r
        self.main = Network("cbb-%s-main" % key, "cbb%s-main" % tag, "10.%d.0.0/16" % octet, data_dir)
        self.burst = Network("cbb-%s-burst" % key, "cbb%s-burst" % tag, "10.%d.0.0/24" % (octet + 1),
                             data_dir)
        self.seq = Network("cbb-%s-seq" % key, "cbb%s-seq" % tag, "10.%d.0.0/20" % (octet + 2), data_dir)

    def call(self, plugin, command, conf=None, container_id="", netns="", bin_dir=None):
        env = {"CNI_COMMAND": command, "CNI_PATH": bin_dir or self.bin_dir, "PATH": SYSTEM_PATH}
        if command != "VERSION":
            env.update(CNI_CONTAINERID=container_id, CNI_IFNAME="eth0",
                       CNI_NETNS=netns_path(netns) if netns else "")
        stdin = json.dumps(conf).encode() if conf is not None else b'{"cniVersion":"1.0.0"}'
        return Call([os.path.join(bin_dir or self.bin_dir, plugin)], env, stdin, self.node)


def interleaved(impls, index):
    """Both implementations, the one that goes first alternating with the sample index."""
    return impls if index % 2 == 0 else impls[::-1]


def container_ip(result):
    ips = result.get("ips") or []
    return ips[0]["address"].split("/")[0] if ips else None


# ==============================================================================================
# Results
# ==============================================================================================

class Results(object):
    """Raw samples (ns) by workload and implementation, plus errors, leaks and extra facts."""

    def __init__(self):
        self.samples = {}               # workload -> impl -> [ns]
        self.peak_rss = {}              # workload -> impl -> [KiB]
        self.order = []
        self.errors = []
        self.leaks = []
        self.facts = {}

    def add(self, workload, impl, outcome):
        if workload not in self.samples:
            self.samples[workload] = {}
            self.order.append(workload)
        self.samples[workload].setdefault(impl, []).append(outcome.ns)

    def add_rss(self, workload, impl, kib):
        self.peak_rss.setdefault(workload, {}).setdefault(impl, []).append(kib)

    def error(self, workload, impl, outcome, what=""):
        entry = {"workload": workload, "impl": impl, "status": outcome.status, "what": what,
                 "stdout": outcome.stdout.decode("utf-8", "replace")[:600],
                 "stderr": outcome.stderr.decode("utf-8", "replace")[:600]}
        self.errors.append(entry)
        log("ERROR %s %s: exit %d %s %s" % (impl, workload, outcome.status, what,
                                            entry["stdout"].strip() or entry["stderr"].strip()))

    def leak(self, workload, impl, items):
        self.leaks.append({"workload": workload, "impl": impl, "leftovers": items})
        log("LEAK %s %s: %s" % (impl, workload, "; ".join(items)[:400]))


def expect_ok(results, workload, impl, outcome, what=""):
    if outcome.status != 0:
        results.error(workload, impl, outcome, what)
        return False
    return True


# ==============================================================================================
# Leak checks (node namespace state read back from the kernel and the disk)
# ==============================================================================================

def bridge_ports(bridge):
    out = run_tool([IP, "-j", "link", "show", "master", bridge], check=False)
    return [link["ifname"] for link in json.loads(out)] if out.strip() else []


def reservations(network):
    directory = os.path.join(network.data_dir, network.name)
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory)    # boot_id: ours, the boot they belong to
                  if f not in ("lock", "boot_id") and not f.startswith("last_reserved_ip."))


def masquerade_rules(impl, network):
    """Masquerade rules left for `network`: nftables table of ours, iptables nat table of the reference."""
    if impl.key == "ours":
        if not shutil.which("nft"):
            return []
        out = run_tool(["nft", "-j", "list", "ruleset"], check=False)
        entries = json.loads(out).get("nftables", []) if out.strip() else []
        return ["nft rule: %s" % e["rule"].get("comment", "") for e in entries
                if "rule" in e and ("net: %s," % network.name) in e["rule"].get("comment", "")]
    if not shutil.which("iptables-save"):
        return []
    out = run_tool(["iptables-save", "-t", "nat"], check=False)
    return ["iptables: " + line for line in out.splitlines() if 'name: \\"%s\\"' % network.name in line
            or 'name: "%s"' % network.name in line]


def portmap_rules(impl, network):
    """Port-mapping rules left for `network`: comments of ours in nftables (the reference's
    iptables chains are caught by masquerade_rules: their comments name the network too)."""
    if impl.key != "ours" or not shutil.which("nft"):
        return []
    out = run_tool(["nft", "-j", "list", "ruleset"], check=False)
    entries = json.loads(out).get("nftables", []) if out.strip() else []
    return ["nft rule: %s" % e["rule"].get("comment", "") for e in entries
            if "rule" in e and e["rule"].get("comment", "").startswith("net:%s " % network.name)]


def container_links(name):
    out = run_tool([IP, "-n", name, "-j", "link", "show"], check=False)
    return [l["ifname"] for l in json.loads(out) if l["ifname"] != "lo"] if out.strip() else []


def check_leaks(results, workload, impl, network, containers=()):
    """After every container of `network` was deleted: no port, reservation, rule or interface left."""
    enter(impl.node)
    items = ["port %s on %s" % (p, network.bridge) for p in bridge_ports(network.bridge)]
    items += ["reservation %s" % r for r in reservations(network)]
    items += masquerade_rules(impl, network)
    items += portmap_rules(impl, network)
    for name in containers:
        items += ["%s in %s" % (link, name) for link in container_links(name)]
    if items:
        results.leak(workload, impl.key, items)


# ==============================================================================================
# Workloads
# ==============================================================================================

def shared_plugin_names(ours_dir):
    """Every plugin name our installation links that the reference also has."""
    return sorted(name for name in os.listdir(ours_dir)
                  if os.path.islink(os.path.join(ours_dir, name)) and os.access(os.path.join(REF_DIR, name), os.X_OK))


def workload_version(results, impls, floors, count):
    """VERSION through every plugin name (our /bin/sh preamble answers it), interleaved with the
    process-start floors."""
    names = shared_plugin_names(impls[0].bin_dir)
    results.facts["VERSION names"] = names
    for i in range(count):
        for label, call in floors:
            outcome = run_one(call)
            if expect_ok(results, label, "floor", outcome):
                results.add(label, "floor", outcome)
        for name in names:
            for impl in interleaved(impls, i):
                outcome = run_one(impl.call(name, "VERSION"))
                if expect_ok(results, "VERSION %s" % name, impl.key, outcome):
                    results.add("VERSION %s" % name, impl.key, outcome)


def workload_status(results, impls, count):
    """STATUS of bridge and host-local (cniVersion 1.1.0), which containerd 2.x sends every few
    seconds; the reference 1.1.1 has no STATUS, so its VERSION of the same name stands for the
    cost of any Go call (the floor STATUS could reach)."""
    for i in range(count):
        for name in ("bridge", "host-local"):
            for impl in interleaved(impls, i):
                conf = dict(impl.main.config("1.1.0", True), type=name)
                command = "STATUS" if impl.key == "ours" else "VERSION"
                outcome = run_one(impl.call(name, command, conf))
                if expect_ok(results, "STATUS %s" % name, impl.key, outcome):
                    results.add("STATUS %s (ref: VERSION)" % name, impl.key, outcome)


def find_interpreters():
    """(label, path) of /usr/bin/python3 and of every pyenv CPython 3.6 to 3.13 on this machine."""
    import glob
    found = [("system", "/usr/bin/python3")] if os.access("/usr/bin/python3", os.X_OK) else []
    for minor in range(6, 14):
        paths = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.%d.*/bin/python3.%d" % (minor, minor))))
        if paths:
            found.append(("3.%d" % minor, paths[-1]))
    return found


def preamble_program(archive):
    """The Python program the archive's /bin/sh preamble runs with `-c` (between its quotes)."""
    with open(archive, "rb") as f:
        head = f.read(16384).split(b"PK\x03\x04", 1)[0].decode("utf-8")
    return head.split(" -c '", 1)[1].rsplit("' \"$cni\"", 1)[0]


def workload_interpreters(results, impls, spaces, count, scratch):
    """Under every interpreter found, one archive holding bytecode for all of them (build.sh
    --python repeated), its preamble pointed at that interpreter: VERSION through the Python path
    (the preamble's program run directly: what VERSION cost before sh answered it), ADD with
    ipMasq (time, then peak RSS)."""
    interpreters = find_interpreters()
    results.facts["interpreters"] = interpreters
    source = os.path.join(scratch, "multi-src")
    os.mkdir(source)
    for name in ("build.sh", "cni_bridge.py"):
        shutil.copy2(os.path.join(REPO, name), os.path.join(source, name))
    argv = [os.path.join(source, "build.sh")]
    for _, path in interpreters:
        argv += ["--python", path]
    run_tool(argv)
    built = open(os.path.join(source, "dist", "cni-bridge.pyz"), "rb").read()
    program = preamble_program(os.path.join(source, "dist", "cni-bridge.pyz"))
    ours = impls[0]
    dirs = {}
    for label, path in interpreters:
        directory = os.path.join(scratch, "python-" + label.split()[0])
        os.mkdir(directory)
        archive = os.path.join(directory, "cni-bridge.pyz")
        with open(archive, "wb") as f:
            f.write(built.replace(b"/usr/bin/python3", path.encode()))
        os.chmod(archive, 0o755)
        for name in shared_plugin_names(ours.bin_dir):
            os.symlink("cni-bridge.pyz", os.path.join(directory, name))
        dirs[label] = directory
    set_child_subreaper(True)
    try:
        for i in range(count):
            for label, path in interpreters:
                workload = "python %s" % label
                version = Call([path, "-E", "-s", "-S", "-c", program, "VERSION", os.path.join(dirs[label], "bridge")],
                               {"CNI_COMMAND": "VERSION", "PATH": SYSTEM_PATH}, b'{"cniVersion":"1.0.0"}', ours.node)
                outcome = run_one(version)
                if expect_ok(results, workload + " VERSION", "ours", outcome):
                    results.add(workload + " VERSION (python path)", "ours", outcome)
                for timed in (True, False):
                    netns = spaces.create(1)[0]
                    conf = ours.main.config("1.0.0", True)
                    container_id = "interp-%s" % netns
                    add_call = ours.call("bridge", "ADD", conf, container_id, netns, bin_dir=dirs[label])
                    if timed:
                        outcome = run_one(add_call)
                    else:
                        kib, outcome = measure_peak_rss(add_call)
                    if expect_ok(results, workload + " ADD ipMasq", "ours", outcome):
                        if timed:
                            results.add(workload + " ADD 1.0.0 ipMasq", "ours", outcome)
                        else:
                            results.add_rss(workload + " ADD 1.0.0 ipMasq", "ours", kib)
                        conf = dict(conf, prevResult=outcome.json())
                    expect_ok(results, workload + " DEL", "ours",
                              run_one(ours.call("bridge", "DEL", conf, container_id, netns, bin_dir=dirs[label])))
                    spaces.delete([netns])
    finally:
        set_child_subreaper(False)


def add_check_del(results, impl, suffix, netns, container_id, conf, timed=True):
    """One container's ADD, CHECK and DEL (prevResult passed as a runtime does); True if all worked."""
    add = run_one(impl.call("bridge", "ADD", conf, container_id, netns))
    if not expect_ok(results, "ADD " + suffix, impl.key, add, container_id):
        run_one(impl.call("bridge", "DEL", conf, container_id, netns))
        return False
    with_prev = dict(conf, prevResult=add.json())
    check = run_one(impl.call("bridge", "CHECK", with_prev, container_id, netns))
    delete = run_one(impl.call("bridge", "DEL", with_prev, container_id, netns))
    ok_check = expect_ok(results, "CHECK " + suffix, impl.key, check, container_id)
    ok_del = expect_ok(results, "DEL " + suffix, impl.key, delete, container_id)
    if timed:
        results.add("ADD " + suffix, impl.key, add)
        if ok_check:
            results.add("CHECK " + suffix, impl.key, check)
        if ok_del:
            results.add("DEL " + suffix, impl.key, delete)
    return ok_check and ok_del


def workload_cycles(results, impls, spaces, count):
    """ADD, CHECK, DEL for 1.0.0 and 0.4.0, without and with ipMasq; a fresh netns and ID per sample."""
    for version in ("1.0.0", "0.4.0"):
        for masq in (False, True):
            suffix = "%s%s" % (version, " ipMasq" if masq else "")
            log("ADD/CHECK/DEL %s: 1 warm-up + %d samples each" % (suffix, count))
            for i in range(-1, count):      # i = -1: warm-up (bridge, nft table, caches), not recorded
                names = spaces.create(2)
                for impl, netns in zip(interleaved(impls, i), names):
                    conf = impl.main.config(version, masq)
                    container_id = "bench-%s-%s" % (impl.key, netns)
                    add_check_del(results, impl, suffix, netns, container_id, conf, timed=i >= 0)
                    if i % LEAK_CHECK_EVERY == 0 or i == count - 1:
                        check_leaks(results, "ADD/CHECK/DEL " + suffix, impl, impl.main, [netns])
                spaces.delete(names)


PORT_MAPPINGS = [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                 {"hostPort": 8081, "containerPort": 81, "protocol": "udp"}]


def portmap_config(network, prev=None):
    conf = {"cniVersion": "1.0.0", "name": network.name, "type": "portmap",
            "runtimeConfig": {"portMappings": PORT_MAPPINGS}}
    if prev is not None:
        conf["prevResult"] = prev
    return conf


def workload_portmap(results, impls, spaces, count):
    """portmap ADD and DEL with two mappings (tcp and udp), chained after an untimed bridge ADD."""
    log("portmap ADD/DEL: 1 warm-up + %d samples each" % count)
    for i in range(-1, count):
        names = spaces.create(2)
        for impl, netns in zip(interleaved(impls, i), names):
            conf = impl.main.config("1.0.0", False)
            container_id = "pm-%s-%s" % (impl.key, netns)
            add = run_one(impl.call("bridge", "ADD", conf, container_id, netns))
            if not expect_ok(results, "portmap: bridge ADD", impl.key, add, container_id):
                continue
            mapped = portmap_config(impl.main, add.json())
            for command in ("ADD", "DEL"):
                outcome = run_one(impl.call("portmap", command, mapped, container_id, netns))
                if expect_ok(results, "portmap " + command, impl.key, outcome, container_id) and i >= 0:
                    results.add("portmap %s" % command, impl.key, outcome)
            expect_ok(results, "portmap: bridge DEL", impl.key,
                      run_one(impl.call("bridge", "DEL", dict(conf, prevResult=add.json()), container_id, netns)))
            if i % LEAK_CHECK_EVERY == 0 or i == count - 1:
                check_leaks(results, "portmap ADD/DEL", impl, impl.main, [netns])
        spaces.delete(names)


def workload_loopback(results, impls, spaces, count):
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    for i in range(count):
        names = spaces.create(2)
        for impl, netns in zip(interleaved(impls, i), names):
            add = run_one(impl.call("loopback", "ADD", conf, "lo-" + netns, netns))
            if expect_ok(results, "loopback ADD", impl.key, add):
                results.add("loopback ADD", impl.key, add)
            delete = run_one(impl.call("loopback", "DEL", conf, "lo-" + netns, netns))
            if expect_ok(results, "loopback DEL", impl.key, delete):
                results.add("loopback DEL", impl.key, delete)
        spaces.delete(names)


TUNING_MAC = "02:00:00:00:be:01"


def tuning_config(impl, netns, scratch):
    """tuning as podman chains it after bridge, with every link key and two sysctls."""
    return {"cniVersion": "1.0.0", "name": "cbb-tuning", "type": "tuning",
            "dataDir": os.path.join(scratch, "tuning-" + impl.key),
            "mac": TUNING_MAC, "mtu": 1400, "promisc": True, "allmulti": True,
            "sysctl": {"net.ipv4.conf.IFNAME.arp_notify": "1", "net.ipv4.ip_default_ttl": "77"},
            "prevResult": {"cniVersion": "1.0.0",
                           "interfaces": [{"name": "eth0", "mac": "02:00:00:00:be:02",
                                           "sandbox": netns_path(netns)}],
                           "ips": [{"address": "10.200.0.2/24", "interface": 0}]}}


def workload_tuning(results, impls, spaces, count, scratch):
    """tuning ADD and DEL on a container's veth (made beforehand); DEL must restore it all."""
    for i in range(-1, count):              # i = -1: warm-up, not recorded
        names = spaces.create(2)
        for name in names:
            run_tool([IP, "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"])
        for impl, netns in zip(interleaved(impls, i), names):
            conf = tuning_config(impl, netns, scratch)
            container_id = "tune-" + netns
            for command in ("ADD", "DEL"):
                outcome = run_one(impl.call("tuning", command, conf, container_id, netns))
                if expect_ok(results, "tuning " + command, impl.key, outcome) and i >= 0:
                    results.add("tuning " + command, impl.key, outcome)
            link = json.loads(run_tool([IP, "-n", netns, "-j", "link", "show", "eth0"]))[0]
            leftovers = os.listdir(conf["dataDir"]) if os.path.isdir(conf["dataDir"]) else []
            if link["address"] == TUNING_MAC or link["mtu"] != 1500 or "PROMISC" in link["flags"] or leftovers:
                results.leak("tuning", impl.key, ["eth0 not restored: %s %d %s" % (
                    link["address"], link["mtu"], ",".join(link["flags"]))] + leftovers)
        spaces.delete(names)
def workload_firewall(results, impls, count):
    """firewall ADD and DEL (prevResult passed, as a runtime does) in each node namespace, whose
    FORWARD policy drops; a new address and container ID per sample."""
    for impl in impls:
        run_tool([IP, "netns", "exec", impl.node.name, "iptables", "-P", "FORWARD", "DROP"])
    for i in range(-1, count):          # i = -1: warm-up (table filter and chains made), not recorded
        for impl in interleaved(impls, i):
            prev = {"cniVersion": "1.0.0", "interfaces": [{"name": impl.main.bridge}, {"name": "eth0"}],
                    "ips": [{"address": "10.%d.%d.%d/16" % (60 + (impl.key == "ref"), 1 + (i + 1) // 250,
                                                            1 + (i + 1) % 250), "interface": 1}]}
            conf = {"cniVersion": "1.0.0", "name": impl.main.name, "type": "firewall", "prevResult": prev}
            container_id = "bench-fw-%s-%d" % (impl.key, i)
            add = run_one(impl.call("firewall", "ADD", conf, container_id, "cbb-no-netns"))
            delete = run_one(impl.call("firewall", "DEL", conf, container_id, "cbb-no-netns"))
            if expect_ok(results, "firewall ADD", impl.key, add, container_id) and i >= 0:
                results.add("firewall ADD", impl.key, add)
            if expect_ok(results, "firewall DEL", impl.key, delete, container_id) and i >= 0:
                results.add("firewall DEL", impl.key, delete)


BANDWIDTH_SHAPING = {"ingressRate": 16000000, "ingressBurst": 128000, "egressRate": 8000000,
                     "egressBurst": 64000}


def ifb_devices():
    out = run_tool([IP, "-j", "link", "show", "type", "ifb"], check=False)
    return [link["ifname"] for link in json.loads(out)] if out.strip() else []


def workload_bandwidth(results, impls, spaces, count):
    """bandwidth ADD and DEL (both directions shaped: a tbf on the host veth, an IFB with its tbf
    and the redirect filter) chained after the implementation's own bridge, whose calls are timed
    only in the chain rows (bridge + bandwidth, as a runtime runs them); DEL in reverse order."""
    log("bandwidth: 1 warm-up + %d samples" % count)
    shaping = BANDWIDTH_SHAPING
    for i in range(-1, count):
        names = spaces.create(2)
        for impl, netns in zip(interleaved(impls, i), names):
            conf = impl.main.config("1.0.0", False)
            bw_conf = dict(shaping, cniVersion="1.0.0", name=impl.main.name, type="bandwidth")
            container_id = "bw-%s-%s" % (impl.key, netns)
            bridge_add = run_one(impl.call("bridge", "ADD", conf, container_id, netns))
            if not expect_ok(results, "bandwidth (bridge ADD)", impl.key, bridge_add, container_id):
                run_one(impl.call("bridge", "DEL", conf, container_id, netns))
                continue
            prev = bridge_add.json()
            add = run_one(impl.call("bandwidth", "ADD", dict(bw_conf, prevResult=prev), container_id, netns))
            ok_add = expect_ok(results, "bandwidth ADD", impl.key, add, container_id)
            final = add.json() if ok_add else prev
            delete = run_one(impl.call("bandwidth", "DEL", dict(bw_conf, prevResult=final), container_id, netns))
            ok_del = expect_ok(results, "bandwidth DEL", impl.key, delete, container_id)
            bridge_del = run_one(impl.call("bridge", "DEL", dict(conf, prevResult=final), container_id, netns))
            ok_bridge_del = expect_ok(results, "bandwidth (bridge DEL)", impl.key, bridge_del, container_id)
            if i >= 0 and ok_add:
                results.add("bandwidth ADD", impl.key, add)
                results.add("chain bridge+bandwidth ADD", impl.key,
                            Outcome(bridge_add.ns + add.ns, 0, b"", b"", 0))
            if i >= 0 and ok_del and ok_bridge_del:
                results.add("bandwidth DEL", impl.key, delete)
                results.add("chain bridge+bandwidth DEL", impl.key,
                            Outcome(delete.ns + bridge_del.ns, 0, b"", b"", 0))
            if i % LEAK_CHECK_EVERY == 0 or i == count - 1:
                check_leaks(results, "bandwidth", impl, impl.main, [netns])
                leftover = ifb_devices()
                if leftover:
                    results.leak("bandwidth", impl.key, ["IFB device %s" % name for name in leftover])
        spaces.delete(names)


# --- whole chains, as the runtimes' default networks run them ---------------------------------
# Each plugin of the chain is one process, as libcni runs it: ADD in order threading prevResult,
# then DEL in reverse with the final result.  A row is the sum of the process times of one
# container's ADDs (or DELs, or both); the plugins' configs reuse the per-plugin workloads'.

def bridge_config(network, **keys):
    """The network's bridge config with a runtime's keys added (hairpinMode, ...)."""
    return dict(network.config("1.0.0", True), **keys)


def k3s_bridge_config(network):
    """The bridge flannel delegates to in k3s: no ipMasq (flannel masquerades), the gateway as the
    default route (so no default route from host-local)."""
    return {"cniVersion": "1.0.0", "name": network.name, "type": "bridge", "bridge": network.bridge,
            "isGateway": True, "isDefaultGateway": True, "forceAddress": True, "hairpinMode": True,
            "ipam": {"type": "host-local", "subnet": network.subnet, "dataDir": network.data_dir}}


def chained(network, plugin, **keys):
    return dict({"cniVersion": "1.0.0", "name": network.name, "type": plugin}, **keys)


# name -> (the plugins' configs for one implementation's network and scratch dir, target of ADD+DEL)
CHAINS = {
    "containerd": (lambda network, scratch: [
        chained(network, "loopback"), network.config("1.0.0", True), portmap_config(network)], 0.7),
    "podman": (lambda network, scratch: [
        bridge_config(network, hairpinMode=True), portmap_config(network), chained(network, "firewall"),
        chained(network, "tuning", dataDir=os.path.join(scratch, "chain-tuning"))], 0.7),
    "k3s": (lambda network, scratch: [
        k3s_bridge_config(network), portmap_config(network),
        chained(network, "bandwidth", runtimeConfig={"bandwidth": BANDWIDTH_SHAPING})], 0.8),
}


def firewall_rules(impl, addresses):
    """The node's iptables filter rules naming one of `addresses` (the firewall plugin's)."""
    if not addresses or not shutil.which("iptables-save"):
        return []
    out = run_tool(["iptables-save", "-t", "filter"], check=False)
    return ["iptables: " + line for line in out.splitlines()
            if any(" %s/32 " % address in line for address in addresses)]


def workload_chain(results, impls, spaces, count, name, scratch):
    """One runtime's default chain (CHAINS[name]) as a whole, ours against the reference's."""
    build, _target = CHAINS[name]
    label = "%s chain" % name
    log("%s (%s): 1 warm-up + %d samples" % (label, ", ".join(c["type"] for c in build(impls[0].main, scratch)),
                                             count))
    for i in range(-1, count):
        names = spaces.create(2)
        for impl, netns in zip(interleaved(impls, i), names):
            plugins = build(impl.main, os.path.join(scratch, impl.key))
            container_id = "%s-%s-%s" % (name, impl.key, netns)
            total, result, ok = {"ADD": 0, "DEL": 0}, None, True
            for conf in plugins:
                stdin = dict(conf, prevResult=result) if result is not None else conf
                add = run_one(impl.call(conf["type"], "ADD", stdin, container_id, netns))
                ok = expect_ok(results, "%s ADD %s" % (label, conf["type"]), impl.key, add, container_id) and ok
                total["ADD"] += add.ns
                if add.status != 0:
                    break
                result = add.json()
            for conf in reversed(plugins):
                stdin = dict(conf, prevResult=result) if result is not None else conf
                delete = run_one(impl.call(conf["type"], "DEL", stdin, container_id, netns))
                ok = expect_ok(results, "%s DEL %s" % (label, conf["type"]), impl.key, delete, container_id) and ok
                total["DEL"] += delete.ns
            if ok and i >= 0:
                for command in ("ADD", "DEL"):
                    results.add("%s %s" % (label, command), impl.key, Outcome(total[command], 0, b"", b"", 0))
                results.add("%s ADD+DEL" % label, impl.key, Outcome(total["ADD"] + total["DEL"], 0, b"", b"", 0))
            if i % LEAK_CHECK_EVERY == 0 or i == count - 1:
                check_leaks(results, label, impl, impl.main, [netns])
                leftovers = ["IFB device %s" % device for device in ifb_devices()]
                leftovers += firewall_rules(impl, [container_ip(result)] if result else [])
                tuning_dir = os.path.join(scratch, impl.key, "chain-tuning")
                leftovers += ["tuning file %s" % f for f in
                              (os.listdir(tuning_dir) if os.path.isdir(tuning_dir) else [])]
                if leftovers:
                    results.leak(label, impl.key, leftovers)
        spaces.delete(names)


def workload_burst(results, impls, spaces, rounds, width=32):
    """`width` concurrent ADDs, then `width` concurrent DELs: wall time; addresses must be distinct."""
    for masq in (False, True):
        label = "burst %d%s" % (width, " ipMasq" if masq else "")
        log("%s: %d rounds" % (label, rounds))
        for i in range(-1, rounds):          # i = -1: warm-up round, not recorded
            for impl in interleaved(impls, i):
                conf = impl.burst.config("1.0.0", masq)
                names = spaces.create(width)
                ids = ["burst-%s-%s" % (impl.key, n) for n in names]
                wall, adds = run_many([impl.call("bridge", "ADD", conf, c, n) for c, n in zip(ids, names)])
                addresses = []
                for outcome in adds:
                    if expect_ok(results, label + " ADD", impl.key, outcome):
                        addresses.append(container_ip(outcome.json()))
                if len(set(addresses)) != len(addresses):
                    results.errors.append({"workload": label, "impl": impl.key, "status": 0,
                                           "what": "duplicate addresses: %s" % sorted(addresses)})
                    log("ERROR %s %s: duplicate addresses" % (impl.key, label))
                calls = [impl.call("bridge", "DEL", dict(conf, prevResult=o.json()) if o.status == 0 else conf,
                                   c, n) for o, c, n in zip(adds, ids, names)]
                del_wall, dels = run_many(calls)
                ok_del = all([expect_ok(results, label + " DEL", impl.key, o) for o in dels])
                if i >= 0 and len(addresses) == width:
                    results.add(label + " ADD (wall)", impl.key, Outcome(wall, 0, b"", b"", 0))
                if i >= 0 and ok_del:
                    results.add(label + " DEL (wall)", impl.key, Outcome(del_wall, 0, b"", b"", 0))
                check_leaks(results, label, impl, impl.burst, names)
                spaces.delete(names)


def workload_sequential(results, impls, spaces, count, window=100):
    """`count` ADDs on one bridge (all kept), then their DELs; per-call times by position."""
    log("sequential: %d ADDs then %d DELs per implementation (ipMasq, /20)" % (count, count))
    times = {impl.key: {"ADD": [], "DEL": []} for impl in impls}
    containers = {impl.key: [] for impl in impls}   # (netns, id, conf with prevResult)
    names_all = []
    for i in range(count):
        if i % 100 == 0:
            names = spaces.create(2 * min(100, count - i))
            names_all += names
        for impl in interleaved(impls, i):
            netns = names.pop()
            conf = impl.seq.config("1.0.0", True)
            container_id = "seq-%s-%d" % (impl.key, i)
            add = run_one(impl.call("bridge", "ADD", conf, container_id, netns))
            times[impl.key]["ADD"].append(add.ns)
            if expect_ok(results, "sequential ADD", impl.key, add, "#%d" % i):
                conf = dict(conf, prevResult=add.json())
            containers[impl.key].append((netns, container_id, conf))
        if (i + 1) % 100 == 0:
            log("  %d/%d containers per implementation" % (i + 1, count))
    for impl in impls:
        addresses = [container_ip(c[2]["prevResult"]) for c in containers[impl.key] if "prevResult" in c[2]]
        if len(set(addresses)) != len(addresses):
            results.errors.append({"workload": "sequential", "impl": impl.key, "status": 0,
                                   "what": "duplicate addresses"})
        enter(impl.node)
        results.facts["sequential %s attached" % impl.key] = len(bridge_ports(impl.seq.bridge))
    for i in range(count):
        for impl in interleaved(impls, i):
            netns, container_id, conf = containers[impl.key][i]
            delete = run_one(impl.call("bridge", "DEL", conf, container_id, netns))
            times[impl.key]["DEL"].append(delete.ns)
            expect_ok(results, "sequential DEL", impl.key, delete, "#%d" % i)
    for impl in impls:
        check_leaks(results, "sequential", impl, impl.seq, [c[0] for c in containers[impl.key][::50]])
    spaces.delete(names_all)
    window = min(window, count // 2)
    for impl in impls:
        adds, dels = times[impl.key]["ADD"], times[impl.key]["DEL"]
        # ADD: the last containers join a bridge holding count-1 others; DEL: the first ones leave it.
        for label, many, few in (("ADD", adds[-window:], adds[:window]), ("DEL", dels[:window], dels[-window:])):
            for part, values in (("many", many), ("few", few)):
                results.samples.setdefault("sequential %s %s" % (label, part), {})[impl.key] = values
    results.facts["sequential window"] = window
    results.facts["sequential count"] = count
    return times


def workload_peak_rss(results, impls, spaces, floors, count):
    """Peak RSS of VERSION and of one ADD (with and without ipMasq), and of the floors."""
    set_child_subreaper(True)
    try:
        for i in range(count):
            for label, call in floors:
                kib, outcome = measure_peak_rss(call)
                if expect_ok(results, label + " (RSS)", "floor", outcome):
                    results.add_rss(label, "floor", kib)
            created = spaces.create(4)
            names = list(created)
            for impl in interleaved(impls, i):
                kib, outcome = measure_peak_rss(impl.call("bridge", "VERSION"))
                if expect_ok(results, "VERSION (RSS)", impl.key, outcome):
                    results.add_rss("VERSION bridge", impl.key, kib)
                for masq in (False, True):
                    netns = names.pop()
                    conf = impl.main.config("1.0.0", masq)
                    workload = "ADD 1.0.0" + (" ipMasq" if masq else "")
                    container_id = "rss-%s-%s" % (impl.key, netns)
                    kib, outcome = measure_peak_rss(impl.call("bridge", "ADD", conf, container_id, netns))
                    if expect_ok(results, workload + " (RSS)", impl.key, outcome):
                        results.add_rss(workload, impl.key, kib)
                        conf = dict(conf, prevResult=outcome.json())
                    expect_ok(results, workload + " (RSS) DEL", impl.key,
                              run_one(impl.call("bridge", "DEL", conf, container_id, netns)))
            spaces.delete(created)
    finally:
        set_child_subreaper(False)


def install_fresh(impl, scratch, index, ours_archive):
    """A new directory holding a freshly written copy of the implementation's plugins."""
    directory = os.path.join(scratch, "fresh-%s-%d" % (impl.key, index))
    if impl.key == "ours":
        run_tool([ours_archive, "install", directory])
    else:
        os.mkdir(directory)
        for name in PLUGIN_NAMES:
            shutil.copy2(os.path.join(REF_DIR, name), os.path.join(directory, name))
    return directory


def workload_first_call(results, impls, spaces, rounds, scratch, ours_archive, warm=3):
    """The first VERSION and the first ADD from a freshly installed copy, then `warm` more of each."""
    for i in range(rounds):
        for impl in interleaved(impls, i):
            fresh = install_fresh(impl, scratch, 2 * i, ours_archive)
            for n in range(warm + 1):
                outcome = run_one(impl.call("bridge", "VERSION", bin_dir=fresh))
                if expect_ok(results, "VERSION first/warm", impl.key, outcome):
                    results.add("VERSION bridge %s" % ("first" if n == 0 else "warm"), impl.key, outcome)
            fresh = install_fresh(impl, scratch, 2 * i + 1, ours_archive)
            names = spaces.create(warm + 1)
            for n, netns in enumerate(names):
                conf = impl.main.config("1.0.0", False)
                container_id = "first-%s-%s" % (impl.key, netns)
                add = run_one(impl.call("bridge", "ADD", conf, container_id, netns, bin_dir=fresh))
                if expect_ok(results, "ADD first/warm", impl.key, add):
                    results.add("ADD 1.0.0 %s" % ("first" if n == 0 else "warm"), impl.key, add)
                    conf = dict(conf, prevResult=add.json())
                run_one(impl.call("bridge", "DEL", conf, container_id, netns, bin_dir=fresh))
            check_leaks(results, "first call", impl, impl.main, names)
            spaces.delete(names)


# ==============================================================================================
# Statistics and report
# ==============================================================================================

def quantile(values, q):
    """Linear-interpolation quantile of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values):
    return quantile(values, 0.5)


def bootstrap(a, b, combine, rng):
    """(estimate, low, high): combine(median a, median b) with a 95% percentile bootstrap interval."""
    estimate = combine(median(a), median(b))
    draws = sorted(combine(median(rng.choices(a, k=len(a))), median(rng.choices(b, k=len(b))))
                   for _ in range(BOOTSTRAP_ITERATIONS))
    return estimate, quantile(draws, 0.025), quantile(draws, 0.975)


def ratio(x, y):
    return x / y if y else float("inf")


def difference(x, y):
    return x - y


def ms(ns):
    return ns / 1e6


def summary_rows(results, rng):
    """One row per workload measured for both implementations: medians, p10/p90, n, ratio and CI."""
    rows = []
    for workload in results.order:
        by_impl = results.samples[workload]
        if "ours" not in by_impl or "ref" not in by_impl:
            continue
        row = {"workload": workload}
        for key in ("ours", "ref"):
            values = by_impl[key]
            row[key] = {"median": median(values), "p10": quantile(values, 0.1),
                        "p90": quantile(values, 0.9), "n": len(values)}
        row["ratio"] = bootstrap(by_impl["ours"], by_impl["ref"], ratio, rng)
        rows.append(row)
    return rows


def format_table(rows):
    header = "%-32s | %8s %8s %8s %4s | %8s %8s %8s %4s | %-20s" % (
        "workload (ms)", "ours med", "p10", "p90", "n", "ref med", "p10", "p90", "n", "ours/ref [95% CI]")
    lines = [header, "-" * len(header)]
    for row in rows:
        o, r = row["ours"], row["ref"]
        est, low, high = row["ratio"]
        lines.append("%-32s | %8.2f %8.2f %8.2f %4d | %8.2f %8.2f %8.2f %4d | %.2f [%.2f, %.2f]" % (
            row["workload"], ms(o["median"]), ms(o["p10"]), ms(o["p90"]), o["n"],
            ms(r["median"]), ms(r["p10"]), ms(r["p90"]), r["n"], est, low, high))
    return lines


def target_rows(results, rows, rng):
    """Issue 6's targets: (target text, measured (est, low, high), limit, unit)."""
    by_name = dict((row["workload"], row) for row in rows)
    samples = results.samples
    targets = []

    def against_ref(label, workload, limit):
        if workload in by_name:
            targets.append((label, by_name[workload]["ratio"], limit, "x"))

    for version in ("1.0.0", "0.4.0"):
        against_ref("ADD %s ipMasq ours/ref <= 0.8" % version, "ADD %s ipMasq" % version, 0.8)
        against_ref("DEL %s ipMasq ours/ref <= 0.4" % version, "DEL %s ipMasq" % version, 0.4)
        for command in ("ADD", "CHECK", "DEL"):
            against_ref("%s %s ours/ref <= 1.0" % (command, version), "%s %s" % (command, version), 1.0)
    for command in ("ADD", "DEL"):      # issue 16: both are mostly start-up
        against_ref("tuning %s ours/ref <= 1.5" % command, "tuning " + command, 1.5)
    for command in ("ADD", "DEL"):      # issue 16: the reference execs iptables
        against_ref("firewall %s ours/ref <= 0.5" % command, "firewall %s" % command, 0.5)
    for command in ("ADD", "DEL"):
        against_ref("bandwidth %s ours/ref <= 1.3" % command, "bandwidth %s" % command, 1.3)
    for masq in ("", " ipMasq"):
        for command in ("ADD", "DEL"):
            against_ref("burst 32%s %s wall ours/ref <= 0.8" % (masq, command),
                        "burst 32%s %s (wall)" % (masq, command), 0.8)
    against_ref("portmap ADD ours/ref <= 0.5", "portmap ADD", 0.5)
    against_ref("portmap DEL ours/ref <= 0.5", "portmap DEL", 0.5)
    for name, (_build, limit) in sorted(CHAINS.items()):     # issues 15, 16, 17: whole chains
        against_ref("%s chain ADD+DEL ours/ref <= %s" % (name, limit), "%s chain ADD+DEL" % name, limit)
    for command in ("ADD", "DEL"):
        many = samples.get("sequential %s many" % command, {})
        few = samples.get("sequential %s few" % command, {})
        if "ours" in many and "ours" in few:
            targets.append(("sequential %s growth (ours) <= 1.2" % command,
                            bootstrap(many["ours"], few["ours"], ratio, rng), 1.2, "x"))
    for name in results.facts.get("VERSION names", PLUGIN_NAMES):     # issue 18: moonshot 0.6
        against_ref("VERSION %s ours/ref <= 1.0" % name, "VERSION %s" % name, 1.0)
    floor_rss = results.peak_rss.get("python -IS -c pass", {}).get("floor")
    ours_rss = results.peak_rss.get("ADD 1.0.0", {}).get("ours")
    if floor_rss and ours_rss:
        targets.append(("peak RSS of ADD / python floor RSS <= 1.3",
                        bootstrap(ours_rss, floor_rss, ratio, rng), 1.3, "x"))
    for workload in ("VERSION bridge", "ADD 1.0.0"):
        first = samples.get(workload + " first", {}).get("ours")
        warm = samples.get(workload + " warm", {}).get("ours")
        if first and warm:
            targets.append(("%s first call / warm (ours) <= 1.5" % workload.split()[0],
                            bootstrap(first, warm, ratio, rng), 1.5, "x"))
    return targets


def format_targets(targets):
    lines = []
    for label, (est, low, high), limit, unit in targets:
        verdict = "PASS" if est <= limit else "MISS"
        sure = "" if (high <= limit) == (est <= limit) and (low <= limit) == (est <= limit) else \
            "  (CI straddles the target)"
        lines.append("%-46s %8.2f%-2s [%.2f, %.2f]  %s%s" % (label, est, unit, low, high, verdict, sure))
    return lines


def format_extras(results):
    """Floors, RSS, sequential growth and first-call tables."""
    lines = ["", "Process-start floors (ms, median [p10, p90], n):"]
    for label in ("/bin/true", "python -IS -c pass", "empty zipapp (python -IS)"):
        values = results.samples.get(label, {}).get("floor")
        if values:
            rss = results.peak_rss.get(label, {}).get("floor")
            lines.append("  %-28s %7.2f [%.2f, %.2f] n=%d%s" % (
                label, ms(median(values)), ms(quantile(values, 0.1)), ms(quantile(values, 0.9)),
                len(values), "   peak RSS %d KiB" % median(rss) if rss else ""))
    ref_version = results.samples.get("VERSION bridge", {}).get("ref")
    if ref_version:
        lines.append("  %-28s %7.2f [%.2f, %.2f] n=%d" % (
            "reference VERSION (bridge)", ms(median(ref_version)), ms(quantile(ref_version, 0.1)),
            ms(quantile(ref_version, 0.9)), len(ref_version)))
    lines += ["", "Peak RSS (KiB, median of ru_maxrss; the reference's includes the host-local and"
                  " iptables children it waited for):"]
    for workload in ("VERSION bridge", "ADD 1.0.0", "ADD 1.0.0 ipMasq"):
        by_impl = results.peak_rss.get(workload, {})
        if "ours" in by_impl and "ref" in by_impl:
            lines.append("  %-28s ours %7d   ref %7d   (n=%d)" % (
                workload, median(by_impl["ours"]), median(by_impl["ref"]), len(by_impl["ours"])))
    if results.facts.get("interpreters"):
        lines += ["", "Per interpreter (ours; medians): VERSION through the Python path (ms), ADD 1.0.0"
                      " ipMasq (ms), its peak RSS (KiB):"]
        for label, path in results.facts["interpreters"]:
            version = results.samples.get("python %s VERSION (python path)" % label, {}).get("ours")
            add = results.samples.get("python %s ADD 1.0.0 ipMasq" % label, {}).get("ours")
            rss = results.peak_rss.get("python %s ADD 1.0.0 ipMasq" % label, {}).get("ours")
            lines.append("  %-14s VERSION %7s   ADD %7s   peak RSS %7s   %s" % (
                label, "%.2f" % ms(median(version)) if version else "-", "%.2f" % ms(median(add)) if add else "-",
                "%d" % median(rss) if rss else "-", path))
    window = results.facts.get("sequential window")
    if window:
        lines += ["", "Sequential: %d containers on one bridge (ipMasq, /20); medians (ms) of %d calls:"
                  % (results.facts["sequential count"], window)]
        for command, many, few in (("ADD", "last", "first"), ("DEL", "first", "last")):
            for key in ("ours", "ref"):
                m = results.samples["sequential %s many" % command][key]
                f = results.samples["sequential %s few" % command][key]
                lines.append("  %s %-4s %s %d: %7.2f   %s %d: %7.2f   growth %.2fx" % (
                    command, key, few, window, ms(median(f)), many, window, ms(median(m)),
                    median(m) / median(f)))
    if results.samples.get("VERSION bridge first"):
        lines += ["", "First call after install vs warm calls (ms, medians):"]
        for workload in ("VERSION bridge", "ADD 1.0.0"):
            for key in ("ours", "ref"):
                first = results.samples.get(workload + " first", {}).get(key)
                warm = results.samples.get(workload + " warm", {}).get(key)
                if first and warm:
                    lines.append("  %-16s %-4s first %7.2f  warm %7.2f  first/warm %.2f (n=%d/%d)" % (
                        workload, key, ms(median(first)), ms(median(warm)), median(first) / median(warm),
                        len(first), len(warm)))
    return lines


# ==============================================================================================
# Set-up and main
# ==============================================================================================

def machine_facts():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = run_tool(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False).strip()
        dirty = run_tool(["git", "-C", REPO, "status", "--porcelain", "cni_bridge.py"], check=False).strip()
    except OSError:
        commit, dirty = "", ""
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "loadavg_start": os.getloadavg(),
            "commit": commit + ("+dirty cni_bridge.py" if dirty else ""),
            "reference": os.path.realpath(os.path.join(REF_DIR, "bridge"))}


def archive_interpreter(archive):
    """The Python that runs the archive: its `#!` interpreter, or, when that is a shell (a preamble
    such as `#!/bin/sh` + `exec /usr/bin/python3 -IS ...`), the program the preamble execs."""
    import shlex
    with open(archive, "rb") as f:
        head = f.read(4096).split(b"PK\x03\x04", 1)[0].decode("utf-8", "replace").splitlines()
    words = shlex.split(head[0][2:]) if head and head[0].startswith("#!") else []
    if len(words) > 1 and words[0].endswith("/env"):
        words = [shutil.which(words[1]) or words[1]]
    if words and os.path.basename(words[0]).startswith("python"):
        return words[0]
    for line in head[1:]:
        words = line.split()      # the -c program may span lines: only the first two words count
        if len(words) > 1 and words[0] == "exec" and "python" in os.path.basename(words[1]):
            return words[1]
    raise SystemExit("cannot tell which Python runs %s (first lines: %r)" % (archive, head[:3]))


def build_and_install(scratch):
    """./build.sh install <scratch>/ours; returns (bin dir, archive path, the Python that runs it)."""
    bin_dir = os.path.join(scratch, "ours")
    proc = subprocess.run([os.path.join(REPO, "build.sh"), "install", bin_dir], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if proc.returncode != 0:
        raise SystemExit("./build.sh install failed:\n" + proc.stdout)
    archive = os.path.join(bin_dir, "cni-bridge.pyz")
    return bin_dir, archive, archive_interpreter(archive)


def make_empty_zipapp(scratch, interpreter):
    source = os.path.join(scratch, "empty-app")
    os.mkdir(source)
    with open(os.path.join(source, "__main__.py"), "w") as f:
        f.write("")
    target = os.path.join(scratch, "empty.pyz")
    zipapp.create_archive(source, target, interpreter=interpreter + " -IS")
    return target


WORKLOAD_KEYS = ("version", "status", "cycles", "loopback", "portmap", "bandwidth", "chain", "tuning", "firewall",
                 "burst", "sequential", "rss", "first", "interpreters")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Benchmark cni-bridge against the reference CNI plugins.")
    parser.add_argument("--quick", action="store_true", help="small sample counts (under 3 minutes on 2 cores)")
    parser.add_argument("--json", metavar="FILE", help="write raw samples and the summary to FILE")
    parser.add_argument("--samples", type=int, help="samples per ADD/CHECK/DEL and loopback workload")
    parser.add_argument("--sequential", type=int, help="containers in the sequential workload (compared: first and last min(100, N/2))")
    parser.add_argument("--only", metavar="KEYS", action="append",
                        help="run only these workloads (comma-separated, repeatable: %s)" % ",".join(WORKLOAD_KEYS))
    return parser.parse_args(argv)


def run(args, scratch, spaces):
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.samples:
        size["samples"] = args.samples
    if args.sequential:
        size["sequential"] = max(args.sequential, 2)
    results = Results()
    results.facts["machine"] = machine_facts()
    results.facts["sizes"] = size

    log("building and installing the zipapp")
    ours_dir, ours_archive, interpreter = build_and_install(scratch)
    empty_app = make_empty_zipapp(scratch, interpreter)

    sweep_stale_namespaces()
    nodes = []
    for name in spaces.create(2, "node"):
        run_tool([IP, "-n", name, "link", "set", "lo", "up"])
        nodes.append(Node(name))
    impls = (Impl("ours", ours_dir, 64, scratch, nodes[0]), Impl("ref", REF_DIR, 96, scratch, nodes[1]))
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    log("node namespaces: ours %s (%s), reference %s (%s)" % (nodes[0].name, ours_dir, nodes[1].name, REF_DIR))
    try:
        floor_env = {"PATH": SYSTEM_PATH}
        floors = [("/bin/true", Call(["/bin/true"], floor_env, node=nodes[0])),
                  ("python -IS -c pass", Call([interpreter, "-I", "-S", "-c", "pass"], floor_env, node=nodes[0])),
                  ("empty zipapp (python -IS)", Call([empty_app], floor_env, node=nodes[0]))]
        workloads = [   # (key, name, announce it here (the others log their own progress), run it)
            ("version", "VERSION and floors: %d rounds" % size["version"], True,
             lambda: workload_version(results, impls, floors, size["version"])),
            ("status", "STATUS: %d rounds" % size["version"], True,
             lambda: workload_status(results, impls, size["version"])),
            ("cycles", "ADD/CHECK/DEL", False, lambda: workload_cycles(results, impls, spaces, size["samples"])),
            ("loopback", "loopback: %d samples" % size["samples"], True,
             lambda: workload_loopback(results, impls, spaces, size["samples"])),
            ("portmap", "portmap", False, lambda: workload_portmap(results, impls, spaces, size["samples"])),
            ("bandwidth", "bandwidth", False, lambda: workload_bandwidth(results, impls, spaces, size["samples"])),
            ("chain", "chains", False, lambda: [workload_chain(results, impls, spaces, size["samples"], name, scratch)
                                                for name in CHAINS]),
            ("tuning", "tuning ADD/DEL: %d samples" % size["samples"], True,
             lambda: workload_tuning(results, impls, spaces, size["samples"], scratch)),
            ("firewall", "firewall ADD/DEL: %d samples" % size["samples"], True,
             lambda: workload_firewall(results, impls, size["samples"])),
            ("burst", "burst", False, lambda: workload_burst(results, impls, spaces, size["bursts"])),
            ("sequential", "sequential", False,
             lambda: workload_sequential(results, impls, spaces, size["sequential"])),
            ("rss", "peak RSS: %d rounds" % size["rss"], True,
             lambda: workload_peak_rss(results, impls, spaces, floors, size["rss"])),
            ("first", "first call after install: %d rounds" % size["first"], True,
             lambda: workload_first_call(results, impls, spaces, size["first"], scratch, ours_archive)),
            ("interpreters", "interpreters: %d rounds" % size["rss"], True,
             lambda: workload_interpreters(results, impls, spaces, size["rss"], scratch)),
        ]
        assert [w[0] for w in workloads] == list(WORKLOAD_KEYS)
        only = set(w for arg in args.only or () for w in arg.split(",") if w) or set(WORKLOAD_KEYS)
        unknown = only - set(WORKLOAD_KEYS)
        if unknown:
            raise SystemExit("--only: unknown workloads %s (known: %s)" % (
                ",".join(sorted(unknown)), ",".join(WORKLOAD_KEYS)))
        for key, name, announce, workload in workloads:
            if key not in only:
                continue
            if announce:
                log(name)
            try:
                workload()
            except Exception as err:    # a broken workload must not lose the others' samples
                import traceback
                stop_children()
                results.errors.append({"workload": name, "impl": "bench", "status": -1,
                                       "what": "workload crashed: %r" % err, "stdout": "",
                                       "stderr": traceback.format_exc()[-1500:]})
                log("WORKLOAD CRASHED: %s\n%s" % (err, traceback.format_exc()))
    finally:
        setns(original)
        _current_node[0] = None
        os.close(original)
        for node in nodes:
            os.close(node.fd)
    results.facts["machine"]["loadavg_end"] = os.getloadavg()
    return results


def report(results, args, wall):
    rng = random.Random(BOOTSTRAP_SEED)
    rows = summary_rows(results, rng)
    targets = target_rows(results, rows, rng)
    machine = results.facts["machine"]
    out = ["", "cni-bridge vs reference (%s) - %s run, %.0f s, commit %s" % (
        machine["reference"], "quick" if args.quick else "full", wall, machine["commit"]),
        "machine: %s, %s CPUs, kernel %s, python %s, load %.2f -> %.2f" % (
            machine["cpu"], machine["cpus"], machine["kernel"], machine["python"],
            machine["loadavg_start"][0], machine["loadavg_end"][0]), ""]
    out += format_table(rows)
    out += format_extras(results)
    out += ["", "Targets of issue 6 (point estimate decides; 95% bootstrap CI in brackets):"]
    out += ["  " + line for line in format_targets(targets)]
    ours_errors = [e for e in results.errors if e["impl"] in ("ours", "bench")]
    ours_leaks = [l for l in results.leaks if l["impl"] == "ours"]
    out += ["", "errors: ours %d, reference %d; leaks: ours %d, reference %d" % (
        len(ours_errors), len(results.errors) - len(ours_errors), len(ours_leaks),
        len(results.leaks) - len(ours_leaks))]
    for entry in results.errors[:10]:
        out.append("  error %s %s exit %s: %s %s" % (entry["impl"], entry["workload"], entry["status"],
                                                     entry["what"], (entry.get("stdout") or "").strip()[:300]))
    for entry in results.leaks[:10]:
        out.append("  leak %s %s: %s" % (entry["impl"], entry["workload"], "; ".join(entry["leftovers"])[:300]))
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"facts": results.facts, "samples_ns": results.samples, "peak_rss_kib": results.peak_rss,
                       "summary": rows, "targets": [
                           {"target": t[0], "estimate": t[1][0], "ci95": t[1][1:], "limit": t[2],
                            "unit": t[3], "pass": t[1][0] <= t[2]} for t in targets],
                       "errors": results.errors, "leaks": results.leaks, "wall_s": wall}, f, indent=1)
    return 1 if ours_errors or ours_leaks else 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.py needs root (network namespaces, bridges, nf_tables)")
    missing = [n for n in PLUGIN_NAMES if not os.access(os.path.join(REF_DIR, n), os.X_OK)]
    if missing:
        raise SystemExit("reference plugins missing in %s (%s): apt-get install containernetworking-plugins"
                         % (REF_DIR, ", ".join(missing)))

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    scratch = tempfile.mkdtemp(prefix="cni-bridge-bench-")
    spaces = Namespaces()
    try:
        results = run(args, scratch, spaces)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_children()
        spaces.delete_all()
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return report(results, args, time.monotonic() - START)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; everything the bench made was removed\n")
        sys.exit(130)
