"""Reliability and security promises of issue 7 (README "Promises" and "Security"), proved on the
kernel and the disk: crashes at random instants, a storm of containers on a small range, concurrent
first use, a broken disk, a steering environment, stale state, a held lock, file modes.
Hostile input (hypothesis) lives in test_hostile.py.

Every test runs the bridge plugin with ipMasq (nftables backend) and host-local in a node namespace
it makes, and reads back `ip -j`, `nft -j list ruleset` and the state directory.  Sizes scale with
CNI_BRIDGE_CRASH_RUNS (kill points per command, default 100), CNI_BRIDGE_CRASH_SEED,
CNI_BRIDGE_STORM_WORKERS (8) and CNI_BRIDGE_STORM_CYCLES (50).
"""
import hashlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import (IP, KEY_PATHS, MASQ_CHAIN, MASQ_TABLE, POSTROUTING, RELNET, RELNET_BRIDGE,
                           RELNET_GATEWAY, RELNET_SUBNET, assert_nothing_left, bridge, cni_env, cni_error,
                           confine, encode_conf, explain, global_addrs, hostile_config, host_veths, kind,
                           masq_comments, masq_table, ok, parse_output, relnet_conf, reservations, ruleset,
                           run, set_path)

pytestmark = pytest.mark.kernel

# The reliability network of tests.helpers.
NET, BRIDGE, SUBNET, GATEWAY = RELNET, RELNET_BRIDGE, RELNET_SUBNET, RELNET_GATEWAY
conf = relnet_conf
CRASH_RUNS = int(os.environ.get("CNI_BRIDGE_CRASH_RUNS", "100"))
CRASH_SEED = int(os.environ.get("CNI_BRIDGE_CRASH_SEED", "20261128"))
STORM_WORKERS = int(os.environ.get("CNI_BRIDGE_STORM_WORKERS", "8"))
STORM_CYCLES = int(os.environ.get("CNI_BRIDGE_STORM_CYCLES", "50"))
STORM_HOLD = 5                       # containers a storm worker may hold before deleting one
STORM_SUBNET = "10.93.0.0/26"
STORM_RANGE = ("10.93.0.10", "10.93.0.41")   # 32 addresses
STORM_CAPACITY = 32


# --- configuration and calls --------------------------------------------------------------------

def start(bin_dir, command, config, node, netns, cid):
    """Start the bridge plugin inside `node` without waiting.  `ip netns exec` and the zipapp's sh
    preamble both exec in place, so the pid is the plugin's own."""
    proc = subprocess.Popen([IP, "netns", "exec", node.name, str(bin_dir / "bridge")],
                            env=cni_env(command, bin_dir, netns=netns, container_id=cid),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(encode_conf(config))
    proc.stdin.close()
    return proc


def address_of(result):
    return result["ips"][0]["address"].split("/")[0]


# --- kernel and disk state ----------------------------------------------------------------------

def masq_comment(cid, ifname="eth0", network=NET):
    """The comment of an attachment's masquerade rule, as the reference writes it."""
    def h16(text):
        return hashlib.sha512(text.encode()).hexdigest()[:16]
    return "%s-%s, net: %s, if: %s, id: %s" % (h16(network), h16(ifname + ":" + cid), network, ifname, cid)


def bridge_ports(node):
    return sorted(name for name, link in node.links().items() if link.get("master") == BRIDGE)


# --- 1. a crash at any instant --------------------------------------------------------------------

def call_duration(bin_dir, command, config, node, netns, cid):
    """Seconds one complete call takes, measured like the calls that are killed."""
    started = time.monotonic()
    proc = start(bin_dir, command, config, node, netns, cid)
    watchdog = threading.Timer(60, proc.kill)     # wait(timeout) would poll, adding up to 50 ms
    watchdog.start()
    status = proc.wait()
    elapsed = time.monotonic() - started
    watchdog.cancel()
    assert status == 0, "%s of %s failed" % (command, cid)
    return elapsed


def kill_after(proc, delay):
    """SIGKILL `proc` `delay` seconds after it started (unless it finished); returns its exit status."""
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)      # a no-op once it has exited
    return proc.wait(timeout=60)


def calibrate(bin_dir, config, node, netns):
    """Median durations (ADD, DEL) of five complete cycles on this machine, after a first cycle
    that makes the bridge and the masquerade table."""
    adds, dels = [], []
    for i in range(6):
        adds.append(call_duration(bin_dir, "ADD", config, node, netns, "calibrate%d" % i))
        dels.append(call_duration(bin_dir, "DEL", config, node, netns, "calibrate%d" % i))
    return sorted(adds[1:])[2], sorted(dels[1:])[2]


def assert_next_add_works(bin_dir, config, node, make_netns, data_dir):
    """A new container gets an address (no stale lock, no leaked address), and leaves cleanly."""
    fresh = make_netns("ct")
    result = ok(bridge(bin_dir, "ADD", config, node, fresh, "after-crashes"))
    assert global_addrs(fresh, "eth0") == [result["ips"][0]["address"]]
    assert reservations(data_dir / NET) == {address_of(result): "after-crashes\r\neth0"}
    ok(bridge(bin_dir, "DEL", dict(config, prevResult=result), node, fresh, "after-crashes"))
    assert_nothing_left(node, data_dir, [fresh], "after the final ADD/DEL:")


@pytest.mark.slow
def test_add_killed_at_any_instant_then_del_leaves_nothing(ours_bin, node, make_netns, data_dir):
    """ADDs killed with SIGKILL at random instants (0 to 1.2x one ADD): a reservation is complete or
    absent, and the runtime's DEL then leaves no reservation, veth, eth0, rule or held lock."""
    config = conf(data_dir)
    container = make_netns("ct")
    add_time, _ = calibrate(ours_bin, config, node, container)
    rng = random.Random(CRASH_SEED)
    print("ADD crash test: seed %d, %d runs, one ADD takes %.3f s" % (CRASH_SEED, CRASH_RUNS, add_time))
    killed = 0
    for run_index in range(CRASH_RUNS):
        cid = "crash-add-%03d" % run_index
        delay = rng.uniform(0, 1.2 * add_time)
        status = kill_after(start(ours_bin, "ADD", config, node, container, cid), delay)
        killed += status == -signal.SIGKILL
        context = "[seed %d run %d: ADD killed after %.4f s, exit %s]" % (CRASH_SEED, run_index, delay, status)
        held = reservations(data_dir / NET)
        assert set(held.values()) <= {"%s\r\neth0" % cid}, "%s partial reservation %s" % (context, held)
        ok(bridge(ours_bin, "DEL", config, node, container, cid))
        assert_nothing_left(node, data_dir, [container], context)
    print("ADD crash test: %d of %d runs killed mid-way" % (killed, CRASH_RUNS))
    assert killed >= CRASH_RUNS // 10, "too few kills landed before the ADD ended (a busy machine?)"
    assert_next_add_works(ours_bin, config, node, make_netns, data_dir)


@pytest.mark.slow
def test_del_killed_at_any_instant_then_repeated_leaves_nothing(ours_bin, node, make_netns, data_dir):
    """DELs killed with SIGKILL at random instants (0 to 1.2x one DEL), then repeated as a runtime
    does: no reservation, veth, eth0, rule or held lock is left."""
    config = conf(data_dir)
    container = make_netns("ct")
    _, del_time = calibrate(ours_bin, config, node, container)
    rng = random.Random(CRASH_SEED + 1)
    print("DEL crash test: seed %d, %d runs, one DEL takes %.3f s" % (CRASH_SEED + 1, CRASH_RUNS, del_time))
    killed = 0
    for run_index in range(CRASH_RUNS):
        cid = "crash-del-%03d" % run_index
        del_conf = dict(config, prevResult=ok(bridge(ours_bin, "ADD", config, node, container, cid)))
        delay = rng.uniform(0, 1.2 * del_time)
        status = kill_after(start(ours_bin, "DEL", del_conf, node, container, cid), delay)
        killed += status == -signal.SIGKILL
        context = "[seed %d run %d: DEL killed after %.4f s, exit %s]" % (CRASH_SEED + 1, run_index, delay, status)
        res = bridge(ours_bin, "DEL", del_conf, node, container, cid)
        assert res.returncode == 0, "%s repeated DEL: %s" % (context, explain(res))
        assert_nothing_left(node, data_dir, [container], context)
    print("DEL crash test: %d of %d runs killed mid-way" % (killed, CRASH_RUNS))
    assert killed >= CRASH_RUNS // 10, "too few kills landed before the DEL ended (a busy machine?)"
    assert_next_add_works(ours_bin, config, node, make_netns, data_dir)


# --- 2. storm -------------------------------------------------------------------------------------

# Prints {netns path: [ifindex, IPv4 address] or null} of eth0 in each namespace given: one process
# reads them all (setns per namespace), so sampling does not slow the storm down much.
READ_CONTAINER_ADDRESSES = r"""
import ctypes, fcntl, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
found = {}
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns " + path)
    os.close(fd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            index = socket.if_nametoindex("eth0")
            raw = fcntl.ioctl(s, 0x8915, struct.pack("256s", b"eth0"))      # SIOCGIFADDR
            found[path] = [index, socket.inet_ntoa(raw[20:24])]
        except OSError:
            found[path] = None
print(json.dumps(found))
"""


def read_container_addresses(paths):
    out = subprocess.run([sys.executable, "-I", "-c", READ_CONTAINER_ADDRESSES, *paths], check=True,
                         stdout=subprocess.PIPE, timeout=60).stdout
    return json.loads(out)


class Claims(object):
    """Who holds which address, as the storm's workers know it: claimed when ADD returns, given up
    before DEL starts.  A claim on an address someone else holds is a duplicate."""

    def __init__(self):
        self.lock = threading.Lock()
        self.holder = {}
        self.problems = []

    def claim(self, address, cid):
        with self.lock:
            if address in self.holder:
                self.problems.append("%s given to %s while %s holds it" % (address, cid, self.holder[address]))
            self.holder[address] = cid

    def give_up(self, address, cid):
        with self.lock:
            if self.holder.get(address) == cid:
                del self.holder[address]

    def snapshot(self):
        with self.lock:
            return dict(self.holder)


class Sampler(threading.Thread):
    """Until stopped, checks that no address is held twice, in the reservation files and in the
    kernel's container addresses.  Reads that race with a DEL and the next ADD are confirmed by
    reading again, so only a real overlap counts."""

    def __init__(self, data_dir, claims, namespaces):
        threading.Thread.__init__(self, daemon=True)
        self.data_dir, self.claims = data_dir, claims
        self.paths = [ns.path for ns in namespaces]
        self.stop = threading.Event()
        self.samples = 0
        self.problems = []

    def run(self):
        while not self.stop.is_set():
            try:
                self.check_files()
                self.check_kernel()
            except Exception as err:      # reported, not lost in the thread
                self.problems.append("sampler failed: %r" % err)
                return
            self.samples += 1
            self.stop.wait(0.05)

    def check_files(self):
        before = self.claims.snapshot()
        files = reservations(self.data_dir / NET)
        after = self.claims.snapshot()
        for address, cid in before.items():
            if after.get(address) == cid and files.get(address) != "%s\r\neth0" % cid:
                self.problems.append("%s held by %s, but its reservation says %r"
                                     % (address, cid, files.get(address)))
        owners = Counter(files.values())
        self.problems.extend("%r reserved %d addresses" % (o, n) for o, n in owners.items() if n > 1)

    def check_kernel(self):
        seen = read_container_addresses(self.paths)
        by_address = {}
        for path, entry in seen.items():
            if entry:
                by_address.setdefault(entry[1], []).append(path)
        shared = [paths for paths in by_address.values() if len(paths) > 1]
        if shared:
            again = read_container_addresses([p for paths in shared for p in paths])
            for paths in shared:
                if all(again[p] == seen[p] for p in paths):      # each held it all along
                    self.problems.append("%s on eth0 of %s at once" % (seen[paths[0]][1], paths))


@pytest.mark.slow
def test_storm_never_shares_an_address_and_ends_clean(ours_bin, node, make_netns, data_dir):
    """Workers x cycles of ADD/DEL, each worker holding up to 5 containers, on a 32-address range:
    exhaustion is a clean code-11 error that rolls back, no address is ever held twice (workers'
    claims, reservation files and kernel sampled meanwhile), and everything goes away at the end."""
    config = conf(data_dir, subnet=STORM_SUBNET, rangeStart=STORM_RANGE[0], rangeEnd=STORM_RANGE[1])
    slots = [[make_netns("st") for _ in range(STORM_HOLD)] for _ in range(STORM_WORKERS)]
    claims = Claims()
    first, last = (ipaddress.ip_address(a) for a in STORM_RANGE)
    exhausted = Counter()

    def worker(index):
        rng = random.Random(CRASH_SEED + 100 + index)
        held = {}                              # slot -> (cid, address, result)
        try:
            for cycle in range(STORM_CYCLES):
                if held and (len(held) == STORM_HOLD or rng.random() < 0.3):
                    slot = rng.choice(sorted(held))
                    cid, address, result = held.pop(slot)
                    claims.give_up(address, cid)
                    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, slots[index][slot], cid))
                slot = min(set(range(STORM_HOLD)) - set(held))
                cid = "storm-%d-%d" % (index, cycle)
                res = bridge(ours_bin, "ADD", config, node, slots[index][slot], cid)
                if res.returncode == 0:
                    address = address_of(ok(res))
                    assert first <= ipaddress.ip_address(address) <= last, (cid, address)
                    claims.claim(address, cid)
                    held[slot] = (cid, address, res.json)
                    continue
                error = cni_error(res)
                assert error["code"] == 11 and "no IP addresses available" in error["msg"], explain(res)
                assert sorted(slots[index][slot].links()) == ["lo"], "failed ADD of %s left an interface" % cid
                exhausted[index] += 1
                ok(bridge(ours_bin, "DEL", config, node, slots[index][slot], cid))     # the runtime's DEL
        finally:
            for slot, (cid, address, result) in held.items():
                claims.give_up(address, cid)
                bridge(ours_bin, "DEL", dict(config, prevResult=result), node, slots[index][slot], cid)

    sampler = Sampler(data_dir, claims, [ns for worker_slots in slots for ns in worker_slots])
    sampler.start()
    try:
        with ThreadPoolExecutor(STORM_WORKERS) as pool:
            for future in [pool.submit(worker, i) for i in range(STORM_WORKERS)]:
                future.result()
    finally:
        sampler.stop.set()
        sampler.join()
    print("storm: %d workers x %d cycles, %d exhausted ADDs, %d samples"
          % (STORM_WORKERS, STORM_CYCLES, sum(exhausted.values()), sampler.samples))
    assert not claims.problems and not sampler.problems, "workers saw %d duplicates %s; the sampler %d %s" % (
        len(claims.problems), claims.problems[:3], len(sampler.problems), sampler.problems[:3])
    assert sampler.samples > 0
    if STORM_WORKERS * STORM_HOLD > STORM_CAPACITY and STORM_CYCLES >= 20:
        assert sum(exhausted.values()) > 0, "the storm never exhausted the range"
    assert bridge_ports(node) == []
    assert_nothing_left(node, data_dir, [ns for worker_slots in slots for ns in worker_slots], "after the storm:")
    assert masq_table(node)[0] is not None, "the masquerade table should have been made"


# --- 3. concurrent first use --------------------------------------------------------------------

def test_concurrent_first_use(ours_bin, node, make_netns, data_dir):
    """16 ADDs released together on a node with no bridge and no masquerade table yet: one bridge
    with one gateway address, 16 ports, 16 distinct container addresses, one table with its base
    chain written once and one rule per container."""
    config = conf(data_dir)
    containers = [make_netns("ct") for _ in range(16)]
    # Every plugin blocks reading its config until all 16 are started, then all are fed at once.
    procs = [subprocess.Popen([IP, "netns", "exec", node.name, str(ours_bin / "bridge")],
                              env=cni_env("ADD", ours_bin, netns=ns, container_id="first%d" % i),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, ns in enumerate(containers)]
    with ThreadPoolExecutor(len(procs)) as pool:
        outcomes = list(pool.map(lambda p: p.communicate(encode_conf(config), timeout=120), procs))
    for proc, (out, err) in zip(procs, outcomes):
        assert proc.returncode == 0, "exit %d: %s %s" % (proc.returncode, out, err)
    bridges = [name for name, link in node.links().items() if kind(link) == "bridge"]
    assert bridges == [BRIDGE]
    assert global_addrs(node, BRIDGE) == [GATEWAY + "/24"]
    assert len(bridge_ports(node)) == 16
    addresses = [global_addrs(ns, "eth0") for ns in containers]
    assert all(len(a) == 1 for a in addresses), addresses
    assert len(set(a[0] for a in addresses)) == 16, addresses
    assert sorted(reservations(data_dir / NET)) == sorted(a[0].split("/")[0] for a in addresses)
    tables = [e["table"] for e in ruleset(node) if "table" in e and e["table"]["name"] == MASQ_TABLE]
    assert len(tables) == 1, tables
    chains, rules = masq_table(node)
    assert chains == sorted([MASQ_CHAIN, POSTROUTING])
    assert len(rules[POSTROUTING]) == 3, "base chain written more than once: %d rules" % len(rules[POSTROUTING])
    assert masq_comments(node) == sorted(masq_comment("first%d" % i) for i in range(16))


# --- 4. hostile input: the harness, every key with wrong values, fixed payloads, CNI_NETNS ---------
# test_hostile.py generates more of the same with hypothesis, through the same Arena.

# A value of each JSON type, and huge, negative and fractional numbers.
WRONG_VALUES = [True, 10 ** 30, -1, 1.5, "x" * 299 + "\ud800", [1, "a"], {"a": None}]
JSON_TYPES = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"), (dict, "object"))


def json_type(value):
    return next((name for kinds, name in JSON_TYPES if isinstance(value, kinds)), "null")


def wrong_values(path):
    """WRONG_VALUES except a boolean, list or object where hostile_config has one (a number or a
    string of the key's own type stays: huge, negative, fractional, long or odd values are wrong)."""
    right = hostile_config("/unused")
    for key in path:
        try:
            right = right[key]
        except (KeyError, IndexError, TypeError):
            return WRONG_VALUES
    return [value for value in WRONG_VALUES
            if json_type(value) != json_type(right) or json_type(value) in ("number", "string")]


@pytest.mark.slow
@pytest.mark.parametrize("path", KEY_PATHS, ids=lambda path: ".".join(map(str, path)))
def test_every_key_with_wrong_values(arena, path):
    """Each key bridge and host-local read, set to values of every other JSON type (a boolean; a
    huge, a negative and a fractional number; a 300-character string ending in a lone surrogate;
    a list; an object): one clean answer, nothing left."""
    for value in wrong_values(path):
        config = arena.config()
        set_path(config, path, value)
        arena.exercise(json.dumps(confine(config, arena.data_dir)).encode())


def megabyte_string(config):
    config["dns"]["domain"] = "d" * (1 << 20)
    return json.dumps(config).encode()


PAYLOADS = {
    "empty": lambda config: b"",
    "truncated": lambda config: json.dumps(config).encode()[:-7],
    "not-utf8": lambda config: json.dumps(config).encode().replace(b"example.test", b"ex\xff\xfe.test"),
    "lone-surrogate": lambda config: json.dumps(config).encode().replace(b"example.test", b"\\ud800"),
    "nan": lambda config: json.dumps(dict(config, mtu=float("nan"))).encode(),
    "huge-number": lambda config: json.dumps(config).encode().replace(b'"mtu": 1500', b'"mtu": 1' + b"0" * 5000),
    "deep-nesting": lambda config: b"[" * 100000 + b"]" * 100000,
    "deep-object": lambda config: (json.dumps(config).encode()[:-1] + b', "x": '
                                   + b'{"a":' * 50000 + b"1" + b"}" * 50001),
    "megabyte-string": megabyte_string,
    "megabyte-whitespace": lambda config: b" " * (1 << 20) + json.dumps(config).encode(),
    "many-keys": lambda config: json.dumps(dict(config, **{"k%d" % i: i for i in range(100000)})).encode(),
    "duplicate-keys": lambda config: json.dumps(config).encode()[:-1] + b', "name": "other/../x"}',
    "two-objects": lambda config: json.dumps(config).encode() * 2,
    "not-an-object": lambda config: json.dumps([config]).encode(),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_hostile_payloads(arena, payload):
    """Truncated, non-UTF-8, deeply nested, megabyte-sized and otherwise broken stdin."""
    arena.exercise(PAYLOADS[payload](arena.config()))


def test_thousands_of_cni_args(arena):
    """5000 unknown CNI_ARGS pairs are ignored with one bounded note on stderr; a broken pair among
    them is code 4 naming it; neither leaves anything behind."""
    pairs = ";".join("K8S_KEY_%d=value%d" % (i, i) for i in range(5000))
    stdin = json.dumps(arena.config()).encode()
    added = arena.call("ADD", stdin, {"CNI_ARGS": pairs})
    assert ok(added)["ips"] and len(added.stderr) < 2000, explain(added)
    ok(arena.call("DEL", stdin, {"CNI_ARGS": pairs}))
    error = cni_error(arena.call("ADD", stdin, {"CNI_ARGS": pairs + ";brokenpair;IP=10.94.0.50"}))
    assert error["code"] == 4 and "brokenpair" in error["msg"], error
    for args in (pairs, pairs + ";brokenpair"):
        arena.exercise(stdin, {"CNI_ARGS": args})


@pytest.mark.parametrize("target", ["regular-file", "directory", "own-netns-path", "proc-self", "proc-thread-self"])
def test_bad_netns_is_refused_before_anything_changes(ours_bin, node, tmp_path, data_dir, target):
    """CNI_NETNS at a regular file, a directory or the plugin's own namespace: code 8, and no bridge,
    no state directory, no masquerade table appear (test_protocol covers the same without ipMasq)."""
    path = {"regular-file": str(tmp_path / "plain"), "directory": str(tmp_path),
            "own-netns-path": node.path, "proc-self": "/proc/self/ns/net",
            "proc-thread-self": "/proc/thread-self/ns/net"}[target]
    if target == "regular-file":
        (tmp_path / "plain").write_text("")
    links_before = sorted(node.links())
    error = cni_error(bridge(ours_bin, "ADD", conf(data_dir), node, path, "badns"))
    assert error["code"] == 8, error
    assert sorted(node.links()) == links_before
    assert os.listdir(str(data_dir)) == []
    assert masq_table(node) == (None, {})


# --- 5. a broken disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 KiB tmpfs mounted in the test's temp dir, unmounted at teardown."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "cbt-tmpfs", mount_point])
    try:
        yield mount_point
    finally:
        if run(["umount", mount_point], check=False).returncode != 0:
            run(["umount", "-l", mount_point], check=False)


def fill(directory):
    """Write a file in `directory` until its filesystem is full."""
    with open(str(directory / "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == 28, err      # ENOSPC


@pytest.mark.parametrize("state", ["fresh", "existing"])
@pytest.mark.parametrize("breakage", ["read-only", "full"])
def test_broken_disk_fails_cleanly_and_recovers(ours_bin, node, container, small_disk, breakage, state):
    """dataDir read-only or full (before any state, or with the state directory in place): ADD fails
    with code 5 or 11 naming the cause, leaves nothing; once the disk is repaired, ADD works."""
    data_dir = small_disk / "ipam"
    data_dir.mkdir()
    config = conf(data_dir)
    if state == "existing":
        result = ok(bridge(ours_bin, "ADD", config, node, container, "before"))
        ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, container, "before"))
    if breakage == "read-only":
        run(["mount", "-o", "remount,ro", small_disk])
    else:
        fill(small_disk)
    error = cni_error(bridge(ours_bin, "ADD", config, node, container, "broken"))
    assert error["code"] in (5, 11), error
    cause = "read-only file system" if breakage == "read-only" else "no space left on device"
    assert cause in (error["msg"] + " " + error.get("details", "")).lower(), error
    assert ".tmp-" not in error["msg"], "the message must name what failed, not a temp file's cleanup: %s" % error
    assert_nothing_left(node, data_dir, [container], "after the failed ADD:")
    if breakage == "read-only":
        run(["mount", "-o", "remount,rw", small_disk])
    else:
        (small_disk / "filler").unlink()
    result = ok(bridge(ours_bin, "ADD", config, node, container, "repaired"))
    assert global_addrs(container, "eth0") == [result["ips"][0]["address"]]
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, container, "repaired"))
    assert_nothing_left(node, data_dir, [container], "after the last DEL:")


# --- 6. the environment cannot steer us -------------------------------------------------------------

STEERED_MODULES = ("cni_bridge", "json", "struct", "fcntl", "select", "subprocess", "hashlib", "_sha512",
                   "_sha2", "_ctypes", "_json", "_socket", "os", "site", "sitecustomize", "usercustomize",
                   "startup", "hostile_entry")


def steering_environment(hostile, marker):
    """A directory of modules, scripts and programs that append to `marker` when run, and the
    variables that would make Python, shiv or sh run them."""
    hostile.mkdir()
    payload = "open(%r, 'a').write(__name__ + '\\n')\ndef main():\n    pass\n" % str(marker)
    for module in STEERED_MODULES:
        (hostile / (module + ".py")).write_text(payload)
    for program in ("python3", "sh", "nft", "iptables", "ip"):
        (hostile / program).write_text("#!/bin/sh\necho %s >> %s\n" % (program, marker))
        (hostile / program).chmod(0o755)
    (hostile / "env.sh").write_text("echo ENV >> %s\n" % marker)
    return {
        "PYTHONPATH": str(hostile), "PYTHONSTARTUP": str(hostile / "startup.py"), "PYTHONINSPECT": "1",
        "PYTHONHOME": str(hostile), "PYTHONUSERBASE": str(hostile), "PYTHONPLATLIBDIR": str(hostile),
        "PYTHONSAFEPATH": "", "PYTHONWARNINGS": "error", "PYTHONDEVMODE": "1", "PYTHONVERBOSE": "1",
        "PYTHONBREAKPOINT": "hostile_entry.main", "PYTHONEXECUTABLE": str(hostile / "python3"),
        "SHIV_ROOT": str(hostile / "shiv"), "SHIV_FORCE_EXTRACT": "1", "SHIV_INTERPRETER": "1",
        "SHIV_ENTRY_POINT": "hostile_entry:main", "SHIV_CONSOLE_SCRIPT": "hostile_entry",
        "SHIV_PREPEND_PYTHONPATH": "1", "SHIV_EXTEND_PYTHONPATH": str(hostile),
        "PATH": "%s:%s" % (hostile, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")),
        "ENV": str(hostile / "env.sh"), "BASH_ENV": str(hostile / "env.sh"),
    }


def test_environment_cannot_steer_a_bridge_add(ours_bin, node, container, data_dir, tmp_path):
    """PYTHON*, SHIV_*, PATH, ENV/BASH_ENV and a hostile working directory: the ipMasq ADD, CHECK and
    DEL work as without them and no planted module, script or program runs (test_zipapp does the
    same for loopback)."""
    marker = tmp_path / "steered"
    env = steering_environment(tmp_path / "hostile", marker)
    config = conf(data_dir)
    argv = [IP, "netns", "exec", node.name, str(ours_bin / "bridge")]

    def call(command, config):
        proc = subprocess.run(argv, input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=str(tmp_path / "hostile"), timeout=60,
                              env=cni_env(command, ours_bin, netns=container, container_id="steered", env=env))
        return parse_output(proc)

    result = ok(call("ADD", config))
    assert global_addrs(container, "eth0") == [result["ips"][0]["address"]]
    assert masq_comments(node) == [masq_comment("steered")]
    ok(call("CHECK", dict(config, prevResult=result)))
    ok(call("DEL", dict(config, prevResult=result)))
    assert not marker.exists(), marker.read_text()
    assert_nothing_left(node, data_dir, [container])


def test_executes_nothing_but_itself(ours_bin, node, container, data_dir, tmp_path):
    """Under `strace -f -e trace=execve,execveat`, ADD, CHECK and DEL with ipMasq (nftables) execute
    only the plugin file and the interpreter of its own preamble, in one process (no nft, no ip,
    no iptables, no host-local)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    archive = (ours_bin / "bridge").resolve()
    head = archive.read_bytes()[:8192].splitlines()     # the preamble's "exec /usr/bin/python3 -E -s -S ..."
    interpreter = [line.split()[1] for line in head if line.startswith(b"exec ") and b"python" in line][0].decode()
    config = conf(data_dir, version="1.1.0")
    result = None
    for command in ("ADD", "CHECK", "DEL"):
        trace = tmp_path / ("%s.trace" % command)
        stdin = config if result is None else dict(config, prevResult=result)
        proc = subprocess.run([IP, "netns", "exec", node.name, strace, "-f", "-qq", "-e", "trace=execve,execveat",
                               "-o", str(trace), str(ours_bin / "bridge")],
                              input=encode_conf(stdin), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=cni_env(command, ours_bin, netns=container, container_id="traced"))
        res = parse_output(proc)
        output = ok(res)
        result = result or output
        calls = [line for line in trace.read_text().splitlines() if "execve" in line]
        programs = [line.split('("', 1)[1].split('"', 1)[0] for line in calls]
        pids = set(line.split()[0] for line in calls)
        assert programs == [str(ours_bin / "bridge"), interpreter], "%s executed %s" % (command, calls)
        assert len(pids) == 1, "%s started other processes: %s" % (command, calls)
    assert_nothing_left(node, data_dir, [container])


# --- 7. stale state is recoverable ----------------------------------------------------------------------

def test_gc_recovers_containers_that_vanished_without_del(ours_bin, node, make_netns, data_dir):
    """Containers whose namespace disappeared without a DEL fill the range and block new ones; GC
    (1.1.0) listing only the live attachments releases their reservations and rules, keeps the live
    ones working, and new containers get addresses again."""
    config = conf(data_dir, version="1.1.0", rangeStart="10.92.0.10", rangeEnd="10.92.0.15")   # 6 addresses
    live = {"live%d" % i: make_netns("ct") for i in range(2)}
    live_results = {cid: ok(bridge(ours_bin, "ADD", config, node, ns, cid)) for cid, ns in live.items()}
    for i in range(4):
        vanishing = make_netns("ct")
        ok(bridge(ours_bin, "ADD", config, node, vanishing, "vanished%d" % i))
        run([IP, "netns", "del", vanishing.name])          # a node crash: no DEL ever comes
    newcomer = make_netns("ct")
    error = cni_error(bridge(ours_bin, "ADD", config, node, newcomer, "newcomer"))
    assert error["code"] == 11 and "no IP addresses available" in error["msg"], error
    assert len(masq_comments(node)) == 6

    valid = [{"containerID": cid, "ifname": "eth0"} for cid in live]
    ok(bridge(ours_bin, "GC", dict(config, **{"cni.dev/valid-attachments": valid}), node, None, None, ifname=None))
    assert reservations(data_dir / NET) == {address_of(r): "%s\r\neth0" % cid for cid, r in live_results.items()}
    assert masq_comments(node) == sorted(masq_comment(cid) for cid in live)
    for cid, ns in live.items():
        assert global_addrs(ns, "eth0") == [live_results[cid]["ips"][0]["address"]]
        assert ns.run("ping", "-c1", "-W2", GATEWAY, check=False).returncode == 0, "%s lost its network" % cid
    assert len(bridge_ports(node)) == 2

    result = ok(bridge(ours_bin, "ADD", config, node, newcomer, "newcomer"))
    assert global_addrs(newcomer, "eth0") == [result["ips"][0]["address"]]
    for cid, ns in list(live.items()) + [("newcomer", newcomer)]:
        ok(bridge(ours_bin, "DEL", config, node, ns, cid))
    assert_nothing_left(node, data_dir, list(live.values()) + [newcomer])


# --- 8. time-bounded ------------------------------------------------------------------------------------

# Holds an exclusive flock on argv[1] until its stdin closes; says "locked" once it holds it.
HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
"""


def lock_timeout():
    """The module's LOCK_TIMEOUT (seconds), read from the source under test."""
    import cni_bridge
    return cni_bridge.LOCK_TIMEOUT


@pytest.mark.slow
def test_held_lock_makes_add_and_del_give_up_with_code_11(ours_bin, node, make_netns, data_dir):
    """Another process holding <dataDir>/<net>/lock: an ADD and a DEL running meanwhile both return
    (within the lock timeout, loosely bounded) with code 11; the ADD leaves no veth, eth0,
    reservation or rule.  Once the lock is released, ADD works and the DEL repeated succeeds."""
    config = conf(data_dir)
    existing, fresh = make_netns("ct"), make_netns("ct")
    existing_result = ok(bridge(ours_bin, "ADD", config, node, existing, "existing"))
    bound = lock_timeout() + 30
    holder = subprocess.Popen([sys.executable, "-I", "-c", HOLD_LOCK, str(data_dir / NET / "lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        del_conf = dict(config, prevResult=existing_result)
        with ThreadPoolExecutor(2) as pool:
            adding = pool.submit(bridge, ours_bin, "ADD", config, node, fresh, "fresh", timeout=bound)
            deleting = pool.submit(bridge, ours_bin, "DEL", del_conf, node, existing, "existing", timeout=bound)
            added, deleted = adding.result(), deleting.result()
        for res in (added, deleted):
            error = cni_error(res)
            assert error["code"] == 11 and "lock" in error["msg"], error
        assert sorted(fresh.links()) == ["lo"]
        assert list(reservations(data_dir / NET).values()) == ["existing\r\neth0"]
        assert masq_comments(node) in ([masq_comment("existing")], [])
        assert len(host_veths(node)) <= 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    result = ok(bridge(ours_bin, "ADD", config, node, fresh, "fresh"))
    assert global_addrs(fresh, "eth0") == [result["ips"][0]["address"]]
    ok(bridge(ours_bin, "DEL", del_conf, node, existing, "existing"))
    ok(bridge(ours_bin, "DEL", dict(config, prevResult=result), node, fresh, "fresh"))
    assert_nothing_left(node, data_dir, [existing, fresh])


# --- file modes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", ["000", "022", "077"])
def test_state_modes(ours_bin, node, container, data_dir, umask):
    """Under the runtime's umask 000, 022 or 077, the directories the plugin makes are 0755 and its files
    (lock, reservations, last_reserved_ip) 0644: nothing is world-writable."""
    nested = data_dir / "made" / "by" / "plugin"
    config = conf(nested)
    argv = [IP, "netns", "exec", node.name, "sh", "-c", 'umask %s && exec "$0"' % umask, str(ours_bin / "bridge")]
    proc = subprocess.run(argv, input=encode_conf(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, env=cni_env("ADD", ours_bin, netns=container, container_id="modes"))
    result = ok(parse_output(proc))
    modes = {str(p.relative_to(data_dir)): p.stat().st_mode & 0o7777 for p in data_dir.rglob("*")}
    assert sorted(modes) == ["made", "made/by", "made/by/plugin", "made/by/plugin/" + NET,
                             "made/by/plugin/%s/%s" % (NET, address_of(result)), "made/by/plugin/%s/boot_id" % NET,
                             "made/by/plugin/%s/last_reserved_ip.0" % NET, "made/by/plugin/%s/lock" % NET]
    expected = {path: 0o755 if (data_dir / path).is_dir() else 0o644 for path in modes}
    assert {p: oct(m) for p, m in modes.items()} == {p: oct(m) for p, m in expected.items()}
