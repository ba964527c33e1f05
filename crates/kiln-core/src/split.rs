//! Splitting SQL text into statements.
//!
//! kiln runs statements one at a time so a failure can name the statement and its
//! line. The splitter understands what makes a `;` not a terminator: quotes,
//! comments (including `;` inside comments), PostgreSQL dollar-quoted bodies
//! (`$$ … $$`, `$fn$ … $fn$`), and compound bodies of `CREATE PROCEDURE /
//! FUNCTION / TRIGGER / EVENT` written with `BEGIN … END` but without MySQL's
//! client-side `DELIMITER` (and SQLite triggers, PostgreSQL `BEGIN ATOMIC`).

use crate::model::Statement;

/// Lexical rules that differ between SQL dialects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    /// `$tag$ … $tag$` quoting (PostgreSQL).
    pub dollar_quotes: bool,
    /// Backslash escapes inside '…' and "…" strings (MySQL/MariaDB).
    pub backslash_escapes: bool,
    /// `#` starts a line comment (MySQL/MariaDB).
    pub hash_comments: bool,
    /// Backtick-quoted identifiers (MySQL/MariaDB, SQLite).
    pub backticks: bool,
    /// Nested `/* /* */ */` block comments (PostgreSQL).
    pub nested_comments: bool,
}

impl Dialect {
    /// PostgreSQL.
    pub const POSTGRES: Dialect =
        Dialect { dollar_quotes: true, backslash_escapes: false, hash_comments: false, backticks: false, nested_comments: true };
    /// MySQL and MariaDB.
    pub const MYSQL: Dialect =
        Dialect { dollar_quotes: false, backslash_escapes: true, hash_comments: true, backticks: true, nested_comments: false };
    /// SQLite.
    pub const SQLITE: Dialect =
        Dialect { dollar_quotes: false, backslash_escapes: false, hash_comments: false, backticks: true, nested_comments: false };
    /// A dialect that accepts the union of the rules that cannot misread
    /// another dialect's text; used to parse files before the engine is known.
    pub const GENERIC: Dialect =
        Dialect { dollar_quotes: true, backslash_escapes: false, hash_comments: false, backticks: true, nested_comments: false };
}

/// An error found while splitting (an unterminated quote or comment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitError {
    /// What is unterminated.
    pub message: String,
    /// 1-based line where it starts.
    pub line: usize,
}

/// Split `text` into statements. `first_line` is the 1-based line number of the
/// first line of `text` in its file, so statement lines refer to the file.
///
/// Statements that contain only comments and whitespace are dropped. The
/// terminating `;` is not part of the statement.
pub fn split_statements(text: &str, first_line: usize, d: Dialect) -> Result<Vec<Statement>, SplitError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = first_line;
    let mut start = 0;
    let mut start_line = first_line;
    let mut has_code = false;
    // Compound-body tracking for CREATE … BEGIN … END. Words are compared in
    // place, without allocating: this runs over every file on every `kiln up`.
    let mut words_seen: usize = 0; // words of the current statement so far
    let mut first_is_create = false;
    let mut depth: i32 = 0;
    let mut compound = false;
    let mut prev_end = false; // the previous word was END

    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'#' if d.hash_comments => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let open_line = line;
                let mut level = 1;
                i += 2;
                loop {
                    if i >= b.len() {
                        return Err(SplitError { message: "unterminated /* comment".into(), line: open_line });
                    }
                    if b[i] == b'\n' {
                        line += 1;
                        i += 1;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        level -= 1;
                        i += 2;
                        if level == 0 {
                            break;
                        }
                    } else if d.nested_comments && b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        level += 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
            b'\'' | b'"' | b'`' if c != b'`' || d.backticks => {
                has_code = true;
                let open_line = line;
                // PostgreSQL E'…' strings take backslash escapes.
                let escapes = d.backslash_escapes || (c == b'\'' && i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e') && (i < 2 || !is_word(b[i - 2])));
                i += 1;
                loop {
                    if i >= b.len() {
                        let what = match c {
                            b'\'' => "string",
                            b'"' => "quoted identifier",
                            _ => "backtick identifier",
                        };
                        return Err(SplitError { message: format!("unterminated {what}"), line: open_line });
                    }
                    let x = b[i];
                    if x == b'\n' {
                        line += 1;
                    }
                    if escapes && x == b'\\' && c != b'`' {
                        if b.get(i + 1) == Some(&b'\n') {
                            line += 1;
                        }
                        i += 2;
                        continue;
                    }
                    if x == c {
                        if b.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    i += 1;
                }
            }
            b'$' if d.dollar_quotes && (i == 0 || !is_word(b[i - 1])) => {
                // $tag$ where tag is empty or an identifier not starting with a digit.
                let mut j = i + 1;
                while j < b.len() && is_word(b[j]) {
                    j += 1;
                }
                let tag_ok = j < b.len() && b[j] == b'$' && !(j > i + 1 && b[i + 1].is_ascii_digit());
                if tag_ok {
                    has_code = true;
                    let tag = &text[i..=j];
                    let open_line = line;
                    let body_start = j + 1;
                    match text[body_start..].find(tag) {
                        Some(off) => {
                            let end = body_start + off + tag.len();
                            line += text[i..end].bytes().filter(|x| *x == b'\n').count();
                            i = end;
                        }
                        None => return Err(SplitError { message: format!("unterminated dollar-quoted string {tag}"), line: open_line }),
                    }
                } else {
                    has_code = true;
                    i += 1;
                }
            }
            b';' if depth <= 0 => {
                if has_code {
                    push_statement(&mut out, &text[start..i], start_line);
                }
                i += 1;
                start = i;
                start_line = line;
                has_code = false;
                words_seen = 0;
                first_is_create = false;
                depth = 0;
                compound = false;
                prev_end = false;
            }
            _ if is_word_start(c) => {
                has_code = true;
                let s = i;
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
                let w = &text[s..i];
                let is = |k: &str| w.eq_ignore_ascii_case(k);
                if words_seen < 8 {
                    if words_seen == 0 {
                        first_is_create = is("CREATE");
                    } else if first_is_create && !compound {
                        compound = is("PROCEDURE") || is("FUNCTION") || is("TRIGGER") || is("EVENT");
                    }
                    words_seen += 1;
                }
                if compound {
                    if is("BEGIN") || (is("CASE") && !prev_end) {
                        depth += 1;
                    } else if is("END") {
                        depth -= 1;
                    } else if prev_end && (is("IF") || is("LOOP") || is("WHILE") || is("REPEAT")) {
                        // `END IF`, `END LOOP`, … close blocks whose opener we do not count.
                        depth += 1;
                    }
                }
                prev_end = is("END");
            }
            _ => {
                if !c.is_ascii_whitespace() {
                    has_code = true;
                }
                i += 1;
            }
        }
    }
    if has_code {
        push_statement(&mut out, &text[start..], start_line);
    }
    Ok(out)
}

fn push_statement(out: &mut Vec<Statement>, raw: &str, raw_line: usize) {
    // Start the statement at its first non-blank line so lines in messages point at code.
    let mut line = raw_line;
    let mut rest = raw;
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t', '\r']);
        if let Some(after) = trimmed.strip_prefix('\n') {
            line += 1;
            rest = after;
        } else {
            break;
        }
    }
    let sql = rest.trim().to_string();
    if !sql.is_empty() {
        out.push(Statement { sql, line });
    }
}

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqls(text: &str, d: Dialect) -> Vec<String> {
        split_statements(text, 1, d).unwrap().into_iter().map(|s| s.sql).collect()
    }

    #[test]
    fn simple_and_lines() {
        let st = split_statements("create table a (id int);\n\n-- c\ninsert into a values (1);", 1, Dialect::POSTGRES).unwrap();
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].line, 1);
        assert_eq!(st[1].sql, "-- c\ninsert into a values (1)");
        assert_eq!(st[1].line, 3);
    }

    #[test]
    fn semicolons_in_comments_and_strings() {
        let t = "-- a; b\ninsert into t values ('x;y', \"q;\"); /* c; d */ select 1;";
        assert_eq!(sqls(t, Dialect::POSTGRES).len(), 2);
        let t = "# hash; comment\ninsert into t values ('it\\'s; fine');\nselect 2";
        assert_eq!(sqls(t, Dialect::MYSQL).len(), 2);
    }

    #[test]
    fn comment_only_is_dropped() {
        assert!(sqls("-- nothing here;\n/* ; */\n", Dialect::POSTGRES).is_empty());
    }

    #[test]
    fn dollar_quoted_function() {
        let t = r#"
CREATE FUNCTION touch() RETURNS trigger AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE FUNCTION f2() RETURNS int AS $body$ select 1; $body$ LANGUAGE sql;
CREATE TRIGGER t BEFORE UPDATE ON x FOR EACH ROW EXECUTE FUNCTION touch();
"#;
        let st = split_statements(t, 1, Dialect::POSTGRES).unwrap();
        assert_eq!(st.len(), 3, "{st:?}");
        assert_eq!(st[0].line, 2);
        assert_eq!(st[2].line, 9);
    }

    #[test]
    fn mysql_procedure_without_delimiter() {
        let t = r#"
CREATE PROCEDURE p(IN n INT)
BEGIN
  DECLARE i INT DEFAULT 0;
  WHILE i < n DO
    INSERT INTO t VALUES (i);
    SET i = i + 1;
  END WHILE;
  IF n > 10 THEN
    SELECT CASE WHEN n > 100 THEN 'big' ELSE 'small' END;
  END IF;
  CASE n WHEN 1 THEN SELECT 1; ELSE SELECT 2; END CASE;
END;
CALL p(3);
"#;
        let st = sqls(t, Dialect::MYSQL);
        assert_eq!(st.len(), 2, "{st:#?}");
        assert!(st[1].starts_with("CALL"));
    }

    #[test]
    fn sqlite_trigger() {
        let t = "CREATE TRIGGER tr AFTER INSERT ON a BEGIN INSERT INTO b VALUES (new.id); UPDATE c SET n = n + 1; END;\nselect 1;";
        assert_eq!(sqls(t, Dialect::SQLITE).len(), 2);
    }

    #[test]
    fn transaction_begin_is_not_compound() {
        let t = "BEGIN; create table a (id int); COMMIT;";
        assert_eq!(sqls(t, Dialect::POSTGRES).len(), 3);
    }

    #[test]
    fn unterminated_string_names_line() {
        let e = split_statements("select 1;\nselect 'oops;\n", 1, Dialect::POSTGRES).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("string"));
    }

    #[test]
    fn e_strings_and_positional_params() {
        let t = "select E'a\\';b'; select $1;";
        assert_eq!(sqls(t, Dialect::POSTGRES).len(), 2);
    }
}
