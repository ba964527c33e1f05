"""Hostile names, the secrets corpus and URL fuzzing through the binary.

Hostile names: kiln's table names, PostgreSQL schemas, group folders, file
names and database names holding quotes, semicolons, SQL, unicode, control
characters and extreme lengths. kiln must either work (and read back what it
wrote) or refuse with a message — never panic, hang, or run the injected SQL
(the sentinel table must survive).

Secrets: every command is run with a URL whose password is made of unique
random segments joined by reserved characters; no output (stdout, stderr,
--json, --log-level trace) may contain the password, its percent-encoded form,
or any of its segments.
"""

import os
import random
import string
import urllib.parse

from trials import Proc, Trial, first_line, panicked

INJECT = "x; DROP TABLE chaos_sentinel; --"
HOSTILE = [
    'h"x', "h'x", "h`x", INJECT, '"; DROP TABLE chaos_sentinel; --', "'); DROP TABLE chaos_sentinel; --",
    "`; DROP TABLE chaos_sentinel; #", "ístória_ü", "表_history", "h x", "h\\x", "h\nx", "h\tx", "h\u0000x", "h\u202ex",
    "", " ", ".", "..", "$x", "system.x", "a.b", "kiln_history--", "x" * 64, "x" * 300, "😀", "h%sx", "h{}x", "h*x", "\\",
]


def rand_hostile(rng):
    pool = "\"'`;$.\\ %{}()[]\n\t-–—\u00a0\u202eéü表😀\u0000#*/=" + string.ascii_letters
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))


def toml_str(s):
    out = []
    for ch in s:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def hostile_cases(engine, rng, count):
    """(kind, value) pairs: a fixed list first, then random names."""
    kinds = ["history_table", "log_table", "group", "file", "database"] + (["schema"] if engine == "postgres" else [])
    fixed = [(k, v) for v in HOSTILE for k in kinds]
    rng.shuffle(fixed)
    out = fixed[:count]
    while len(out) < count:
        out.append((rng.choice(kinds), rand_hostile(rng)))
    return out


def run_hostile(ctx, t, kind, value):
    tr = Trial()
    work = t.work
    mig = os.path.join(work, "mig")
    os.makedirs(mig, exist_ok=True)
    url = t.url()
    cfg = [f"url = {toml_str(url)}", f"dir = {toml_str(mig)}"]
    ext = "yaml" if t.engine == "mongodb" else "sql"
    body = t.migration(1, 0.0)
    name = f"0001_m0001.{ext}"
    where = mig
    try:
        if kind in ("history_table", "log_table", "schema"):
            cfg.append(f"{kind} = {toml_str(value)}")
        elif kind == "group":
            if "/" in value or value in ("", ".", "..") or "\u0000" in value:
                return None  # not a folder name this file system can hold
            where = os.path.join(mig, value)
        elif kind == "file":
            if "/" in value or "\u0000" in value:
                return None
            name = f"0001_{value}.{ext}"
        elif kind == "database":
            if t.engine == "sqlite":
                if "/" in value or "\u0000" in value:
                    return None
                url = f"sqlite://{os.path.join(work, value or 'x')}.db"
            else:
                base, _, query = url.partition("?")
                url = base.rsplit("/", 1)[0] + "/" + urllib.parse.quote(value, safe="") + ("?" + query if query else "")
            cfg[0] = f"url = {toml_str(url)}"
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, name), "w") as f:
            f.write(body)
    except (OSError, ValueError):
        return None
    conf = os.path.join(work, "kiln.toml")
    with open(conf, "w") as f:
        f.write("\n".join(cfg) + "\n")
    label = f"{kind}={value!r}"
    up = Proc([ctx.kiln, "--config", conf, "--lock-timeout", "10", "up"], env=ctx.env, cwd=work)
    up.wait(60)
    panicked(tr, up, f"up with {label}")
    if up.rc is not None and up.rc not in (0, 1, 2):
        tr.fail("exit-code", f"up with {label} exited {up.rc}")
    if up.rc == 0:
        st = Proc([ctx.kiln, "--config", conf, "status"], env=ctx.env, cwd=work)
        st.wait(60)
        panicked(tr, st, f"status with {label}")
        if st.rc != 0:
            tr.fail("read-back", f"up succeeded with {label} but status then fails: {first_line(st)}")
    elif up.rc is not None and len((up.errtext() + up.out()).strip()) == 0:
        tr.fail("silent", f"up with {label} failed without a message")
    if not t.sentinel():
        tr.fail("injection", f"the sentinel table is gone after {label}")
    return tr


def trial_hostile(ctx, engine):
    """One batch of hostile-name cases on one fresh database; one trial each."""
    results = []
    rng = random.Random(ctx.rng.random())
    for kind, value in hostile_cases(engine, rng, ctx.hostile_per_batch):
        t = ctx.target(engine, False)
        try:
            t.create()
            r = run_hostile(ctx, t, kind, value)
            if r is not None:
                results.append(r)
        finally:
            t.drop()
    return results


# -- secrets ---------------------------------------------------------------------


def password(rng):
    segs = ["".join(rng.choice(string.ascii_letters + string.digits) for _ in range(7)) for _ in range(4)]
    seps = ["@", ":", "/", "%", "?", "#", "!", "&", "=", " ", ";", "'", '"']
    # A quote and a space always: they break an unquoted .env line, whose parse
    # error once echoed the line whole (found 2026-12-01).
    pw = segs[0] + "'" + segs[1] + " " + segs[2] + rng.choice(seps) + segs[3]
    return pw, segs


def url_forms(engine, pw, t):
    enc = urllib.parse.quote(pw, safe="")
    db = "chaos_no_such_db"
    if engine == "sqlite":
        path = os.path.join(t.work, "s.db")
        return {
            "creds-in-sqlite-url": f"sqlite://user:{enc}@{path}",
            "raw-creds-sqlite": f"sqlite://user:{pw}@{path}",
            "no-scheme": f"user:{pw}@localhost/{db}",
            "password-param": f"sqlite://{path}?password={enc}",
        }
    scheme, port = {"postgres": ("postgres", 5432), "mysql": ("mysql", 3306), "mongodb": ("mongodb", getattr(t, "port", 27017))}[engine]
    extra = "&directConnection=true" if engine == "mongodb" else ""
    return {
        "well-formed": f"{scheme}://chaos:{enc}@127.0.0.1:{port}/{db}?connect_timeout=5{extra}" if engine == "postgres" else f"{scheme}://chaos:{enc}@127.0.0.1:{port}/{db}?x=1{extra}",
        "refused-port": f"{scheme}://chaos:{enc}@127.0.0.1:1/{db}",
        "raw-reserved": f"{scheme}://chaos:{pw}@127.0.0.1:{port}/{db}",
        "no-scheme": f"chaos:{pw}@127.0.0.1/{db}",
        "missing-slashes": f"{scheme}:chaos:{pw}@127.0.0.1/{db}",
        "password-param": f"{scheme}://chaos@127.0.0.1:{port}/{db}?password={enc}",
        "bad-param": f"{scheme}://chaos:{enc}@127.0.0.1:{port}/{db}?sslmode=bogus&nonsense=1",
    }


COMMANDS = [["status"], ["status", "--json"], ["up"], ["up", "--json"], ["check"], ["down"], ["--log-level", "trace", "status"], ["diff"]]
DELIVERY = ["flag", "env", "kiln-env", "toml", "toml-unquoted", "dotenv"]


def run_secret(ctx, t, form, url, delivery, cmd, pw, segs):
    tr = Trial()
    work = os.path.join(t.work, f"s{random.randrange(1 << 30)}")
    mig = os.path.join(work, "migrations")
    os.makedirs(mig, exist_ok=True)
    env = dict(ctx.env)
    argv = [ctx.kiln, "--lock-timeout", "3"]
    if delivery == "flag":
        argv += ["--url", url]
    elif delivery == "env":
        env["DATABASE_URL"] = url
    elif delivery == "kiln-env":
        env["KILN_DATABASE_URL"] = url
    elif delivery == "toml":
        with open(os.path.join(work, "kiln.toml"), "w") as f:
            f.write(f"url = {toml_str(url)}\n")
    elif delivery == "toml-unquoted":
        with open(os.path.join(work, "kiln.toml"), "w") as f:
            f.write(f"url = {url}\n")
    elif delivery == "dotenv":
        with open(os.path.join(work, ".env"), "w") as f:
            f.write(f"DATABASE_URL={url}\n")
    p = Proc(argv + cmd, env=env, cwd=work)
    p.wait(60)
    label = f"{form} via {delivery}: kiln {' '.join(cmd)}"
    panicked(tr, p, label)
    text = p.out() + p.errtext()
    leaks = [s for s in [pw, urllib.parse.quote(pw, safe="")] + segs if s in text]
    if leaks:
        line = next((ln for ln in text.splitlines() if any(s in ln for s in leaks)), "")
        tr.fail("secret-leak", f"{label} printed the password: {line[:200]}")
    return tr


def trial_secrets(ctx, engine):
    rng = random.Random(ctx.rng.random())
    t = ctx.target(engine, False)
    results = []
    combos = []
    pw, segs = password(rng)
    for form, url in url_forms(engine, pw, t).items():
        for delivery in DELIVERY:
            for cmd in COMMANDS:
                combos.append((form, url, delivery, cmd))
    rng.shuffle(combos)
    # Fixed first: the .env line that does not parse (a regression input).
    combos.sort(key=lambda c: 0 if (c[2] == "dotenv" and c[3] == ["status"] and c[0] in ("raw-reserved", "raw-creds-sqlite")) else 1)
    for form, url, delivery, cmd in combos[: ctx.secrets_per_engine]:
        results.append(run_secret(ctx, t, form, url, delivery, cmd, pw, segs))
    t.drop()
    return results


# -- URLs through the binary ---------------------------------------------------


URL_SEEDS = [
    "postgres://u:p@127.0.0.1:5432/db?sslmode=disable", "mysql://root@127.0.0.1:3306/db", "sqlite://kiln.db", "sqlite:///tmp/x.db",
    "mongodb://127.0.0.1:1/db?directConnection=true", "mongodb+srv://cluster.invalid/db", "mariadb://u@h/db?socket=/nonexistent",
    "postgresql://[::1]:1/db", "postgres://h1:1,h2:2/db", "postgres:///db?host=/nonexistent", "sqlite:rel.db",
]
URL_TOKENS = ["://", "@", ":", "/", "?", "&", "=", "%", "%00", "%zz", "[", "]", "::1", "#", "+srv", "..", "sqlite", "mongodb", "99999999999999999999",
              "sslmode=", "socket=", "connect_timeout=99999999999", "\u00e9", "\u0000", " ", "\n"]


def mutate_url(rng):
    s = rng.choice(URL_SEEDS)
    for _ in range(rng.randint(1, 4)):
        i = rng.randint(0, len(s))
        op = rng.random()
        if op < 0.4:
            s = s[:i] + rng.choice(URL_TOKENS) + s[i:]
        elif op < 0.7:
            j = rng.randint(i, len(s))
            s = s[:i] + s[j:]
        else:
            s = s[:i] + chr(rng.randint(1, 0x7F)) + s[i:]
    return s.replace("\u0000", "")


def trial_url_fuzz(ctx, engine):
    """Mutated URLs through `kiln status` (the binary's whole connect path,
    drivers included): no panic, no hang (a 20 s limit per input)."""
    rng = random.Random(ctx.rng.random())
    results = []
    t = ctx.target("sqlite", False)
    os.makedirs(os.path.join(t.work, "migrations"), exist_ok=True)
    # Fixed first: inputs that once broke the binary (regressions), then mutations.
    regressions = ["mysql\u00e9://roo", "p\u00e9ostgresql://[::1]:1/db"]
    for i in range(ctx.url_fuzz_count):
        tr = Trial()
        url = regressions[i] if i < len(regressions) else mutate_url(rng)
        p = Proc([ctx.kiln, "--url", url, "--lock-timeout", "2", "status"], env=ctx.env, cwd=t.work)
        p.wait(20)
        panicked(tr, p, f"status --url {url!r}")
        # The redactor's char-boundary panic (found 2026-12-01): its own kind, so
        # it is told apart from any other panic.
        tr.failures = [("panic-scrub" if tag == "panic" and "not a char boundary" in p.errtext() and "url.rs" in p.errtext() else tag, text)
                       for tag, text in tr.failures]
        results.append(tr)
    return results
