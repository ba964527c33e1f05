"""The fault tests. Each `trial_*` function runs one trial on one engine and
returns a Trial: failures (each tagged with a kind, so a known open issue can
be told apart from a new failure), notes and measured figures.

Every migration the harness writes creates a table/collection t_NNNN and
inserts (NNNN, 'up') into chaos_counter; its down drops the table and inserts
(NNNN, 'down'). After each trial the invariants are checked directly in the
database, never through kiln:
  - no migration ran twice (ups - downs is 0 or 1 for every version),
  - history agrees with the schema (applied <=> table exists and net count 1),
  - nothing half-applied (a version not recorded as applied has no effects;
    an interrupted `running`/`failed` row is only allowed where the engine
    cannot roll a body back: MySQL/MariaDB, MongoDB),
  - the lock is free afterwards.
"""

import collections
import json
import os
import random
import re
import signal
import subprocess
import threading
import time


class Trial:
    def __init__(self):
        self.failures = []  # (tag, text)
        self.notes = []
        self.metrics = {}

    def fail(self, tag, text):
        self.failures.append((tag, text))


class Proc:
    """A running `kiln` process whose stdout lines are collected as they come."""

    def __init__(self, cmd, env=None, cwd=None):
        self.start = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, errors="replace")
        self.lines, self.err = [], []
        self.first_applied = threading.Event()
        self._t = [threading.Thread(target=self._read_out, daemon=True), threading.Thread(target=self._read_err, daemon=True)]
        for t in self._t:
            t.start()

    def _read_out(self):
        for line in self.p.stdout:
            self.lines.append(line)
            if "applied" in line:
                self.first_applied.set()

    def _read_err(self):
        for line in self.p.stderr:
            self.err.append(line)

    def wait(self, timeout):
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            rc = None
        for t in self._t:
            t.join(5)
        self.elapsed = time.monotonic() - self.start
        self.rc = rc
        return rc

    def out(self):
        return "".join(self.lines)

    def errtext(self):
        return "".join(self.err)

    def printed_applied(self):
        return {int(m.group(1)) for m in re.finditer(r"applied\s+0*(\d+) ", self.out())}


def kiln_cmd(ctx, t, mig, *args, lock_timeout=None):
    cmd = [ctx.kiln, "--url", t.url(), "--dir", mig]
    if lock_timeout is not None:
        cmd += ["--lock-timeout", str(lock_timeout)]
    return cmd + list(args)


def kiln(ctx, t, mig, *args, timeout=120, lock_timeout=None):
    p = Proc(kiln_cmd(ctx, t, mig, *args, lock_timeout=lock_timeout), env=ctx.env)
    p.wait(timeout)
    return p


def panicked(tr, p, who):
    if p.rc is None:
        tr.fail("hang", f"{who}: still running after its time limit (killed)")
    elif p.rc == 101 or "panicked at" in p.errtext():
        tr.fail("panic", f"{who}: panicked: {p.errtext()[-300:]}")


def first_line(p):
    """The error line of a run's output (else its first line): warnings printed
    before it (a lease takeover) must not hide it."""
    text = (p.errtext() or p.out()).strip().splitlines()
    errors = [l for l in text if l.startswith("error")]
    return (errors or text or ["(no output)"])[0][:300]


def invariants(tr, t, n, interrupted_ok, check_lock=True, once=True):
    """Check the database after a trial. Returns the interrupted versions."""
    h, c, tabs = t.history(), t.counter(), t.tables()
    ups = collections.Counter(v for v, d in c if d == "up")
    downs = collections.Counter(v for v, d in c if d == "down")
    interrupted = []
    for v in range(1, n + 1):
        st, net, has = h.get(v), ups[v] - downs[v], f"t_{v:04d}" in tabs
        if net not in (0, 1) or (once and ups[v] > 1):
            tr.fail("ran-twice", f"{v:04d}: its body ran more than once (up {ups[v]}, down {downs[v]})")
        if st in ("running", "failed"):
            if t.atomic and st == "running":
                tr.fail("half-applied", f"{v:04d}: left `running` on an engine that commits body and history together")
            elif not interrupted_ok:
                tr.fail("interrupted", f"{v:04d}: recorded `{st}` although no runner was interrupted")
            interrupted.append(v)
            continue
        if st == "applied" and not (has and net == 1):
            tr.fail("history-vs-schema", f"{v:04d}: history says applied but table={has} net count={net}")
        if st != "applied" and (has or net != 0):
            tr.fail("half-applied", f"{v:04d}: history says {st or 'nothing'} but table={has} net count={net}")
    extra = sorted(set(h) - set(range(1, n + 1)))
    if extra:
        tr.fail("history-vs-schema", f"history holds versions that have no file: {extra[:5]}")
    if once:
        dup = {v: k for v, k in t.applied_events().items() if k > 1}
        if dup:
            tr.fail("duplicate-log", f"kiln_log has several `applied` events for {sorted(dup)[:5]}")
    if check_lock and not t.lock_free():
        tr.fail("lock-held", "the lock is still held after every runner ended")
    return interrupted


def wait_lock_free(t, limit):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if t.lock_free():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def recover(ctx, tr, t, mig, n, interrupted):
    """Do what an operator does after a crash (undo the interrupted body by
    hand, `kiln repair`), run `kiln up` to the end, and check every migration
    ran exactly once."""
    # As an operator does, look again before repairing: a server may still
    # apply a write the killed process had sent (MongoDB test server: an
    # intent arriving after the first look), which then shows as `running`.
    time.sleep(0.5)
    late = sorted(v for v, s in t.history().items() if s == "running" and v not in interrupted)
    if late:
        tr.metrics["late_running"] = tr.metrics.get("late_running", 0) + len(late)
    for v in sorted(set(interrupted) | set(late)):
        t.undo_by_hand(v)
        p = kiln(ctx, t, mig, "repair", str(v), "--reason", "chaos: undone by hand", lock_timeout=90)
        panicked(tr, p, f"repair {v}")
        if p.rc != 0:
            tr.fail("repair", f"repair {v:04d} failed: {first_line(p)}")
    p = kiln(ctx, t, mig, "up", lock_timeout=90, timeout=240)
    panicked(tr, p, "recovery up")
    if p.rc != 0:
        tr.fail("recovery", f"`kiln up` after the fault failed: {first_line(p)}")
        return
    invariants(tr, t, n, interrupted_ok=False)
    h = t.history()
    missing = [v for v in range(1, n + 1) if h.get(v) != "applied"]
    if missing:
        tr.fail("recovery", f"after recovery not applied: {missing[:5]}")


def fresh(ctx, engine, private=False, n=20, sleep=0.0, sleep_every=1):
    t = ctx.target(engine, private)
    t.create()
    mig = t.write_migrations(os.path.join(t.work, "migrations"), n, sleep, sleep_every)
    return t, mig


# -- the tests ------------------------------------------------------------------


def trial_race(ctx, engine):
    """16 runners start `kiln up` at once: each migration runs once, all succeed."""
    tr, n = Trial(), 10 if ctx.quick else 20
    t, mig = fresh(ctx, engine, n=n)
    try:
        procs = [Proc(kiln_cmd(ctx, t, mig, "up", lock_timeout=120), env=ctx.env) for _ in range(16)]
        for i, p in enumerate(procs):
            p.wait(240)
            panicked(tr, p, f"runner {i}")
            if p.rc not in (0, None):
                tr.fail("racer-failed", f"runner {i} exited {p.rc}: {first_line(p)}")
        printed = collections.Counter(v for p in procs for v in p.printed_applied())
        twice = [v for v, k in printed.items() if k > 1]
        if twice:
            tr.fail("ran-twice", f"several runners printed `applied` for {twice[:5]}")
        invariants(tr, t, n, interrupted_ok=False)
        if [v for v in range(1, n + 1) if t.history().get(v) != "applied"]:
            tr.fail("recovery", "not every migration is applied after 16 successful runners")
    finally:
        t.drop()
    return tr


def calibrate(ctx, engine, n, sleep, private=False):
    key = (engine, n, sleep, private)
    if key not in ctx.calibration:
        t, mig = fresh(ctx, engine, private, n=n, sleep=sleep)
        try:
            p = kiln(ctx, t, mig, "up", timeout=300)
            ctx.calibration[key] = max(p.elapsed, 0.2)
        finally:
            t.drop()
    return ctx.calibration[key]


def trial_kill(ctx, engine):
    """kill -9 at a random moment of an `up` whose bodies sleep between their
    DDL and their counter insert; measure how long until the lock is free."""
    tr, n, sleep = Trial(), 30, 0.05
    dur = calibrate(ctx, engine, n, sleep)
    t, mig = fresh(ctx, engine, n=n, sleep=sleep)
    try:
        p = Proc(kiln_cmd(ctx, t, mig, "up"), env=ctx.env)
        delay = random.uniform(0.02, dur * 0.95)
        time.sleep(delay)
        p.p.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        p.wait(30)
        tr.metrics["kill_at_s"] = round(delay, 3)
        free = wait_lock_free(t, 90)
        if free is None:
            tr.fail("lock-held", "the lock was not free 90 s after kill -9")
        else:
            tr.metrics["lock_free_s"] = time.monotonic() - killed_at
        interrupted = invariants(tr, t, n, interrupted_ok=not t.atomic, check_lock=False)
        tr.metrics["interrupted"] = len(interrupted)
        recover(ctx, tr, t, mig, n, interrupted)
    finally:
        t.drop()
    return tr


def trial_restart(ctx, engine):
    """Restart (crash) a private server at a random moment of `kiln up`."""
    tr, n, sleep = Trial(), 30, 0.05
    server = ctx.private[engine]
    dur = calibrate(ctx, engine, n, sleep, private=True)
    t, mig = fresh(ctx, engine, private=True, n=n, sleep=sleep)
    try:
        p = Proc(kiln_cmd(ctx, t, mig, "up"), env=ctx.env)
        time.sleep(random.uniform(0.05, dur * 0.9))
        server.restart()
        p.wait(120)
        panicked(tr, p, "up during restart")
        interrupted = invariants(tr, t, n, interrupted_ok=not t.atomic)
        h = t.history()
        lost = sorted(v for v in p.printed_applied() if h.get(v) != "applied")
        if lost:
            tr.fail("printed-not-durable", f"printed `applied` but not applied after the restart: {lost[:5]} ({first_line(p)})")
        if p.rc == 0 and [v for v in range(1, n + 1) if h.get(v) != "applied"]:
            tr.fail("exit-0", "exit 0 although not everything was applied")
        recover(ctx, tr, t, mig, n, interrupted)
    finally:
        t.drop()
    return tr


def trial_frozen(ctx, engine):
    """Runner A is frozen (SIGSTOP) mid-run, past runner B's lock time-out (SQL)
    or past the lease TTL (MongoDB, 30 s); then it resumes."""
    tr = Trial()
    mongo = engine == "mongodb"
    n, sleep = (40, 0.0) if mongo else (12, 0.3)
    t, mig = fresh(ctx, engine, n=n, sleep=sleep)
    try:
        a = Proc(kiln_cmd(ctx, t, mig, "up"), env=ctx.env)
        if not a.first_applied.wait(60):
            a.wait(60)
            tr.fail("setup", f"runner A applied nothing: {first_line(a)}")
            return tr
        time.sleep(random.uniform(0, 0.2 if mongo else 0.25))
        a.p.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        b = Proc(kiln_cmd(ctx, t, mig, "up", lock_timeout=90 if mongo else 2), env=ctx.env)
        b.wait(150)
        panicked(tr, b, "runner B")
        time.sleep(max(0.0, (35 if mongo else 3) - (time.monotonic() - frozen_at)))
        a.p.send_signal(signal.SIGCONT)
        a.wait(150)
        panicked(tr, a, "runner A")
        tr.metrics["b_wait_s"] = round(b.elapsed, 2)
        if not mongo:
            if b.rc == 0:
                tr.fail("exclusion", "runner B succeeded while A held the lock")
            elif "holds the migration lock" not in b.errtext():
                tr.fail("lock-wait", f"runner B did not wait for the lock and name its holder: {first_line(b)}")
            if a.rc != 0:
                tr.fail("resume", f"runner A failed after resuming: {first_line(a)}")
            invariants(tr, t, n, interrupted_ok=False)
        else:
            twice = sorted(a.printed_applied() & b.printed_applied())
            if twice:
                tr.fail("lease", f"A (resumed) and B both printed `applied` for {twice[:5]}")
            if b.rc == 0 and a.rc == 0 and len(a.printed_applied()) + len(b.printed_applied()) > n:
                tr.fail("lease", "both runners claim to have finished the run")
            interrupted = invariants(tr, t, n, interrupted_ok=True)
            recover(ctx, tr, t, mig, n, interrupted)
    finally:
        for pr in ("a", "b"):
            p = locals().get(pr)
            if p is not None and p.p.poll() is None:
                p.p.send_signal(signal.SIGCONT)
                p.p.kill()
        t.drop()
    return tr


def trial_up_down(ctx, engine):
    """`kiln up` and `kiln down --steps 5` start together on a half-applied set."""
    tr, n = Trial(), 20
    t, mig = fresh(ctx, engine, n=n, sleep=0.02 if engine != "mongodb" else 0.0)
    try:
        p = kiln(ctx, t, mig, "up", "--to", "10")
        if p.rc != 0:
            tr.fail("setup", f"up --to 10 failed: {first_line(p)}")
            return tr
        procs = []
        order = [("up",), ("down", "--steps", "5")]
        random.shuffle(order)
        for args in order:
            procs.append(Proc(kiln_cmd(ctx, t, mig, *args, lock_timeout=120), env=ctx.env))
            time.sleep(random.uniform(0, 0.3))
        for p in procs:
            p.wait(240)
            panicked(tr, p, " ".join(p.p.args[5:]))
            if p.rc != 0:
                tr.fail("racer-failed", f"{' '.join(p.p.args[5:])} exited {p.rc}: {first_line(p)}")
        invariants(tr, t, n, interrupted_ok=False, once=False)
        p = kiln(ctx, t, mig, "up", lock_timeout=90)
        if p.rc != 0:
            tr.fail("recovery", f"final up failed: {first_line(p)}")
        invariants(tr, t, n, interrupted_ok=False, once=False)
    finally:
        t.drop()
    return tr


def trial_status(ctx, engine):
    """`kiln status` in a loop while `kiln up` runs: it must always answer, fast,
    and never show fewer applied migrations than before."""
    tr = Trial()
    mongo = engine == "mongodb"
    n, sleep = (60, 0.0) if mongo else (15, 0.2)
    t, mig = fresh(ctx, engine, n=n, sleep=sleep)
    try:
        a = Proc(kiln_cmd(ctx, t, mig, "up"), env=ctx.env)
        seen, worst, k = 0, 0.0, 0
        while a.p.poll() is None:
            s = kiln(ctx, t, mig, "status", "--json", timeout=60)
            k += 1
            worst = max(worst, s.elapsed)
            panicked(tr, s, "status")
            if s.rc != 0:
                tr.fail("status-failed", f"status exited {s.rc} during up: {first_line(s)}")
                continue
            if s.elapsed > ctx.status_limit:
                tr.fail("status-blocked", f"status took {s.elapsed:.1f}s while up was running")
            try:
                rows = json.loads(s.out())["migrations"]
                applied = sum(1 for r in rows if r.get("state") == "applied")
            except (ValueError, KeyError, TypeError) as e:
                tr.fail("status-json", f"status --json is not the documented document: {e}")
                continue
            if applied < seen:
                tr.fail("status-regressed", f"status showed {applied} applied after {seen}")
            seen = max(seen, applied)
        a.wait(120)
        if a.rc != 0:
            tr.fail("racer-failed", f"up failed while status ran: {first_line(a)}")
        tr.metrics["status_max_s"] = worst
        tr.metrics["status_calls"] = k
        invariants(tr, t, n, interrupted_ok=False)
    finally:
        t.drop()
    return tr
