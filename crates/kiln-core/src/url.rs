//! Database URLs: which engine a URL names, and redaction of passwords.

/// The engine a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// `postgres://`, `postgresql://`
    Postgres,
    /// `mysql://`, `mariadb://`
    Mysql,
    /// `sqlite://`, `sqlite:`
    Sqlite,
    /// `mongodb://`, `mongodb+srv://`
    Mongodb,
}

impl EngineKind {
    /// Recognise the scheme of `url`.
    pub fn of(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        Some(match scheme.as_str() {
            "postgres" | "postgresql" => EngineKind::Postgres,
            "mysql" | "mariadb" => EngineKind::Mysql,
            "sqlite" | "sqlite3" => EngineKind::Sqlite,
            "mongodb" | "mongodb+srv" => EngineKind::Mongodb,
            _ => return None,
        })
    }
    /// The engine `url` names, or the one "unknown scheme" error every
    /// connector and command reports.
    ///
    /// # Errors
    /// [`crate::EngineError::BadUrl`] listing the schemes kiln knows.
    pub fn parse(url: &str) -> Result<Self, crate::EngineError> {
        Self::of(url).ok_or_else(|| crate::EngineError::BadUrl { url: redact(url), message: UNKNOWN_SCHEME.into() })
    }

    /// The SQL dialect for splitting statements (generic for MongoDB).
    pub fn dialect(self) -> crate::split::Dialect {
        match self {
            EngineKind::Postgres => crate::split::Dialect::POSTGRES,
            EngineKind::Mysql => crate::split::Dialect::MYSQL,
            EngineKind::Sqlite => crate::split::Dialect::SQLITE,
            EngineKind::Mongodb => crate::split::Dialect::GENERIC,
        }
    }
}

/// What kiln says about a URL whose scheme names no engine.
pub const UNKNOWN_SCHEME: &str = "unknown scheme; use sqlite://, postgres://, mysql:// / mariadb://, mongodb:// or mongodb+srv://";

/// `url` with any password replaced by `***` (also `password=` query parameters).
/// Never fails: text that is not a URL is returned with nothing to redact.
pub fn redact(url: &str) -> String {
    match ::url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            if pairs.iter().any(|(k, _)| is_secret_key(k)) {
                let mut q = u.query_pairs_mut();
                q.clear();
                for (k, v) in &pairs {
                    q.append_pair(k, if is_secret_key(k) { "***" } else { v });
                }
            }
            u.to_string()
        }
        Err(_) => {
            // Not parseable: cut anything between "://" and "@".
            if let (Some(s), Some(at)) = (url.find("://"), url.rfind('@')) {
                if at > s {
                    return format!("{}://***@{}", &url[..s], &url[at + 1..]);
                }
            }
            url.to_string()
        }
    }
}

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k == "password" || k == "pass" || k == "pwd" || k.ends_with("secret") || k == "token"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("mysql://root@localhost/db?socket=/x"), "mysql://root@localhost/db?socket=/x");
        assert!(!redact("mongodb://a:b@h/db?password=zz").contains("zz"));
        assert!(!redact("weird://u:p@ss@host").contains("p@ss"));
        assert_eq!(EngineKind::of("mongodb+srv://x"), Some(EngineKind::Mongodb));
        assert_eq!(EngineKind::of("sqlite:x.db"), Some(EngineKind::Sqlite));
        assert_eq!(EngineKind::of("http://x"), None);
    }
}
