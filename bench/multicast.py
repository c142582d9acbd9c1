"""``python -m bench.multicast`` (also ``python -m bench multicast``): one stream to
many against one deploy over HTTP.

A LAN of network namespaces (tests/mcastlab.py: a switch, a sender, four
receivers, 198.18.43.0/24); every computer is a real ``dsagent run-task``
inside its namespace, as in tests/test_multicast.py. The image: an ext4 disk
of 1 GiB (256 MiB with ``--quick``), a quarter random files and a quarter
compressible ones (bench/imaging.py's contents), captured into a folder store
that ``dsagent-server serve --image-store`` serves from the sender's
namespace.

Measured, each as the wall time from starting the computers' ``run-task``
processes until the last one ended (process starts included on both sides,
page cache warm after an untimed round):

1. **unicast**: one receiver's DeployImage from that HTTP store;
2. **multicast to 4**: four receivers' DeployImage ``multicast=true`` (the
   index from the HTTP store), then the sender's DeployImage ``targets`` (the
   folder store) — on jumbo frames (MTU 9000: 8 KiB datagrams), then on
   MTU 1500 (udpcast's 1456-byte datagrams);
3. for context: multicast to 1, and unicast to 4 at once.

The goal is multicast to 4 ≤ 1.3× unicast to 1. All computers share this
machine's cores: the CPU time of every process of a round (user + system,
``RUSAGE_CHILDREN``) over the core count is a floor under the wall time here,
where a real LAN gives each receiver its own CPU. Needs root, iproute2,
udpcast, e2fsprogs.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import imaging as imaging_bench
from bench.report import (Conditions, Row, machine_lines, run_standalone, standalone_options,
                          table)
from handlers.imaging import udpcast
from handlers.imaging.capture import capture
from handlers.imaging.multicast import HELLO_MS, RCVBUF
from handlers.imaging.store import ImageStore
from tests import mcastlab

HEADING = "## Multicast"
MiB = 1 << 20
SEED = 20261216
RATIO_GOAL = 1.3
RECEIVERS = ("rxa", "rxb", "rxc", "rxd")
GIGABIT = "1gbit"
UNI1, UNI4 = "unicast to 1", "unicast to 4 at once"
MC4, MC1, MC4_1500 = "multicast to 4", "multicast to 1", "multicast to 4, MTU 1500"
GET1, UDP4 = "curl of data.zst to 1", "udpcast of data.zst to 4"
LAN_UNI1, LAN_MC4, LAN_UNI4, LAN_GET1, LAN_UDP4 = (
    f"{label}, 1 Gbit/s links" for label in (UNI1, MC4, UNI4, GET1, UDP4))
TOOLS = {"ip": "iproute2", "tc": "iproute2", "udp-sender": "udpcast",
         "udp-receiver": "udpcast", "mkfs.ext4": "e2fsprogs", "curl": "curl"}


class Unavailable(RuntimeError):
    """This machine cannot run the bench (the message says what to install)."""


def say(message: str) -> None:
    print(f"[bench.multicast {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr,
          flush=True)


def check() -> None:
    if os.geteuid() != 0:
        raise Unavailable("the multicast bench needs root (network namespaces)")
    for name, package in TOOLS.items():
        if shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            raise Unavailable(f"the multicast bench needs {name}: install the Debian package "
                              f"{package}")


@dataclass
class Round:
    wall_s: float
    cpu_s: float
    finals: dict[str, dict]


@dataclass
class Result:
    disk_bytes: int
    image_bytes: int
    sha: str
    rounds: dict[str, list[Round]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    disks: str = ""


def build_disk(workdir: Path, size: int) -> Path:
    """An ext4 disk of ``size`` bytes: a quarter random files, a quarter compressible."""
    content = imaging_bench.Content(SEED)
    rng = content.rng
    tree, path = workdir / "tree", workdir / "disk.img"
    plan = [("random", s) for s in imaging_bench._sizes(rng, size // 4)]
    kinds = ["log", "csv", "rec"]
    plan += [(kinds[i % 3], s) for i, s in enumerate(imaging_bench._sizes(rng, size // 4))]
    rng.shuffle(plan)
    for n, (kind, nbytes) in enumerate(plan):
        folder = tree / rng.choice(imaging_bench.DIRS[kind])
        folder.mkdir(parents=True, exist_ok=True)
        data = content.random(nbytes) if kind == "random" else content.compressible(kind, nbytes)
        (folder / f"{kind}-{n:03d}{imaging_bench.EXT[kind]}").write_bytes(data)
    with open(path, "wb") as fh:
        fh.truncate(size)
    subprocess.run([imaging_bench.tool("mkfs.ext4"), "-q", "-F", "-d", str(tree), str(path)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return path


class Bench:
    def __init__(self, lab: mcastlab.McastLab, workdir: Path, disks: Path, folder: str,
                 url: str, size: int):
        self.lab, self.workdir, self.disks = lab, workdir, disks
        self.folder, self.url, self.size = folder, url, size
        self.port = 9000
        self.n = 0
        self.data = self.data_url = ""          # data.zst: its path, its URL

    def _targets(self, words) -> dict[str, Path]:
        targets = {}
        for word in words:
            targets[word] = self.disks / f"{word}.img"
            with open(targets[word], "wb") as fh:
                fh.truncate(self.size)
        return targets

    def _round(self, start) -> Round:
        self.n += 1
        work = self.workdir / f"round{self.n}"
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.monotonic()
        runs = start(work)
        finals = {word: run.wait(1800) for word, run in runs.items()}
        wall = time.monotonic() - began
        for word, final in finals.items():
            if final["state"] != "succeeded":
                say(f"{word} {final['state']}: {final.get('message')}")
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        shutil.rmtree(work, ignore_errors=True)
        return Round(wall, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, finals)

    def unicast(self, words=("rxa",)) -> Round:
        targets = self._targets(words)
        return self._round(lambda work: {
            w: self.lab.agent(w, work, "DeployImage", {"image": "golden",
                                                        "target": str(targets[w])}, self.url)
            for w in words})

    def multicast(self, words=RECEIVERS) -> Round:
        targets = self._targets(words)
        self.port += 2

        def start(work):
            common = {"multicast_port": str(self.port), "multicast_wait_s": "120"}
            runs = {w: self.lab.agent(w, work, "DeployImage", {
                "image": "golden", "target": str(targets[w]), "multicast": "true", **common},
                self.url) for w in words}
            runs["sender"] = self.lab.agent("sender", work, "DeployImage", {
                "image": "golden", "targets": ",".join(words), **common}, self.folder)
            return runs
        return self._round(start)


    def stream(self, words=RECEIVERS) -> Round:
        """The transport alone: udp-sender of data.zst to udp-receivers writing to
        /dev/null, with the options the handler uses."""
        self.port += 2
        common = ["--nokbd", "--portbase", str(self.port), "--interface", "eth0"]
        block = ["--blocksize", str(udpcast.MAX_BLOCK)] if self.lab.mtu > 1500 else []

        def start(work):
            runs = {w: Tool(self.lab.hosts[w].ns, [udpcast.tool("udp-receiver"), *common,
                                                   "--rcvbuf", str(RCVBUF), "--file",
                                                   "/dev/null"]) for w in words}
            runs["sender"] = Tool(self.lab.hosts["sender"].ns, [
                udpcast.tool("udp-sender"), *common, "--min-receivers", str(len(words)),
                "--max-wait", "60", "--rexmit-hello-interval", str(HELLO_MS), *block,
                "--file", self.data])
            return runs
        return self._round(start)

    def fetch(self) -> Round:
        """The transport alone: curl GET of data.zst to /dev/null."""
        return self._round(lambda work: {"rxa": Tool(self.lab.hosts["rxa"].ns, [
            "curl", "-sSf", "-o", "/dev/null", self.data_url])})


class Tool:
    """A command inside a namespace, started at once; ``wait()`` as AgentRun's."""

    def __init__(self, ns: str, argv: list[str]):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float) -> dict:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return {"state": "succeeded" if self.proc.returncode == 0 else "failed",
                "details": {}, "message": err[-300:]}


def target_folder(workdir: Path, size: int) -> tuple[Path, bool]:
    """Where the receivers' disks go: a new folder on tmpfs (/dev/shm) when it has
    room for four, so the five computers do not share one disk's writes (on a
    LAN each has its own); else the work dir. (folder, made here)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 5 * size:
        return Path(tempfile.mkdtemp(prefix="dsagent-bench-multicast-", dir=shm)), True
    return workdir, False


def measure(workdir: Path, quick: bool, runs: int) -> Result:
    size = (256 if quick else 1024) * MiB
    say(f"building a {size // MiB} MiB ext4 disk")
    disk = build_disk(workdir, size)
    images = workdir / "images"
    images.mkdir()
    made = capture(str(disk), ImageStore(images), "golden", "capture", lambda *a, **k: None)
    result = Result(size, made["compressed_size"], imaging_bench.sha256_file(disk))
    disk.unlink()
    say(f"image: {made['compressed_size'] / MiB:.0f} MiB of frames; the lab")
    disks, made_here = target_folder(workdir, size)
    result.disks = f"{'tmpfs' if made_here else 'the work dir'} ({disks})"
    with mcastlab.McastLab(subnet=43, mtu=9000) as lab:
        for word in ("sender", *RECEIVERS):
            lab.host(word)
        sender = lab.hosts["sender"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", sender.ns, sys.executable, "-m", "taskserver", "serve",
             "--db", str(workdir / "server.db"), "--listen", f"{sender.address}:0",
             "--image-store", str(images)], cwd=mcastlab.REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONPATH=str(mcastlab.REPO)))
        try:
            url = server.stdout.readline().strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"dsagent-server serve did not start (printed {url!r})")
            bench = Bench(lab, workdir, disks, str(images), f"{url}/images/", size)
            bench.data = str(images / "golden" / made["version"] / "data.zst")
            bench.data_url = f"{url}/images/golden/{made['version']}/data.zst"
            say("warm-up round (untimed)")
            bench.unicast()
            for mtu, rate, plan in (
                    (9000, None, [(UNI1, bench.unicast), (MC4, bench.multicast),
                                  (MC1, lambda: bench.multicast(("rxa",))),
                                  (UNI4, lambda: bench.unicast(RECEIVERS)),
                                  (GET1, bench.fetch), (UDP4, bench.stream)]),
                    (1500, None, [(MC4_1500, bench.multicast)]),
                    (9000, GIGABIT, [(LAN_UNI1, bench.unicast), (LAN_MC4, bench.multicast),
                                     (LAN_UNI4, lambda: bench.unicast(RECEIVERS)),
                                     (LAN_GET1, bench.fetch), (LAN_UDP4, bench.stream)])):
                lab.set_mtu(mtu)
                lab.shape(rate)
                for n in range(runs):
                    for label, how in plan:
                        say(f"round {n + 1}/{runs}: {label}")
                        result.rounds.setdefault(label, []).append(how())
        finally:
            server.kill()
            server.wait()
            if made_here:
                shutil.rmtree(disks, ignore_errors=True)
    for label, rounds in result.rounds.items():
        for rnd in rounds:
            for word, final in rnd.finals.items():
                ok = final["state"] == "succeeded" and (
                    final["details"].get("target_sha256", result.sha) == result.sha)
                if not ok:
                    result.problems.append(f"{label}: {word} {final['state']}: "
                                           f"{final.get('message') or final.get('details')}")
    return result


def median(rounds: list[Round], key=lambda r: r.wall_s) -> float:
    """Over the rounds where every computer succeeded (NaN if none did)."""
    good = [key(r) for r in rounds if all(f["state"] == "succeeded" for f in r.finals.values())]
    return statistics.median(good) if good else float("nan")


def rows(res: Result, runs: int) -> list[Row]:
    r = res.rounds
    cores = os.cpu_count() or 1

    def walls(label: str) -> str:
        return "/".join(f"{x.wall_s:.2f}" for x in r[label])

    def detail(label: str, word: str, key: str) -> float:
        return median(r[label], lambda x: x.finals[word]["details"][key])

    def cpu(label: str) -> float:
        return median(r[label], lambda x: x.cpu_s)

    out = []
    for uni, mc, uni4, get1, udp4, links in (
            (UNI1, MC4, UNI4, GET1, UDP4, "The lab's links (veth, unlimited)"),
            (LAN_UNI1, LAN_MC4, LAN_UNI4, LAN_GET1, LAN_UDP4, "Every link 1 Gbit/s (tc tbf)")):
        base, goal = median(r[uni]), median(r[mc])
        task = detail(uni, "rxa", "duration_s")
        sent = detail(mc, "sender", "transfer_s")
        out += [Row(f"{links}: DeployImage over HTTP to 1 receiver, median of {runs}",
                    f"{base:.2f} s ({walls(uni)}; the task {task:.2f} s, "
                    f"{res.disk_bytes / 1e6 / task:,.0f} MB/s of disk)"),
                Row(f"{links}: multicast to 4 receivers (MTU 9000), median of {runs}",
                    f"{goal:.2f} s ({walls(mc)}): {goal / base:.2f}× unicast to 1",
                    f"≤ {RATIO_GOAL}× unicast to 1", goal / base <= RATIO_GOAL),
                Row("  ↳ sender: waited for the receivers / sent the stream",
                    f"{detail(mc, 'sender', 'waited_s'):.2f} s / {sent:.2f} s "
                    f"({res.image_bytes / 1e6 / sent:,.0f} MB/s of image), retransmitted "
                    f"blocks {detail(mc, 'sender', 'retransmitted_blocks'):.0f}; a receiver's "
                    f"task {detail(mc, 'rxa', 'duration_s'):.2f} s"),
                Row("  ↳ CPU of the round, every process (user + system)",
                    f"{cpu(mc):.1f} s: ≥ {cpu(mc) / cores:.2f} s of wall time on {cores} cores "
                    f"shared by the 5 computers (unicast to 1: {cpu(uni):.1f} s)"),
                Row(f"  ↳ for comparison: unicast (HTTP) to 4 at once, median of {runs}",
                    f"{median(r[uni4]):.2f} s ({walls(uni4)}): "
                    f"{median(r[uni4]) / base:.2f}× unicast to 1"),
                Row("  ↳ the transport alone (no deploy): udpcast of data.zst to 4 receivers "
                    "(/dev/null) vs curl of it to 1",
                    f"{median(r[udp4]):.2f} s vs {median(r[get1]):.2f} s: "
                    f"{median(r[udp4]) / median(r[get1]):.2f}× ({walls(udp4)} vs "
                    f"{walls(get1)})")]
    base = median(r[UNI1])
    for label in (MC1, MC4_1500):
        m = median(r[label])
        out.append(Row(f"The lab's links: {label} (for context), median of {runs}",
                       f"{m:.2f} s ({walls(label)}): {m / base:.2f}× unicast to 1; sender sent "
                       f"the stream in {detail(label, 'sender', 'transfer_s'):.2f} s "
                       f"(block size {detail(label, 'sender', 'block_size'):.0f} B)"))
    out.append(Row("Every receiver's target_sha256 = the source disk's",
                   "yes" if not res.problems else "; ".join(res.problems)[:600], "yes",
                   not res.problems))
    return out


NOTES = """\
Notes: every computer is a network namespace on one bridge of this machine
(tests/mcastlab.py) and a real `dsagent run-task` process; the HTTP store is
`dsagent-server serve` in the sender's namespace; the receivers' disks are
sparse files on tmpfs when it has room (the computers would otherwise share
one disk's writes and fsyncs, which on a LAN they do not). Wall times run
from starting the `run-task` processes (receivers first, then the sender)
until the last ended, so both sides pay the same process starts; the sender's rows are its task details
(`waited_s`: until udpcast started the transfer, `transfer_s`: the stream).
All five computers share this machine's cores, so four receivers each
decompressing, checking and writing the whole image cost four times the CPU of
one: on a real LAN each receiver has its own. "1 Gbit/s links": a `tc tbf`
token bucket (1 MB burst) on both ends of every link, as on a switched gigabit
LAN. "The transport alone": udp-sender and udp-receiver with the handler's
options (block size, receive buffer, HELLO interval) into /dev/null, against
curl of the same data.zst from the same server into /dev/null: the network
part of a deploy, without the deploy's CPU.
"""


def section(workdir: Path, quick: bool = False, runs: int | None = None) -> str:
    conditions = Conditions()
    workdir.mkdir(parents=True, exist_ok=True)
    runs = runs or (1 if quick else 3)
    res = measure(workdir, quick, runs)
    mode = (("quick: " if quick else "full: ") + f"{res.disk_bytes // MiB} MiB disk, "
            f"{res.image_bytes / MiB:.0f} MiB image, {runs} round(s) of each after a warm-up; "
            f"the receivers' disks on {res.disks}")
    return "\n".join([HEADING, "", *machine_lines(workdir, mode), conditions.line(), "",
                      table(rows(res, runs)), "", NOTES])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multicast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB disk, 1 round")
    parser.add_argument("--runs", type=int, help="rounds of each (default 3, quick 1)")
    standalone_options(parser)
    args = parser.parse_args(argv)
    return run_standalone("bench.multicast", args, "dsagent-bench-multicast-",
                          lambda w: section(w, args.quick, args.runs),
                          "the lab's namespaces were deleted", say, check)


if __name__ == "__main__":
    sys.exit(main())
