"""`dtrain launch --ft` on several nodes (issue #36). The real one: two hosts made on this machine with Linux
namespaces, each with its own network (a veth pair between them, 10.77.0.1 and 10.77.0.2, loopback up, a
default route to the other), hostname (n1, n2) and /etc/hosts (its own name on 127.0.1.1 as Debian writes it,
the other's address), so that a replica group reaches the other node only by what it advertises; one launcher
a host, one replica group of 2 processes (DDP inside) a host, n1 hosting the Lighthouse. Needs root, `ip` and
`unshare`; skipped where the machine can't make the namespaces. Before it, what needs no namespace: two
launchers on one host, and a hostname that does not resolve."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _env, free_port, wait_for
from test_ft_launch import FAKE
from test_ft_train import ARGS, GROUP, STEPS, digits_train_keys, key_log, needs_torchft, records

from dtrain.dist import LaunchError
from dtrain.dist.network import reachable

HOSTS = {"n1": "10.77.0.1", "n2": "10.77.0.2"}
LIGHTHOUSE_PORT = 29510  # a fresh network namespace: nothing else listens there


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts():
    """{hostname: the network namespace that is that host}; every namespace, link and hosts file removed at
    the end (a namespace's veth end goes with it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces")
    if not (shutil.which("ip") and shutil.which("unshare")):
        pytest.skip("needs `ip` (iproute2) and `unshare` (util-linux) to make two hosts")
    tag = f"dtft{os.getpid() % 100000}"
    spaces = {name: f"{tag}{name}" for name in HOSTS}
    made: list[str] = []
    try:
        for ns in spaces.values():
            _ip("netns", "add", ns)
            made.append(ns)
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
        for host, ns in spaces.items():  # as Debian writes it: its own name on 127.0.1.1, the other's from DNS
            lines = ["127.0.0.1 localhost", *(f"{addr if n != host else '127.0.1.1'} {n}" for n, addr in HOSTS.items())]
            (Path("/etc/netns") / ns / "hosts").write_text("\n".join(lines) + "\n")
        (a, ns_a), (b, ns_b) = spaces.items()
        _ip("link", "add", f"{tag}a", "netns", ns_a, "type", "veth", "peer", "name", f"{tag}b", "netns", ns_b)
        for name, ns, dev in ((a, ns_a, f"{tag}a"), (b, ns_b, f"{tag}b")):
            _ip("-n", ns, "addr", "add", f"{HOSTS[name]}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "dev", dev)  # a node's usual default route: to the other
        subprocess.run(
            ["ip", "netns", "exec", ns_a, "unshare", "--uts", "sh", "-c", "hostname n1 && hostname"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        _remove(made)
        detail = getattr(e, "stderr", None) or str(e)
        pytest.skip(f"can't make two hosts with namespaces here: {str(detail).strip()}")
    yield spaces
    _remove(made)


def _remove(spaces: list[str]) -> None:
    for ns in spaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    with contextlib.suppress(OSError):  # ours, unless another's namespaces are in it
        Path("/etc/netns").rmdir()


def launch_on(ns: str, host: str, cwd: Path, data_root: Path, *options: str, args=ARGS, **env: str):
    """`dtrain launch --ft --nnodes 2 --nproc-per-node 2 --ft-lighthouse n1:PORT OPTIONS tests/ft_group.py ARGS`
    as host `host` (network namespace `ns`, a UTS namespace of its own named `host`), its output to
    cwd/HOST.out and cwd/HOST.err."""
    cmd = [
        sys.executable,
        "-m",
        "dtrain",
        "launch",
        "--ft",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--ft-lighthouse",
        f"n1:{LIGHTHOUSE_PORT}",
        "--ft-timeout",
        "5",
        *options,
        str(GROUP),
        *args,
        f"data.root={data_root}",
    ]
    path = os.pathsep.join([str(GROUP.parent), str(GROUP.parent.parent)])
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd],
        cwd=cwd,
        env=_env({"FT_OUT": str(cwd), "PYTHONPATH": path, **env}),
        stdin=subprocess.DEVNULL,
        stdout=(cwd / f"{host}.out").open("a"),
        stderr=(cwd / f"{host}.err").open("a"),
    )


def test_a_hostname_that_does_not_resolve_is_one_line(monkeypatch):
    """The other nodes reach this node's groups by its hostname (torchft advertises it): one that does not
    resolve is said before any group starts."""

    def unknown(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "gethostname", lambda: "nowhere")
    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(LaunchError, match=r"^launch: --ft on several nodes needs this node's hostname 'nowhere' to "):
        reachable("10.77.0.1")


@pytest.mark.multiproc
@needs_torchft
def test_two_launchers_on_one_host_name_their_groups_apart_and_advertise_the_hostname(tmp_path):
    """Two `dtrain launch --ft --nnodes 2` on this host (tests/ft_fake_worker.py: no torch), one hosting the
    Lighthouse, in one run directory: their groups are <host>-0 and <host>-1 (both were <host>-0, and wrote
    the same log), and each group's store address is the hostname, not 127.0.0.1."""
    port, host = str(free_port()), socket.gethostname()
    (tmp_path / "o").mkdir()
    procs = [
        subprocess.Popen(
            [
                *[sys.executable, "-m", "dtrain", "launch", "--ft", "--nnodes", "2", "--nproc-per-node", "1"],
                *["--ft-lighthouse", f"127.0.0.1:{port}", *hosting],
                *[str(FAKE), "--out", "o", "run.name=fake"],
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"err{i}.txt").open("w"),
            stdin=subprocess.DEVNULL,
        )
        for i, hosting in enumerate([["--ft-host-lighthouse"], []])
    ]
    try:
        envs = wait_for(lambda: len(found := list((tmp_path / "o").glob("env-*.json"))) == 2 and found, timeout=60)
        envs = sorted((json.loads(p.read_text())["env"] for p in envs), key=lambda e: e["REPLICA_GROUP_ID"])
        assert [e["REPLICA_GROUP_ID"] for e in envs] == [f"{host}-0", f"{host}-1"]
        assert {e["MASTER_ADDR"] for e in envs} == {host}
        for e in envs:
            (tmp_path / "o" / f"done-{e['REPLICA_GROUP_ID']}").touch()
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], [(tmp_path / f"err{i}.txt").read_text() for i in range(2)]
    logs = sorted(p.name for p in (tmp_path / "runs" / "fake" / "logs").glob("group-*.log"))
    assert logs == [f"group-{host}-0.log", f"group-{host}-1.log"]


@pytest.mark.multiproc
@pytest.mark.slow
@needs_torchft
def test_two_hosts_train_in_one_quorum_and_a_restarted_group_heals_across_them(two_hosts, tmp_path, data_root):
    """n1 (--ft-host-lighthouse) and n2, each `dtrain launch --ft --nnodes 2 --nproc-per-node 2
    --max-restarts 1 --ft-min-replicas 2`: group n1-0 and group n2-0 of 2 processes each, in one quorum from
    the first step (min 2). Rank 1 of n2-0 is SIGKILLed in its 4th step: n2's launcher restarts its group,
    which heals from n1-0 over the veth (n1-0 waits for it: min 2). Both launchers exit 0, n2's with one
    fault line; every step was trained by both groups, each sample once over the 4 processes' key logs, the
    same weights in every process at every step and at the end."""
    KILL_IN = 4
    args = [a for a in ARGS if not a.startswith(("data.batch_size", "checkpoint.every"))]
    args += ["data.batch_size=32", "checkpoint.every=100", "data.in_memory=true"]
    common = ("--max-restarts", "1", "--ft-min-replicas", "2")
    kill = {"FT_KILL_GROUP": "n2-0", "FT_KILL_RANK": "1", "FT_KILL_IN_STEP": str(KILL_IN)}
    # ft_group's replacement waits for the others to hold after step FT_REJOIN_AFTER: here they need not (with
    # min 2 they wait for it in the quorum), so a hold at step 1 on a file that is there by then
    kill.update(FT_REJOIN_AFTER="1", FT_HOLDS="1=gn1-0.up")
    n1 = launch_on(two_hosts["n1"], "n1", tmp_path, data_root, "--ft-host-lighthouse", *common, args=args, **kill)
    n2 = launch_on(two_hosts["n2"], "n2", tmp_path, data_root, *common, args=args, **kill)
    codes = {}
    try:
        for host, p in (("n2", n2), ("n1", n1)):
            with contextlib.suppress(subprocess.TimeoutExpired):  # then the logs say where it hung
                codes[host] = p.wait(timeout=180)
    finally:
        for p in (n1, n2):
            if p.poll() is None:
                p.kill()
                p.wait()
    said = {host: (tmp_path / f"{host}.err").read_text() for host in ("n1", "n2")}
    logs = "".join(
        f"\n== {f.name}\n{f.read_text()[-2500:]}" for f in sorted((tmp_path / "runs" / "ft" / "logs").glob("*.log"))
    )
    assert codes == {"n1": 0, "n2": 0}, f"{codes}\n{said}{logs}"
    assert said["n1"].startswith("launch: --ft, 1 replica group(s) of 2 processes on this node, nodes=2"), said
    faults = re.findall(r"^ft: group .* died .*$", said["n1"] + said["n2"], re.M)
    assert len(faults) == 1 and re.match(r"ft: group n2-0 died \(SIGKILL\) at step ~\d+; restarting it", faults[0])
    run_dir = tmp_path / "runs" / "ft"
    assert "healed from a live peer at step" in (run_dir / "logs" / "group-n2-0.log").read_text()
    groups = {g: records(tmp_path, g) for g in ("n1-0", "n2-0")}
    # n2-0: the first attempt's 2 processes, then the replacement's 2; n1-0's 2 processes untouched
    assert len({r["pid"] for r in groups["n1-0"]}) == 2
    starts = [r["pid"] for r in groups["n2-0"] if "start" in r]
    assert len(starts) == len(set(starts)) == 4, starts
    by_step: dict[int, set] = {}
    for g in groups.values():
        for r in g:
            if "step" in r:
                by_step.setdefault(r["step"], set()).add(r["weights"])
    assert sorted(by_step) == list(range(1, STEPS + 1)) and all(len(h) == 1 for h in by_step.values()), by_step
    finals = [torch.load(f, weights_only=True) for f in sorted(tmp_path.glob("g*-*.pt"))]
    assert len(finals) == 4 and all(torch.equal(finals[0][k], f[k]) for f in finals[1:] for k in f)
    # each sample once over the 4 processes; both groups in every step (min 2): 16 samples a process a step
    keys = {(g, r): key_log(run_dir, f"{g}-rank-{r}") for g in ("n1-0", "n2-0") for r in range(2)}
    seen = [k for s in range(1, STEPS + 1) for gr in keys for k in keys[gr].get(s, [])]
    assert len(seen) == len(set(seen)) == STEPS * 64 and set(seen) <= digits_train_keys(data_root)
    assert all(sorted(k) == list(range(1, STEPS + 1)) for k in keys.values())
    assert all(len(keys[gr][s]) == 16 for gr in keys for s in keys[gr])
