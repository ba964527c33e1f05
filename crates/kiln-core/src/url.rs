//! Database URLs: which engine a URL names, and keeping its password out of
//! every message.
//!
//! The design decision: passwords are removed by the URL's *structure*, never
//! by searching for the password's text. A URL as users write it is often not
//! a valid URL (no scheme, a missing `//`, reserved characters such as `@`, `/`
//! or `#` left unescaped in the password), so [`redact`] does not rely on a URL
//! parser: everything between the start of the authority and the **last** `@`
//! is the user information, and only the user name before its first `:` is
//! kept. Over-redacting a strange URL is fine; printing a password is not.
//! [`DbUrl`] carries a URL whose `Display` and `Debug` are redacted, and
//! [`scrub_text`] / [`DbUrl::scrub`] clean third-party text (driver errors)
//! that may quote a URL.

use std::fmt;

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
    pub fn of(url: impl AsRef<str>) -> Option<Self> {
        let scheme = url.as_ref().split(':').next()?.to_ascii_lowercase();
        Self::of_scheme(&scheme)
    }

    fn of_scheme(scheme: &str) -> Option<Self> {
        Some(match scheme {
            "postgres" | "postgresql" => EngineKind::Postgres,
            "mysql" | "mariadb" => EngineKind::Mysql,
            "sqlite" | "sqlite3" => EngineKind::Sqlite,
            "mongodb" | "mongodb+srv" => EngineKind::Mongodb,
            _ => return None,
        })
    }

    /// The engine `url` names, or the one "unknown scheme" error every
    /// connector and command reports. A server URL must have `//` after its
    /// scheme (`postgres:user:pw@host/db` is refused: drivers would read the
    /// user information as a path and repeat it in their errors).
    ///
    /// # Errors
    /// [`crate::EngineError::BadUrl`] listing the schemes kiln knows, or
    /// saying that `//` is missing.
    pub fn parse(url: impl AsRef<str>) -> Result<Self, crate::EngineError> {
        let url = url.as_ref();
        let kind = Self::of(url).ok_or_else(|| crate::EngineError::BadUrl { url: redact(url), message: UNKNOWN_SCHEME.into() })?;
        let scheme_len = url.find(':').unwrap_or(0);
        if kind != EngineKind::Sqlite && !url[scheme_len..].starts_with("://") {
            let scheme = url[..scheme_len].to_ascii_lowercase();
            return Err(crate::EngineError::BadUrl {
                url: redact(url),
                message: format!("`//` is missing after `{scheme}:`; a server URL starts with {scheme}://"),
            });
        }
        if kind != EngineKind::Sqlite && at_after_host(url) {
            // A driver would split such a URL elsewhere than kiln does, and
            // quote pieces of the password as a host or a port in its errors.
            return Err(crate::EngineError::BadUrl {
                url: redact(url),
                message: "the URL has an `@` after its host: percent-encode `@`, `/`, `?` and `#` in the password (%40, %2F, %3F, %23) and `@` in parameters (%40)"
                    .into(),
            });
        }
        Ok(kind)
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

/// The longest URL (after redaction) that messages show; longer ones are cut.
const MAX_SHOWN: usize = 200;

/// A database URL that may hold a password. `Display` and `Debug` show it
/// redacted ([`redact`]); [`DbUrl::expose`] gives the URL itself, for
/// connecting only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DbUrl(String);

impl DbUrl {
    /// Wrap `url`.
    pub fn new(url: impl Into<String>) -> Self {
        DbUrl(url.into())
    }

    /// The URL as written, password included: pass it to a driver, never to a message.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***` (see [`redact`]).
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }

    /// Whether the URL holds a password (in its user information, by the
    /// structural rule of [`redact`]).
    pub fn has_password(&self) -> bool {
        Parts::of(&self.0).password.is_some()
    }

    /// Refuse a query parameter that is not in `known` — the one rule of
    /// every SQL engine (a misspelt `sslmode` must not be ignored).
    ///
    /// # Errors
    /// [`crate::EngineError::BadUrl`] naming the parameter and listing `known`.
    pub fn check_params(&self, engine: &str, known: &[&str]) -> Result<(), crate::EngineError> {
        let Some(query) = Parts::of(&self.0).query else { return Ok(()) };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if !known.contains(&key) {
                return Err(crate::EngineError::BadUrl {
                    url: self.redacted(),
                    message: format!("unknown parameter `{}` for {engine}; known parameters: {}", crate::error::cap(key, 60), known.join(", ")),
                });
            }
        }
        Ok(())
    }

    /// The engine the URL names, if any.
    pub fn engine(&self) -> Option<EngineKind> {
        EngineKind::of(&self.0)
    }

    /// `text` (a driver's error message) with this URL and its password
    /// removed: every URL-like word is redacted by structure ([`scrub_text`]),
    /// and the password itself (as written and percent-decoded) is replaced
    /// wherever it still appears, when it is long enough (4 characters or more)
    /// that replacing it cannot garble the message.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = if self.0.is_empty() { text.to_string() } else { text.replace(&self.0, &self.redacted()) };
        for secret in self.secrets() {
            if secret.chars().count() >= 4 {
                out = out.replace(&secret, "***");
            }
        }
        scrub_text(&out)
    }

    /// The password as written and percent-decoded, plus secret query values.
    fn secrets(&self) -> Vec<String> {
        let parts = Parts::of(&self.0);
        let mut out = Vec::new();
        if let Some(p) = parts.password {
            out.push(p.to_string());
            out.push(percent_decode(p));
        }
        if let Some(q) = parts.query {
            for pair in q.split('&') {
                if let Some((k, v)) = pair.split_once('=') {
                    if is_secret_key(k) && !v.is_empty() {
                        out.push(v.to_string());
                        out.push(percent_decode(v));
                    }
                }
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out.dedup();
        out
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl From<String> for DbUrl {
    fn from(s: String) -> Self {
        DbUrl(s)
    }
}

impl From<&str> for DbUrl {
    fn from(s: &str) -> Self {
        DbUrl(s.to_string())
    }
}

impl From<&String> for DbUrl {
    fn from(s: &String) -> Self {
        DbUrl(s.clone())
    }
}

/// For the functions that only look at the scheme ([`EngineKind::of`]).
impl AsRef<str> for DbUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A URL cut into the pieces redaction needs, without validating it.
struct Parts<'a> {
    /// `scheme://`, `scheme:` (a known scheme without `//`) or empty.
    prefix: &'a str,
    /// User information before the last `@`, if there is an `@`.
    user: Option<&'a str>,
    /// Everything after the user name's first `:`, up to the last `@`.
    password: Option<&'a str>,
    /// Host, path (everything after the last `@`, or after the prefix), without the query.
    rest: &'a str,
    /// After the first `?` of `rest`.
    query: Option<&'a str>,
}

impl<'a> Parts<'a> {
    fn of(url: &'a str) -> Parts<'a> {
        let prefix_len = scheme_prefix_len(url);
        let (prefix, after) = url.split_at(prefix_len);
        let (user, password, host) = match after.rfind('@') {
            Some(at) => {
                let info = &after[..at];
                match info.split_once(':') {
                    Some((u, p)) => (Some(u), Some(p), &after[at + 1..]),
                    None => (Some(info), None, &after[at + 1..]),
                }
            }
            None => (None, None, after),
        };
        let (rest, query) = match host.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (host, None),
        };
        Parts { prefix, user, password, rest, query }
    }
}

/// Whether an `@` follows the end of the host part as the URL standard reads
/// it (the first `/`, `?` or `#` after `//`): a password with those characters
/// unescaped, which kiln and the drivers would read differently.
fn at_after_host(url: &str) -> bool {
    let rest = &url[scheme_prefix_len(url)..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[end..].contains('@')
}

/// Length of `scheme://`, or of `scheme:` when it is a scheme kiln knows
/// (`postgres:user:pw@host`), else 0 (`user:pw@host` has no scheme).
fn scheme_prefix_len(url: &str) -> usize {
    let is_scheme = |s: &str| {
        !s.is_empty() && s.starts_with(|c: char| c.is_ascii_alphabetic()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    };
    if let Some(p) = url.find("://") {
        if is_scheme(&url[..p]) {
            return p + 3;
        }
    }
    match url.find(':') {
        Some(p) if EngineKind::of_scheme(&url[..p].to_ascii_lowercase()).is_some() => p + 1,
        _ => 0,
    }
}

/// A SQLite URL split into its scheme prefix as written (`sqlite://`,
/// `sqlite:`, `sqlite3://`, `sqlite3:`), the path (`:memory:` included) and
/// the query after `?`; `None` for any other URL.
pub fn sqlite_parts(url: &str) -> Option<(&str, &str, Option<&str>)> {
    let lower = url.to_ascii_lowercase();
    let prefix = ["sqlite3://", "sqlite://", "sqlite3:", "sqlite:"].into_iter().find(|p| lower.starts_with(p))?;
    let rest = &url[prefix.len()..];
    let (path, query) = rest.split_once('?').map_or((rest, None), |(p, q)| (p, Some(q)));
    Some((&url[..prefix.len()], path, query))
}

/// `url` with any password replaced by `***` (also the values of `password=`,
/// `token=`, `…secret=` query parameters), cut to a few hundred characters.
/// Works on anything: text that is not a URL keeps only what cannot be a
/// password. See the module documentation for the rule.
pub fn redact(url: &str) -> String {
    crate::error::cap(&redact_uncapped(url), MAX_SHOWN)
}

fn redact_uncapped(url: &str) -> String {
    let p = Parts::of(url);
    let mut out = String::with_capacity(url.len());
    out.push_str(p.prefix);
    if let Some(user) = p.user {
        out.push_str(user);
        if p.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
    }
    out.push_str(p.rest);
    if let Some(q) = p.query {
        out.push('?');
        out.push_str(&redact_pairs(q));
    }
    out
}

/// Free text (a driver's or a parser's error message) with every word that
/// looks like credentials redacted by structure: in each word holding an `@`,
/// the user information before its last `@` keeps only the user name
/// (`postgres://u:***@h`, `u:***@h`); `password=…`-style values become `***`.
/// Words are separated by white space and quotes, never by characters a
/// password may contain unescaped (`/`, `:`, `@`, `#`, `?`, `%`).
pub fn scrub_text(text: &str) -> String {
    let is_sep = |c: char| c.is_whitespace() || "\"'`".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut word_start = None;
    for (i, c) in text.char_indices() {
        if is_sep(c) {
            if let Some(s) = word_start.take() {
                out.push_str(&scrub_word(&text[s..i]));
            }
            out.push(c);
        } else if word_start.is_none() {
            word_start = Some(i);
        }
    }
    if let Some(s) = word_start {
        out.push_str(&scrub_word(&text[s..]));
    }
    out
}

fn scrub_word(word: &str) -> String {
    if word.contains('@') || word.contains("://") {
        // Keep what precedes the URL in the word (`(postgres://…`, `url=postgres://…`).
        let start = match word.find("://") {
            // Past the last character that cannot be in a scheme (which may be multi-byte).
            Some(p) => {
                word[..p].char_indices().rev().find(|(_, c)| !(c.is_ascii_alphanumeric() || "+-.".contains(*c))).map_or(0, |(q, c)| q + c.len_utf8())
            }
            None => 0,
        };
        let p = Parts::of(&word[start..]);
        let secret_query = p.query.is_some_and(|q| q.split('&').any(|kv| kv.split_once('=').is_some_and(|(k, _)| is_secret_key(k))));
        if p.password.is_none() && !secret_query {
            return word.to_string();
        }
        return format!("{}{}", &word[..start], redact_uncapped(&word[start..]));
    }
    if word.contains('=') {
        return redact_pairs(word);
    }
    word.to_string()
}

/// `a=1&password=x` with secret values replaced.
fn redact_pairs(q: &str) -> String {
    let pairs: Vec<String> = q
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if is_secret_key(k.rsplit(['?', '(', '[', '{', ',', ';']).next().unwrap_or(k)) => format!("{k}=***"),
            _ => pair.to_string(),
        })
        .collect();
    pairs.join("&")
}

fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k == "pass" || k == "pwd" || ["password", "passwd", "secret", "token"].iter().any(|w| k.contains(w))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multibyte_character_before_the_scheme_separator_does_not_panic() {
        // Found by the fault harness: `kiln --url 'mysqlé://roo' status` exited 101.
        for text in ["mysqlé://roo", "é://u:pw@h/db", "xé://u:pw@h/db and more", "(ü://a:b@c)"] {
            let out = scrub_text(text);
            assert!(!out.contains("pw@") && !out.contains(":b@"), "{text} -> {out}");
        }
    }

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

    /// The URLs of issue 9.5 that printed their passwords.
    #[test]
    fn odd_urls_never_show_the_password() {
        let pw = "Sup3rS3cret";
        for url in [
            format!("user:{pw}@host/db"),
            format!("postgres:user:{pw}@host/db"),
            format!("sqlite://user:{pw}@/tmp/x.db"),
            format!("postgres://user:{pw}@host/db?sslmode=disable"),
            format!("mongodb://user:p@ss:w/rd%?#{pw}@host/db"),
            format!("mysql://user:{pw}@host:3306"),
            format!("postgres://user:{pw}/x@host/db"),
            format!("postgres://host/db?password={pw}"),
            format!("postgres://host/db?user=u&password={pw}&x=1"),
        ] {
            let r = redact(&url);
            assert!(!r.contains(pw), "{url} -> {r}");
            assert!(!r.contains("ss:w"), "{url} -> {r}");
            let d = DbUrl::new(url.clone());
            assert!(!format!("{d} {d:?}").contains(pw), "{url}");
            let quoted = format!("error: cannot open \"{url}\": no such file ({url})");
            assert!(!scrub_text(&quoted).contains(pw), "{}", scrub_text(&quoted));
            assert!(!d.scrub(&quoted).contains(pw), "{}", d.scrub(&quoted));
        }
        assert_eq!(redact("user:pw@host/db"), "user:***@host/db");
        assert_eq!(redact("postgres:user:pw@host/db"), "postgres:user:***@host/db");
        assert_eq!(redact("mongodb://user:p@ss:w/rd%?#@host/db"), "mongodb://user:***@host/db");
        assert_eq!(redact("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(redact("sqlite://kiln.db"), "sqlite://kiln.db");
    }

    #[test]
    fn the_password_itself_is_scrubbed_only_when_long_enough() {
        let d = DbUrl::new("mongodb://user:p@ss:w/rd%?#@host/db");
        // A driver that decoded the password and quotes it alone.
        assert_eq!(d.scrub("bad password p@ss:w/rd%?#, try again"), "bad password ***, try again");
        // A one-letter password is not searched for: it would garble the text.
        let d = DbUrl::new("postgres://u:p@h/db");
        assert_eq!(d.scrub("pool exhausted"), "pool exhausted");
        assert_eq!(d.scrub("cannot reach postgres://u:p@h/db"), "cannot reach postgres://u:***@h/db");
    }

    #[test]
    fn secret_looking_pairs_are_scrubbed_in_free_text() {
        assert_eq!(scrub_text("bad line DB_PASSWORD=x1 and api_token=y2 ok=1"), "bad line DB_PASSWORD=*** and api_token=*** ok=1");
    }

    #[test]
    fn long_values_are_cut() {
        let r = redact(&format!("postgres://h/{}", "x".repeat(10_000)));
        assert!(r.len() < 300 && r.contains("bytes in all"), "{r}");
    }

    #[test]
    fn a_missing_double_slash_is_refused() {
        let e = EngineKind::parse("postgres:user:pw@host/db").unwrap_err().to_string();
        assert!(e.contains("`//` is missing") && !e.contains("pw@"), "{e}");
        let e = EngineKind::parse("mongodb://user:p@ss:w/rd%?#@host/db").unwrap_err().to_string();
        assert!(e.contains("percent-encode") && !e.contains("ss:w"), "{e}");
        assert!(EngineKind::parse("mongodb://user:p%40ss%3Aw%2Frd%25%3F%23@host/db").is_ok());
        assert!(EngineKind::parse("sqlite:///data/backup@2024.db").is_ok());
        assert!(EngineKind::parse("sqlite:kiln.db").is_ok());
        let e = EngineKind::parse("user:pw@host/db").unwrap_err().to_string();
        assert!(e.contains("unknown scheme") && !e.contains(":pw"), "{e}");
    }
}
