//! The parsers under test, each through kiln's public API as the CLI reaches
//! it: migration files through `load_dir` (a real directory on tmpfs, so the
//! layout detection, directive parsing, statement splitting and YAML/JSON
//! command reading all run), `kiln.toml` through `Config::load`, `schema.yaml`
//! through `Contract::parse`, URLs through the scheme registry, the redactors
//! (`redact`, `DbUrl::scrub`, `scrub_text`) and the configuration, durations through the lock-timeout parser.

use std::path::{Path, PathBuf};

use kiln::config::{Config, Overrides};
use kiln_core::split::{split_statements, Dialect};
use kiln_core::url::{redact, scrub_text, DbUrl, EngineKind};
use kiln_core::{load_dir, LoadOptions};

use crate::gen::{self, Rng};

/// A parser and how to feed it.
pub struct Subject {
    pub name: &'static str,
    seeds: &'static [&'static str],
    dict: &'static [&'static str],
    run: fn(&Scratch, &[u8]) -> Result<(), String>,
}

/// A directory of our own on tmpfs where file-reading parsers get their input.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> std::io::Result<Self> {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("kiln-chaos-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir })
    }
    fn migrations(&self, files: &[(&str, &[u8])]) -> PathBuf {
        // The same file names every time: overwriting is much cheaper than
        // recreating the directory, and load_dir sees exactly these files.
        let d = self.dir.join("migrations");
        std::fs::create_dir_all(&d).expect("scratch directory");
        for (name, text) in files {
            std::fs::write(d.join(name), text).expect("scratch file");
        }
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const DIALECTS: [Dialect; 4] = [Dialect::POSTGRES, Dialect::MYSQL, Dialect::SQLITE, Dialect::GENERIC];

fn dialect_of(input: &[u8]) -> Dialect {
    DIALECTS[input.len() % 4]
}

fn sql_file(s: &Scratch, input: &[u8]) -> Result<(), String> {
    let d = s.migrations(&[("0001_fuzz.sql", input), ("0002_next.sql", b"-- kiln:up\nSELECT 1;\n")]);
    let _ = load_dir(&d, &LoadOptions { dialect: dialect_of(input), name_rule: None });
    Ok(())
}

fn sql_pair(s: &Scratch, input: &[u8]) -> Result<(), String> {
    let cut = input.len() / 2;
    let d = s.migrations(&[("0001_fuzz.up.sql", &input[..cut]), ("0001_fuzz.down.sql", &input[cut..])]);
    let _ = load_dir(&d, &LoadOptions { dialect: dialect_of(input), name_rule: None });
    Ok(())
}

fn commands_yaml(s: &Scratch, input: &[u8]) -> Result<(), String> {
    let d = s.migrations(&[("0001_fuzz.yaml", input)]);
    let _ = load_dir(&d, &LoadOptions::default());
    Ok(())
}

fn commands_json(s: &Scratch, input: &[u8]) -> Result<(), String> {
    let d = s.migrations(&[("0001_fuzz.json", input)]);
    let _ = load_dir(&d, &LoadOptions::default());
    Ok(())
}

fn kiln_toml(s: &Scratch, input: &[u8]) -> Result<(), String> {
    let path = s.dir.join("kiln.toml");
    std::fs::write(&path, input).expect("scratch file");
    if let Ok(cfg) = Config::load(&Overrides { config: Some(path), ..Default::default() }) {
        let _ = cfg.backend_config();
        let _ = cfg.redacted_url();
        let opts = kiln::load_options(&cfg.url, cfg.name_rule.clone());
        let _ = kiln_core::source::check_name("0001_x", &opts);
    }
    Ok(())
}

fn schema_yaml(_: &Scratch, input: &[u8]) -> Result<(), String> {
    if let Ok(text) = std::str::from_utf8(input) {
        if let Ok(c) = kiln_core::schema::Contract::parse(text, "schema.yaml") {
            let _ = c.to_yaml();
        }
    }
    Ok(())
}

fn url(_: &Scratch, input: &[u8]) -> Result<(), String> {
    let Ok(text) = std::str::from_utf8(input) else { return Ok(()) };
    let _ = EngineKind::parse(text);
    let shown = redact(text);
    let db = DbUrl::new(text);
    let _ = db.has_password();
    let _ = db.check_params("fuzz", &["sslmode"]);
    let scrubbed = db.scrub(&format!("error: cannot connect to {text}: refused"));
    let _ = scrub_text(text);
    let _ = kiln::load_options(text, None);
    let _ = kiln::config::rebase_sqlite(text, Path::new("/base"));
    let o = Overrides { url: Some(text.to_string()), config: Some(PathBuf::from("/nonexistent/kiln.toml")), ..Default::default() };
    let _ = Config::load(&o);
    // The redactor's promise: a password the URL parser sees is never shown
    // (only checked when the password text occurs once in the URL).
    if let Ok(u) = url::Url::parse(text) {
        if let Some(pw) = u.password() {
            if pw.len() >= 6 && text.matches(pw).count() == 1 && shown.contains(pw) {
                return Err(format!("redact() kept the password {pw:?}: {shown:?}"));
            }
            if pw.len() >= 6 && text.matches(pw).count() == 1 && scrubbed.contains(pw) {
                return Err(format!("DbUrl::scrub() kept the password {pw:?}: {scrubbed:?}"));
            }
        }
    }
    Ok(())
}

fn duration(_: &Scratch, input: &[u8]) -> Result<(), String> {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = kiln::config::parse_duration_text(text);
    }
    Ok(())
}

fn split(_: &Scratch, input: &[u8]) -> Result<(), String> {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = split_statements(text, 1, dialect_of(input));
    }
    Ok(())
}

fn name(_: &Scratch, input: &[u8]) -> Result<(), String> {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = kiln_core::source::split_version(text);
        let _ = kiln_core::source::check_name(text, &LoadOptions::default());
    }
    Ok(())
}

const SQL_SEEDS: &[&str] = &[
    "-- kiln:up\nCREATE TABLE users (id INT);\n-- kiln:down\nDROP TABLE users;\n",
    "-- kiln:depends 0001_a\n-- kiln:transaction off\n-- kiln:up\nCREATE INDEX CONCURRENTLY i ON t (a);\n",
    "CREATE TABLE a (x text default 'a;b');\nINSERT INTO a VALUES ($$;$$);\n",
    "-- kiln:group billing\n-- kiln:up\nCREATE TRIGGER t BEFORE INSERT ON a FOR EACH ROW BEGIN SET NEW.x = 1; END;\n-- kiln:down\nDROP TRIGGER t;\n",
    "-- +migrate Up\nCREATE TABLE x (a int);\n-- +migrate Down\nDROP TABLE x;\n",
    "",
];
const YAML_SEEDS: &[&str] = &[
    "up:\n  - create: users\n  - createIndexes: users\n    indexes:\n      - key: {email: 1}\n        name: email_1\n        unique: true\ndown:\n  - drop: users\n",
    "transaction: true\nup:\n  - insert: c\n    documents: [{a: {$date: \"2020-01-01T00:00:00Z\"}}]\n",
    "depends: [0001_a]\ngroup: g\nup: []\n",
    "- create: x\n",
];
const JSON_SEEDS: &[&str] = &[
    "{\"up\": [{\"create\": \"users\"}], \"down\": [{\"drop\": \"users\"}]}",
    "{\"up\": [{\"insert\": \"c\", \"documents\": [{\"_id\": {\"$oid\": \"5f1d7f1d7f1d7f1d7f1d7f1d\"}}]}]}",
    "[]",
];
const TOML_SEEDS: &[&str] = &[
    "url = \"sqlite://kiln.db\"\ndir = \"migrations\"\nversioning = \"sequential\"\nlock_timeout = 60\n",
    "url = \"postgres://u:secret@h/db\"\nhistory_table = \"kiln_history\"\nlog_table = \"kiln_log\"\nschema = \"public\"\nlock_timeout = \"2m\"\n",
    "url = \"mongodb://h/app\"\n[mongodb]\ndatabase = \"app\"\n",
    "name_rule = '^[0-9]+_[a-z]+$'\nallow_out_of_order = true\n",
];
const SCHEMA_SEEDS: &[&str] = &[
    "tables:\n  users:\n    columns:\n      id: {type: bigint, nullable: false}\n      email: {type: text}\n    indexes:\n      - {columns: [email], unique: true}\n",
    "collections:\n  users:\n    indexes:\n      - {keys: {email: 1}, unique: true}\n    validator:\n      $jsonSchema: {required: [email]}\n",
    "tables: {}\n",
];
const URL_SEEDS: &[&str] = &[
    "postgres://user:pass@localhost:5432/db?sslmode=prefer",
    "mysql://root:pw@127.0.0.1:3306/app?socket=/run/mysqld/mysqld.sock",
    "mongodb+srv://u:p%40ss@cluster0.example.net/app?retryWrites=true",
    "sqlite://relative.db",
    "sqlite:///abs/path.db",
    "postgresql://h1:5432,h2:5433/db?password=secretpw",
    "mariadb://u@[::1]:3306/db",
];
const DURATION_SEEDS: &[&str] = &["60", "90s", "2m", "500ms", "1.5h", "0"];
const NAME_SEEDS: &[&str] = &["0001_create_users", "20251101120000_add_index", "2019-02-26-002946_create_user", "0001", "_x"];

/// Every parser the harness fuzzes, by name.
pub const SUBJECTS: &[Subject] = &[
    Subject { name: "sql-file", seeds: SQL_SEEDS, dict: gen::SQL, run: sql_file },
    Subject { name: "sql-pair", seeds: SQL_SEEDS, dict: gen::SQL, run: sql_pair },
    Subject { name: "commands-yaml", seeds: YAML_SEEDS, dict: gen::YAML, run: commands_yaml },
    Subject { name: "commands-json", seeds: JSON_SEEDS, dict: gen::JSON, run: commands_json },
    Subject { name: "kiln-toml", seeds: TOML_SEEDS, dict: gen::TOML, run: kiln_toml },
    Subject { name: "schema-yaml", seeds: SCHEMA_SEEDS, dict: gen::SCHEMA, run: schema_yaml },
    Subject { name: "url", seeds: URL_SEEDS, dict: gen::URL, run: url },
    Subject { name: "duration", seeds: DURATION_SEEDS, dict: gen::DURATION, run: duration },
    Subject { name: "split", seeds: SQL_SEEDS, dict: gen::SQL, run: split },
    Subject { name: "name", seeds: NAME_SEEDS, dict: gen::URL, run: name },
];

impl Subject {
    pub fn generate(&self, rng: &mut Rng) -> Vec<u8> {
        gen::input(rng, self.seeds, self.dict)
    }
    pub fn run(&self, s: &Scratch, input: &[u8]) -> Result<(), String> {
        (self.run)(s, input)
    }
    /// Fixed inputs at the edges, run first: deep nesting (20,000 levels of `{a: `;
    /// issue 9.6 measured 15 s for 50,000), a 1 MiB line, a file of NUL bytes, a lone BOM.
    pub fn edges(&self) -> Vec<Vec<u8>> {
        let mut out = vec![b"\xef\xbb\xbf".to_vec(), vec![0u8; 4096], vec![b'a'; 1 << 20], vec![0xff, 0xfe, 0xfd]];
        let mut deep = if self.name.starts_with("commands") { b"up:\n  - ".to_vec() } else { Vec::new() };
        deep.extend(b"{a: ".iter().copied().cycle().take(4 * 20_000));
        out.push(deep);
        out
    }
}
