"""The promises of README.md's "Promises" and "Security" sections, each proved against the kernel
and the state directory: crashes at random instants, a storm of concurrent containers on a small
range, hostile input, a broken disk, a steering environment, stale state, a held lock.

Counts scale with CNI_BRIDGE_CRASH_RUNS, CNI_BRIDGE_STORM_CYCLES and CNI_BRIDGE_HOSTILE_EXAMPLES.
"""
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import IP, cni_env, encode_conf, run, run_cni

NET = "relnet"
CRASH_RUNS = int(os.environ.get("CNI_BRIDGE_CRASH_RUNS", "100"))
STORM_CYCLES = int(os.environ.get("CNI_BRIDGE_STORM_CYCLES", "50"))
HOSTILE_EXAMPLES = int(os.environ.get("CNI_BRIDGE_HOSTILE_EXAMPLES", "60"))


def conf(data_dir, subnet="10.77.0.0/24", **ipam):
    return {"cniVersion": "1.1.0", "name": NET, "type": "bridge", "bridge": "cbt-rel0", "isGateway": True,
            "ipMasq": True, "ipam": dict({"type": "host-local", "subnet": subnet, "dataDir": str(data_dir)}, **ipam)}


def reservations(data_dir):
    """{file name: content} of the reservation files of the network."""
    directory = data_dir / NET
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir()
            if p.name != "lock" and not p.name.startswith("last_reserved_ip.")}


def host_veths(node):
    return [name for name in node.links() if name.startswith("veth")]


def masq_comments(node):
    rules = json.loads(node.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [e["rule"].get("comment", "") for e in rules
            if "rule" in e and e["rule"]["table"] == "cni_plugins_masquerade" and e["rule"]["chain"] == "masq_checks"]


def assert_clean(node, data_dir, *containers):
    assert reservations(data_dir) == {}
    assert host_veths(node) == []
    assert masq_comments(node) == []
    for ns in containers:
        assert "eth0" not in ns.links()


def spawn(ours_bin, command, config, node, netns, cid):
    """Start the plugin inside the node (ip netns exec execs it: the pid is the plugin's)."""
    proc = subprocess.Popen([IP, "netns", "exec", node.name, str(ours_bin / "bridge")],
                            env=cni_env(command, ours_bin, netns=netns, container_id=cid),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(encode_conf(config))
    proc.stdin.close()
    return proc


def one_call_ms(ours_bin, config, node, make_netns):
    ns = make_netns("ct")
    start = time.time()
    assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=ns, container_id="probe").returncode == 0
    elapsed = time.time() - start
    assert run_cni(ours_bin, "bridge", "DEL", config, node=node, netns=ns, container_id="probe").returncode == 0
    return elapsed


@pytest.mark.parametrize("killed", ["ADD", "DEL"])
def test_a_crash_at_any_instant_leaks_nothing(ours_bin, node, make_netns, data_dir, killed):
    """SIGKILL at a random instant, then the runtime's DEL (repeated DEL for a killed DEL): no
    reservation, veth, address or rule is left, and the next ADD works (no stale lock)."""
    config = conf(data_dir)
    duration = one_call_ms(ours_bin, config, node, make_netns)
    seed = random.randrange(1 << 30)
    print("crash seed", seed)
    rng = random.Random(seed)
    container = make_netns("ct")
    for i in range(CRASH_RUNS):
        cid = "crash%d" % i
        if killed == "DEL":
            assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container,
                           container_id=cid).returncode == 0
        proc = spawn(ours_bin, killed, config, node, container, cid)
        time.sleep(rng.uniform(0, 1.2 * duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        res = run_cni(ours_bin, "bridge", "DEL", config, node=node, netns=container, container_id=cid)
        assert res.returncode == 0, "run %d (seed %d): %s %s" % (i, seed, res.stdout, res.stderr)
        assert_clean(node, data_dir, container)
    assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container,
                   container_id="after").returncode == 0


def test_storm_never_shares_an_address_and_ends_clean(ours_bin, node, make_netns, data_dir):
    """8 workers x STORM_CYCLES ADD/DEL cycles, up to 5 containers each, on 32 addresses:
    exhaustion is a clean error, no address is ever held twice, and everything goes away."""
    config = conf(data_dir, subnet="10.78.0.0/24", rangeStart="10.78.0.10", rangeEnd="10.78.0.41")
    held, lock, problems = {}, threading.Lock(), []
    exhausted = [0]

    def worker(w):
        rng = random.Random(w)
        slots = [make_netns("st") for _ in range(5)]
        live = {}
        for cycle in range(STORM_CYCLES):
            free = [s for s in range(5) if s not in live]
            if free and (rng.random() < 0.8 or not live):
                slot = rng.choice(free)
                cid = "w%dc%d" % (w, cycle)
                res = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=slots[slot], container_id=cid)
                if res.returncode == 0:
                    address = res.json["ips"][0]["address"]
                    with lock:
                        if address in held:
                            problems.append("%s given to %s while %s holds it" % (address, cid, held[address]))
                        held[address] = cid
                    live[slot] = (cid, address)
                elif isinstance(res.json, dict) and isinstance(res.json.get("code"), int) and \
                        "no IP addresses available" in res.json.get("msg", ""):
                    exhausted[0] += 1
                else:
                    problems.append("ADD %s: %s %s" % (cid, res.stdout, res.stderr))
            else:
                slot = rng.choice(list(live))
                cid, address = live.pop(slot)
                with lock:
                    held.pop(address, None)
                res = run_cni(ours_bin, "bridge", "DEL", config, node=node, netns=slots[slot], container_id=cid)
                if res.returncode != 0:
                    problems.append("DEL %s: %s" % (cid, res.stdout))
        for slot, (cid, address) in live.items():
            with lock:
                held.pop(address, None)
            run_cni(ours_bin, "bridge", "DEL", config, node=node, netns=slots[slot], container_id=cid)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert problems == []
    assert exhausted[0] > 0, "the storm never exhausted the range"
    assert_clean(node, data_dir)
    bridge_ports = [l for l in node.links().values() if l.get("master") == "cbt-rel0"]
    assert bridge_ports == []


def hostile_text():
    from hypothesis import strategies as st
    return st.one_of(st.text(max_size=300), st.sampled_from([
        "a/b", "..", "../..", "-x", "x" * 300, "a\nb", "a\x00b", "\u2603", " ", "eth0:1", "ab;c=d"]))


def json_values():
    from hypothesis import strategies as st
    return st.recursive(st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                                  st.floats(allow_nan=False, allow_infinity=False), hostile_text()),
                        lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_text(), children, max_size=4),
                        max_leaves=10)


CONFIG_PATHS = [("bridge",), ("isGateway",), ("ipMasq",), ("mtu",), ("vlan",), ("vlanTrunk",), ("hairpinMode",),
                ("ipMasqBackend",), ("dns",), ("prevResult",), ("runtimeConfig",), ("runtimeConfig", "mac"),
                ("runtimeConfig", "ips"), ("runtimeConfig", "ipRanges"), ("args",), ("args", "cni", "ips"),
                ("ipam",), ("ipam", "subnet"), ("ipam", "ranges"), ("ipam", "routes"), ("ipam", "dataDir"),
                ("ipam", "rangeStart"), ("ipam", "gateway"), ("ipam", "resolvConf"), ("name",), ("cniVersion",)]


def assert_one_cni_answer(res):
    assert "Traceback" not in res.stdout and "Traceback" not in res.stderr, res.stderr
    if res.returncode == 0:
        assert res.json is None or isinstance(res.json, dict)
        return
    assert isinstance(res.json, dict), res.stdout
    assert res.stdout.count("\n") == 1
    assert isinstance(res.json.get("code"), int) and isinstance(res.json.get("msg"), str)


def test_hostile_input_never_harms_the_node(ours_bin, node, make_netns, tmp_path):
    """Generated configs and env values: one CNI answer, no traceback, nothing written outside the
    network's state directory, no veth left after the following DEL."""
    hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed (pip install hypothesis)")
    from hypothesis import given, settings, HealthCheck, strategies as st
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    data_dir = sandbox / "ipam"
    container = make_netns("ct")

    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(CONFIG_PATHS), value=json_values(), cid=st.one_of(st.just("ctr1"), hostile_text()),
           ifname=st.one_of(st.just("eth0"), hostile_text()), args=st.one_of(st.just(""), hostile_text()))
    def case(path, value, cid, ifname, args):
        config = conf(data_dir)
        target = config
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = value
        kwargs = dict(node=node, netns=container, container_id=cid.replace("\x00", ""),
                      ifname=ifname.replace("\x00", ""), cni_args=args.replace("\x00", ""))
        assert_one_cni_answer(run_cni(ours_bin, "bridge", "ADD", config, **kwargs))
        assert_one_cni_answer(run_cni(ours_bin, "bridge", "DEL", config, **kwargs))
        assert host_veths(node) == []
        outside = [str(p) for p in sandbox.rglob("*") if not str(p).startswith(str(data_dir))]
        assert outside == []

    case()


@pytest.mark.parametrize("payload", [b"{" * 100000, b'{"name": "n", "x": "' + b"a" * (1 << 20) + b'"}',
                                     b"\xff\xfe not utf-8", b'{"name": "n", "cniVersion": "1.0.0"'],
                         ids=["deep", "megabyte", "not-utf8", "truncated"])
def test_hostile_payloads(ours_bin, node, container, payload):
    res = run_cni(ours_bin, "bridge", "ADD", payload, node=node, netns=container)
    assert_one_cni_answer(res)
    assert res.returncode == 1


def test_thousands_of_cni_args(ours_bin, node, container, data_dir):
    args = ";".join("K%d=v" % i for i in range(5000))
    res = run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=container, cni_args=args)
    assert res.returncode == 0, res.stdout
    assert len(res.stderr) < 1000            # one note, not five thousand
    res = run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=container,
                  container_id="c2", cni_args=args + ";broken")
    assert res.json["code"] == 4 and "broken" in res.json["msg"]


@pytest.mark.parametrize("kind", ["file", "directory", "own"])
def test_a_bad_netns_is_refused_before_anything_changes(ours_bin, node, tmp_path, data_dir, kind):
    target = {"file": tmp_path / "plain", "directory": tmp_path, "own": "/proc/self/ns/net"}[kind]
    if kind == "file":
        target.write_text("")
    res = run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=str(target))
    assert res.returncode == 1 and res.json["code"] == 8
    assert "cbt-rel0" not in node.links()
    assert reservations(data_dir) == {}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs, unmounted at teardown."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", mount_point])
    yield mount_point
    run(["umount", "-l", mount_point], check=False)


@pytest.mark.parametrize("breakage", ["read-only", "full"])
def test_a_broken_disk_fails_cleanly_and_recovers(ours_bin, node, container, small_tmpfs, breakage):
    data_dir = small_tmpfs / "ipam"
    config = conf(data_dir)
    if breakage == "read-only":
        run(["mount", "-o", "remount,ro", small_tmpfs])
    else:
        filler = small_tmpfs / "filler"
        subprocess.run(["dd", "if=/dev/zero", "of=%s" % filler, "bs=4k", "count=64"], stderr=subprocess.DEVNULL)
    res = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container)
    assert res.returncode == 1 and res.json["code"] in (5, 11), res.stdout
    assert host_veths(node) == [] and "eth0" not in container.links()
    if breakage == "read-only":
        run(["mount", "-o", "remount,rw", small_tmpfs])
    else:
        (small_tmpfs / "filler").unlink()
    res = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=container)
    assert res.returncode == 0, res.stdout


def test_the_environment_cannot_steer_the_plugin(ours_bin, node, container, data_dir, tmp_path):
    """PYTHONPATH, PYTHONSTARTUP, PYTHONINSPECT and SHIV_* change nothing; only the plugin's own
    interpreter is executed (no ip, nft or iptables)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "marker"
    for name in ("cni_bridge.py", "os.py", "struct.py", "sitecustomize.py", "startup.py"):
        (evil / name).write_text("open(%r, 'w').write('owned')\n" % str(marker))
    env = {"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "startup.py"), "PYTHONINSPECT": "1",
           "PYTHONHOME": str(evil), "SHIV_ROOT": str(evil), "SHIV_ENTRY_POINT": "os:system"}
    trace = tmp_path / "exec.trace"
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    proc = subprocess.run([IP, "netns", "exec", node.name, strace, "-f", "-qq", "-e", "trace=execve", "-o", str(trace),
                           str(ours_bin / "bridge")], env=cni_env("ADD", ours_bin, netns=container, env=env),
                          input=encode_conf(conf(data_dir)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stdout
    assert not marker.exists()
    programs = set(line.split('execve("', 1)[1].split('"', 1)[0] for line in trace.read_text().splitlines()
                   if 'execve("' in line and "= 0" in line)
    assert programs <= {str(ours_bin / "bridge"), "/usr/bin/python3"}, programs


def test_stale_state_is_recovered_by_gc(ours_bin, node, make_netns, data_dir):
    """Containers that vanished without DEL fill the range; GC with the live attachments frees it."""
    config = conf(data_dir, subnet="10.79.0.0/29")
    live = make_netns("ct")
    assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=live, container_id="live").returncode == 0
    for i in range(4):
        ns = make_netns("ct")
        assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=ns, container_id="gone%d" % i).returncode == 0
        run(["ip", "netns", "del", ns.name])
    blocked = run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=make_netns("ct"), container_id="new")
    assert blocked.returncode == 1 and "no IP addresses available" in blocked.json["msg"]
    gc = dict(config, **{"cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}]})
    res = run_cni(ours_bin, "bridge", "GC", gc, node=node, netns=None, container_id=None, ifname=None)
    assert res.returncode == 0, res.stdout
    assert [c.decode() for c in reservations(data_dir).values()] == ["live\r\neth0"]
    assert len(masq_comments(node)) == 1
    assert run_cni(ours_bin, "bridge", "ADD", config, node=node, netns=make_netns("ct"), container_id="new").returncode == 0


def test_a_held_lock_times_out_with_code_11(ours_bin, node, container, data_dir):
    """Another process holding the network's lock: ADD gives up with code 11 and leaves nothing."""
    (data_dir / NET).mkdir(parents=True)
    with open(str(data_dir / NET / "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=container, timeout=60)
        assert res.returncode == 1 and res.json["code"] == 11 and "lock" in res.json["msg"]
        assert host_veths(node) == [] and "eth0" not in container.links()
    assert run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=container).returncode == 0


def test_state_files_have_explicit_modes(ours_bin, node, container, data_dir):
    old = os.umask(0)
    try:
        assert run_cni(ours_bin, "bridge", "ADD", conf(data_dir), node=node, netns=container).returncode == 0
    finally:
        os.umask(old)
    directory = data_dir / NET
    assert directory.stat().st_mode & 0o777 == 0o755
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path
