//! Helpers for tests that run the `kiln` binary the way a user does.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use kiln_testkit::{Engine, TestDb};

/// A migrations directory (in its own temporary working directory) and a database.
pub struct Project {
    pub db: TestDb,
    pub root: tempfile::TempDir,
}

/// What a kiln run returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\nstdout: {}\nstderr: {}", self.stdout, self.stderr))
    }
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "kiln failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
    #[track_caller]
    pub fn fails_with(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "expected exit {code}:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// A `kiln` command with a clean environment: no URL from the test's own
/// environment, run in `cwd` so no kiln.toml or .env of the repository is read.
pub fn kiln_cmd(cwd: &Path) -> Command {
    let mut c = Command::new(kiln_bin());
    c.current_dir(cwd).env_remove("KILN_DATABASE_URL").env_remove("DATABASE_URL").env_remove("KILN_CONFIG").env("NO_COLOR", "1").stdin(Stdio::null());
    c
}

pub fn output_to_run(o: Output) -> Run {
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

impl Project {
    pub async fn new(engine: Engine) -> Project {
        let db = TestDb::new(engine).await;
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("migrations")).unwrap();
        Project { db, root }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join("migrations")
    }

    pub fn is_mongo(&self) -> bool {
        self.db.engine == Engine::Mongodb
    }

    /// Write a file under migrations/.
    pub fn write(&self, name: &str, content: &str) {
        let p = self.dir().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// A reversible migration creating table/collection `t_<n>`.
    pub fn add_create(&self, n: u32) {
        if self.is_mongo() {
            self.write(&format!("{n:04}_create_t_{n}.yaml"), &format!("up:\n  - create: t_{n}\ndown:\n  - drop: t_{n}\n"));
        } else {
            self.write(
                &format!("{n:04}_create_t_{n}.sql"),
                &format!("-- kiln:up\nCREATE TABLE t_{n} (id bigint primary key, v text);\n-- kiln:down\nDROP TABLE t_{n};\n"),
            );
        }
    }

    /// A migration whose first statement succeeds (creating `t_<n>`) and whose
    /// second fails.
    pub fn add_failing_after_create(&self, n: u32) {
        if self.is_mongo() {
            self.write(
                &format!("{n:04}_broken_{n}.yaml"),
                &format!("up:\n  - create: t_{n}\n  - insert: t_{n}\n    documents: [{{_id: 1}}, {{_id: 1}}]\ndown:\n  - drop: t_{n}\n"),
            );
        } else {
            self.write(
                &format!("{n:04}_broken_{n}.sql"),
                &format!("-- kiln:up\nCREATE TABLE t_{n} (id bigint primary key);\nINSERT INTO no_such_table VALUES (1);\n-- kiln:down\nDROP TABLE t_{n};\n"),
            );
        }
    }

    /// Run kiln with `--url` and `--dir` set for this project.
    pub fn kiln(&self, args: &[&str]) -> Run {
        let o = kiln_cmd(self.root.path()).args(args).arg("--url").arg(&self.db.url).arg("--dir").arg(self.dir()).output().expect("run kiln");
        output_to_run(o)
    }

    /// `kiln status --json` → (version, state) pairs.
    pub fn states(&self) -> Vec<(String, String)> {
        let r = self.kiln(&["status", "--json"]);
        r.ok();
        r.json()["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["version"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
            .collect()
    }

    pub fn state_of(&self, version: &str) -> String {
        self.states().into_iter().find(|(v, _)| v == version).map(|(_, s)| s).unwrap_or_else(|| "absent".into())
    }

    /// Tables/collections named t_*.
    pub async fn objects(&self) -> Vec<String> {
        self.db.objects("t_").await.unwrap()
    }
}

pub fn names(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}
