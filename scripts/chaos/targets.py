"""Engines under test: a fresh database per trial, direct queries for the
invariant checks (never through kiln), and private server instances for the
restart tests.

The shared PostgreSQL (5432) and MariaDB (3306) servers are never stopped or
restarted: restart tests use private instances on other ports in a temp dir.
"""

import fcntl
import glob
import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time

ENGINES = ("sqlite", "postgres", "mysql", "mongodb")
_seq = itertools.count()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


class Target:
    """One fresh database on one engine. Subclasses implement the queries."""

    engine = ""
    atomic = True  # body + history commit together (no `running` rows after a crash)

    def __init__(self, work):
        self.work = work  # a temp dir of this trial
        self.name = f"chaos_{os.getpid()}_{next(_seq)}"

    # -- what each engine provides -------------------------------------------
    def url(self):
        raise NotImplementedError

    def create(self):
        pass

    def drop(self):
        pass

    def history(self):
        """{version_number: state} as stored in kiln_history (or {} if absent)."""
        raise NotImplementedError

    def counter(self):
        """[(version, dir)] rows the migrations wrote into chaos_counter."""
        raise NotImplementedError

    def tables(self):
        """The set of t_NNNN tables/collections that exist."""
        raise NotImplementedError

    def lock_free(self):
        raise NotImplementedError

    def undo_by_hand(self, v):
        """Restore the state before migration v's up (what an operator does
        before `kiln repair v`): drop t_v and remove v's counter rows from that run."""
        raise NotImplementedError

    def applied_events(self):
        """{version: number of `applied` events in kiln_log}."""
        return {}

    # -- migration files -------------------------------------------------------
    def sleep_sql(self, seconds):
        return ""

    def write_migrations(self, dirpath, n, sleep=0.0, sleep_every=1):
        os.makedirs(dirpath, exist_ok=True)
        for v in range(1, n + 1):
            body = self.migration(v, sleep if sleep and v % sleep_every == 0 else 0.0)
            ext = "yaml" if self.engine == "mongodb" else "sql"
            with open(os.path.join(dirpath, f"{v:04d}_m{v:04d}.{ext}"), "w") as f:
                f.write(body)
        return dirpath

    def migration(self, v, sleep):
        s = self.sleep_sql(sleep) if sleep else ""
        t = f"t_{v:04d}"
        # The sleep sits between the DDL and the counter insert: a kill there
        # leaves half a body on engines that cannot roll DDL back.
        return (
            f"-- kiln:up\nCREATE TABLE {t} (id INT);\n{s}"
            f"INSERT INTO chaos_counter (v, dir) VALUES ({v}, 'up');\n"
            f"-- kiln:down\nDROP TABLE {t};\nINSERT INTO chaos_counter (v, dir) VALUES ({v}, 'down');\n"
        )


class Sqlite(Target):
    engine = "sqlite"

    def __init__(self, work):
        super().__init__(work)
        self.path = os.path.join(work, "db.sqlite")

    def url(self):
        return f"sqlite://{self.path}"

    def create(self):
        with sqlite3.connect(self.path) as c:
            c.execute("CREATE TABLE chaos_counter (v INTEGER, dir TEXT)")
            c.execute("CREATE TABLE chaos_sentinel (x INTEGER)")

    def _q(self, sql):
        c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()

    def sleep_sql(self, seconds):
        # SQLite has no sleep: a recursive count of about `seconds` of CPU.
        n = int(seconds * 3_000_000)
        return f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {n}) SELECT count(*) FROM c;\n"

    def history(self):
        try:
            return {int(v): s for v, s in self._q("SELECT version, state FROM kiln_history")}
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return {}
            raise

    def counter(self):
        return [(int(v), d) for v, d in self._q("SELECT v, dir FROM chaos_counter")]

    def tables(self):
        return {r[0] for r in self._q("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 't\\_%' ESCAPE '\\'")}

    def sentinel(self):
        return bool(self._q("SELECT name FROM sqlite_master WHERE name='chaos_sentinel'"))

    def lock_free(self):
        lock = self.path + "-kiln.lock"
        if not os.path.exists(lock):
            return True
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
            except OSError:
                return False

    def undo_by_hand(self, v):
        c = sqlite3.connect(self.path, timeout=30)
        c.execute(f"DROP TABLE IF EXISTS t_{v:04d}")
        c.execute("DELETE FROM chaos_counter WHERE rowid = (SELECT max(rowid) FROM chaos_counter WHERE v = ? AND dir = 'up')", (v,))
        c.commit()
        c.close()

    def applied_events(self):
        try:
            return {int(v): n for v, n in self._q("SELECT version, count(*) FROM kiln_log WHERE event = 'applied' GROUP BY version")}
        except sqlite3.OperationalError:
            return {}


class Postgres(Target):
    engine = "postgres"

    def __init__(self, work, port=5432, host="127.0.0.1"):
        super().__init__(work)
        self.port, self.host = port, host

    def url(self):
        return f"postgres://postgres@{self.host}:{self.port}/{self.name}?sslmode=disable"

    def psql(self, sql, db=None, timeout=60):
        r = run(["psql", "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", db or self.name, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr.strip()}")
        return [line.split("|") for line in r.stdout.splitlines() if line]

    def create(self):
        self.psql(f'CREATE DATABASE "{self.name}"', db="postgres")
        self.psql("CREATE TABLE chaos_counter (v INT, dir TEXT, id SERIAL); CREATE TABLE chaos_sentinel (x INT)")

    def drop(self):
        try:
            self.psql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', db="postgres")
        except Exception:
            pass

    def sleep_sql(self, seconds):
        return f"SELECT pg_sleep({seconds});\n"

    def history(self):
        if not self.psql("SELECT 1 FROM pg_tables WHERE tablename = 'kiln_history'"):
            return {}
        return {int(v): s for v, s in self.psql("SELECT version, state FROM kiln_history")}

    def counter(self):
        return [(int(v), d) for v, d in self.psql("SELECT v, dir FROM chaos_counter")]

    def tables(self):
        return {r[0] for r in self.psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 't\\_%'")}

    def sentinel(self):
        return bool(self.psql("SELECT 1 FROM pg_tables WHERE tablename = 'chaos_sentinel'"))

    def lock_free(self):
        rows = self.psql(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return rows[0][0] == "0"

    def undo_by_hand(self, v):
        self.psql(f"DROP TABLE IF EXISTS t_{v:04d}; DELETE FROM chaos_counter WHERE id = (SELECT max(id) FROM chaos_counter WHERE v = {v} AND dir = 'up')")

    def applied_events(self):
        return {int(v): int(n) for v, n in self.psql("SELECT version, count(*) FROM kiln_log WHERE event = 'applied' GROUP BY version")}


class Mysql(Target):
    engine = "mysql"
    atomic = False

    def __init__(self, work, port=3306, host="127.0.0.1"):
        super().__init__(work)
        self.port, self.host = port, host

    def url(self):
        return f"mysql://root@{self.host}:{self.port}/{self.name}"

    def sql(self, q, db=None, timeout=60):
        database = self.name if db is None else db
        r = run(["mariadb", "-h", self.host, "-P", str(self.port), "-u", "root", "-N", "-B", "-e", q] + ([database] if database else []), timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb: {r.stderr.strip()}")
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def create(self):
        self.sql(f"CREATE DATABASE `{self.name}`", db="")
        self.sql("CREATE TABLE chaos_counter (id INT AUTO_INCREMENT PRIMARY KEY, v INT, dir VARCHAR(8)); CREATE TABLE chaos_sentinel (x INT)")

    def drop(self):
        try:
            self.sql(f"DROP DATABASE IF EXISTS `{self.name}`", db="")
        except Exception:
            pass

    def sleep_sql(self, seconds):
        return f"DO SLEEP({seconds});\n"

    def history(self):
        if not self.sql(f"SELECT 1 FROM information_schema.tables WHERE table_schema = '{self.name}' AND table_name = 'kiln_history'"):
            return {}
        return {int(v): s for v, s in self.sql("SELECT version, state FROM kiln_history")}

    def counter(self):
        return [(int(v), d) for v, d in self.sql("SELECT v, dir FROM chaos_counter")]

    def tables(self):
        return {r[0] for r in self.sql(f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{self.name}' AND table_name LIKE 't\\_%'")}

    def sentinel(self):
        return bool(self.sql(f"SELECT 1 FROM information_schema.tables WHERE table_schema = '{self.name}' AND table_name = 'chaos_sentinel'"))

    def lock_free(self):
        return self.sql(f"SELECT IS_USED_LOCK('kiln:{self.name}:kiln_history') IS NULL")[0][0] == "1"

    def undo_by_hand(self, v):
        self.sql(
            f"DROP TABLE IF EXISTS t_{v:04d}; DELETE FROM chaos_counter WHERE v = {v} AND dir = 'up' ORDER BY id DESC LIMIT 1"
        )

    def applied_events(self):
        return {int(v): int(n) for v, n in self.sql("SELECT version, count(*) FROM kiln_log WHERE event = 'applied' GROUP BY version")}


class Mongo(Target):
    engine = "mongodb"
    atomic = False

    def __init__(self, work, port):
        super().__init__(work)
        self.port = port
        import pymongo  # from .venv-test, installed with the test server

        self.client = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=20000)
        self.db = self.client[self.name]

    def url(self):
        return f"mongodb://127.0.0.1:{self.port}/{self.name}?directConnection=true"

    def create(self):
        self.db["chaos_sentinel"].insert_one({"x": 1})

    def drop(self):
        try:
            self.client.drop_database(self.name)
        except Exception:
            pass
        self.client.close()

    def migration(self, v, sleep):
        t = f"t_{v:04d}"
        return (
            f"up:\n  - create: {t}\n  - insert: chaos_counter\n    documents: [{{v: {v}, dir: up}}]\n"
            f"down:\n  - drop: {t}\n  - insert: chaos_counter\n    documents: [{{v: {v}, dir: down}}]\n"
        )

    def history(self):
        return {int(d["_id"]): d.get("state") for d in self.db["kiln_history"].find({}, {"state": 1})}

    def counter(self):
        return [(int(d["v"]), d["dir"]) for d in self.db["chaos_counter"].find({})]

    def tables(self):
        return {n for n in self.db.list_collection_names() if n.startswith("t_")}

    def sentinel(self):
        return "chaos_sentinel" in self.db.list_collection_names()

    def lock_free(self):
        """Free when no lease is live: expired, or its holder provably dead (this
        host, pid gone), which is when kiln takes a lease over at once."""
        import datetime

        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        for d in self.db["kiln_lock"].find({}):
            exp = d.get("expires")
            if exp is not None and exp.replace(tzinfo=None) <= now:
                continue
            pid = d.get("pid")
            if d.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _alive(pid):
                continue
            return False
        return True

    def undo_by_hand(self, v):
        self.db[f"t_{v:04d}"].drop()
        last = list(self.db["chaos_counter"].find({"v": v, "dir": "up"}).sort("_id", -1).limit(1))
        if last:
            self.db["chaos_counter"].delete_one({"_id": last[0]["_id"]})

    def applied_events(self):
        out = {}
        for d in self.db["kiln_log"].find({"event": "applied"}, {"version": 1}):
            v = d.get("version")
            try:
                out[int(v)] = out.get(int(v), 0) + 1
            except (TypeError, ValueError):
                pass
        return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# -- private servers -----------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL instance of our own (initdb in a temp dir), so restart tests
    never touch the shared server. Runs as the `postgres` user when we are root."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kiln-chaos-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        r = run(self.as_user + [f"{self.bin}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"], timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr}")

    def ctl(self, *args):
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=100"
        return run(self.as_user + [f"{self.bin}/pg_ctl", "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "log"), "-w", *args], timeout=120)

    def start(self):
        r = self.ctl("start")
        if r.returncode != 0 or not wait_port(self.port):
            raise RuntimeError(f"private PostgreSQL did not start: {r.stdout} {r.stderr}")

    def restart(self):
        """An immediate shutdown (a crash for the database) and a start."""
        self.ctl("stop", "-m", "immediate")
        self.start()

    def stop(self):
        self.ctl("stop", "-m", "fast")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateMariadb:
    """A MariaDB instance of our own on a free port; `restart` kills it with
    SIGKILL (a crash) and starts it again."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="kiln-chaos-my-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.sock = os.path.join(self.dir, "sock")
        self.proc = None
        r = run(["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"], timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {r.stderr[-2000:]}")

    def start(self):
        self.log = open(os.path.join(self.dir, "log"), "a")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.data}", f"--port={self.port}", f"--socket={self.sock}", "--bind-address=127.0.0.1",
             "--user=root", "--skip-name-resolve", "--innodb-buffer-pool-size=32M", "--skip-log-bin"],
            stdout=self.log, stderr=self.log)
        if not wait_port(self.port, 120):
            raise RuntimeError("private MariaDB did not start")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if run(["mariadb", "-h", "127.0.0.1", "-P", str(self.port), "-u", "root", "-e", "SELECT 1"]).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("private MariaDB does not accept root")

    def restart(self):
        self.proc.kill()
        self.proc.wait()
        self.start()

    def stop(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateMongo:
    """SecantusDB in memory on a free port (the test harness's server)."""

    def __init__(self, root):
        self.port = free_port()
        self.bin = os.path.join(root, ".venv-test", "bin", "secantusd-py")
        self.proc = None

    def start(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([self.bin, "--host", "127.0.0.1", "--port", str(self.port), "--storage-path", ":memory:"], stdout=self.log, stderr=self.log)
        if not wait_port(self.port, 120):
            raise RuntimeError("SecantusDB did not start")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
