"""A process and everything under it, watched through /proc (Linux): for the kill tests and
bench/kill_sweep.py (does anything outlive a killed trainer?) and bench/leak.py (memory per process).

Once a process dies its children are re-parented (to init), so a tree must be recorded while the
root is alive: `ProcessTree(pid).start()` rescans every 0.1 s; processes once seen stay tracked, by
pid and start time (so a reused pid is not mistaken for one of ours)."""

import os
import threading
import time


def proc_stat(pid):
    """(state, ppid, start time) of a live pid, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class ProcessTree(threading.Thread):
    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.seen, self.done, self.lock = root, {}, threading.Event(), threading.Lock()

    def scan(self):
        children = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (stat := proc_stat(int(name))) is not None:
                children.setdefault(stat[1], []).append((int(name), stat[2]))
        with self.lock:
            todo = [self.root, *self.seen]
            while todo:
                for pid, start in children.get(todo.pop(), []):
                    if pid not in self.seen:
                        self.seen[pid] = (start, cmdline(pid))
                        todo.append(pid)

    def run(self):
        while not self.done.is_set():
            self.scan()
            time.sleep(0.1)

    def stop(self):
        self.done.set()
        self.join()

    def alive(self):
        """{pid: command line} of the recorded descendants still running (a zombie has ended)."""
        with self.lock:
            seen = dict(self.seen)
        return {pid: cmd for pid, (start, cmd) in seen.items()
                if (stat := proc_stat(pid)) is not None and stat[0] != "Z" and stat[2] == start}

    def forkserver_children(self):
        """Live DataLoader workers: the children of a multiprocessing forkserver of this tree."""
        with self.lock:
            servers = [pid for pid, (_, cmd) in self.seen.items() if "multiprocessing.forkserver" in cmd]
        return [pid for pid in self.alive() if (stat := proc_stat(pid)) and stat[1] in servers]

    def wait_until_gone(self, seconds):
        """The recorded descendants still alive after waiting up to `seconds` for them to end."""
        end = time.monotonic() + seconds
        while self.alive() and time.monotonic() < end:
            time.sleep(0.1)
        return self.alive()

    def kill_all(self):
        """Cleans up after a failed check: a leftover run holds GBs."""
        for pid in self.alive():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
