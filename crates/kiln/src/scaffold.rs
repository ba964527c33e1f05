//! `kiln init` and `kiln create`: the files a project starts from.

use std::path::PathBuf;

use kiln::config::{self, Config, Versioning};

use crate::cli::{CliError, Global, Layout};
use crate::render;

pub fn init(g: &Global, force: bool, json: bool) -> Result<i32, CliError> {
    let path = g.config.clone().unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG));
    if path.exists() && !force {
        return Err(CliError::Usage(format!("{} already exists; use --force to overwrite it", path.display())));
    }
    let url = g.url.clone().unwrap_or_else(|| config::DEFAULT_URL.to_string());
    if kiln::url::EngineKind::of(&url).is_none() {
        return Err(CliError::Usage(format!("--url {}: {}", kiln::url::redact(&url), kiln::url::UNKNOWN_SCHEME)));
    }
    let dir = g.dir.clone().unwrap_or_else(|| PathBuf::from(config::DEFAULT_DIR));
    let text = config::init_template(&url.replace('"', "\\\""), &dir.display().to_string());
    std::fs::write(&path, text).map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
    let dir_abs = path.parent().map(|p| p.join(&dir)).unwrap_or(dir.clone());
    std::fs::create_dir_all(&dir_abs).map_err(|e| CliError::Failed(format!("cannot create {}: {e}", dir_abs.display())))?;
    if json {
        render::json(&serde_json::json!({"config": path, "dir": dir_abs, "url": kiln::url::redact(&url)}));
    } else {
        println!("Wrote {} (database {})", path.display(), kiln::url::redact(&url));
        println!("Created {}/", dir_abs.display());
        println!("Next: kiln create <name>, edit the file, kiln up");
    }
    Ok(0)
}

pub fn create(cfg: &Config, name: &str, versioning: Versioning, explicit_versioning: bool, layout: Layout, json: bool) -> Result<i32, CliError> {
    let snake = regex::Regex::new(r"^[a-z0-9]+(_[a-z0-9]+)*$").expect("valid");
    if cfg.name_rule.is_none() && !snake.is_match(name) {
        return Err(CliError::Usage(format!(
            "{name:?}: migration names are lower-case snake_case (letters, digits, single underscores), e.g. add_user_index"
        )));
    }
    let dir = &cfg.dir;
    if !dir.is_dir() {
        return Err(CliError::Usage(format!("migrations directory {} does not exist; run `kiln init` first", dir.display())));
    }
    // Highest version in use, counting retired files so no version is reused.
    let mut max: u64 = 0;
    let mut width = 4;
    let rd = std::fs::read_dir(dir).map_err(|e| CliError::Failed(format!("cannot read {}: {e}", dir.display())))?;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some((v, _)) = kiln::source::split_version(n.split('.').next().unwrap_or("")) {
            if v.number >= max {
                max = v.number;
                width = width.max(v.text.len());
            }
        }
    }
    // A MongoDB project numbered 0001, 0002… before timestamps became the
    // default keeps its style unless kiln.toml or a flag says otherwise.
    let versioning = if versioning == Versioning::Timestamp && !explicit_versioning && max > 0 && max < 1_000_000_000 {
        Versioning::Sequential
    } else {
        versioning
    };
    let version = match versioning {
        Versioning::Sequential => format!("{:0width$}", max + 1, width = width),
        Versioning::Timestamp => {
            let now: u64 = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string().parse().expect("digits");
            now.max(max + 1).to_string()
        }
    };
    let stem = format!("{version}_{name}");
    kiln::source::check_name(&stem, &kiln::load_options(&cfg.url, cfg.name_rule.clone()))?;
    let mongo = kiln::url::EngineKind::of(&cfg.url) == Some(kiln::url::EngineKind::Mongodb);
    let files: Vec<(PathBuf, String)> = if mongo {
        vec![(dir.join(format!("{stem}.yaml")), MONGO_TEMPLATE.to_string())]
    } else if layout == Layout::Pair {
        vec![
            (dir.join(format!("{stem}.up.sql")), "-- Forward change. Statements end with `;`.\n\n".to_string()),
            (
                dir.join(format!("{stem}.down.sql")),
                "-- Undo the forward change. Delete this file to make the migration irreversible.\n\n".to_string(),
            ),
        ]
    } else {
        vec![(dir.join(format!("{stem}.sql")), SQL_TEMPLATE.to_string())]
    };
    for (p, text) in &files {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", p.display())))?;
        f.write_all(text.as_bytes()).map_err(|e| CliError::Failed(format!("cannot write {}: {e}", p.display())))?;
    }
    if json {
        render::json(&serde_json::json!({"version": version, "files": files.iter().map(|(p, _)| p).collect::<Vec<_>>()}));
    } else {
        for (p, _) in &files {
            println!("Created {}", p.display());
        }
    }
    Ok(0)
}

const SQL_TEMPLATE: &str = "-- kiln:up\n-- Forward change. Statements end with `;`. Header directives go above this line,\n-- e.g. `-- kiln:depends 0001_create_users` or `-- kiln:transaction off`.\n\n\n-- kiln:down\n-- Undo the forward change. Delete this section to make the migration irreversible.\n\n";

const MONGO_TEMPLATE: &str = "# MongoDB database commands, exactly as db.runCommand() takes them (Extended JSON\n# for dates and ids). Example:\n#   up:\n#     - createIndexes: users\n#       indexes:\n#         - key: { email: 1 }\n#           name: email_1\n#           unique: true\n#   down:\n#     - dropIndexes: users\n#       index: email_1\nup: []\ndown: []\n";
