//! A linear pre-scan of YAML and JSON text that refuses deep nesting before
//! a parser sees it: the YAML parser takes quadratic time on deeply nested
//! flow collections (50,000 levels of `{a:` took 15 s), and nothing kiln reads
//! (migrations, `schema.yaml`, index declarations) needs more than a few
//! levels.

/// The deepest nesting kiln reads in a YAML or JSON file. A MongoDB command
/// with a pipeline and nested operators stays far below it.
pub const MAX_NESTING: usize = 64;

/// Where `text` first nests deeper than allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooDeep {
    /// 1-based line of the opening that goes too deep.
    pub line: usize,
    /// The limit.
    pub max: usize,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nested more than {} levels deep; kiln reads at most {} levels of lists and mappings", self.max, self.max)
    }
}

/// Check that YAML or JSON `text` nests at most `max` levels: flow
/// collections (`{`, `[`) outside quoted strings and comments, block
/// collections by indentation, and compact sequences (`- - - x`) counted
/// together. Linear in the size of the text; it does not validate anything
/// else (the parser does that afterwards).
///
/// # Errors
/// [`TooDeep`] naming the line where the nesting passes `max`.
pub fn check_nesting(text: &str, max: usize) -> Result<(), TooDeep> {
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    let mut line = 1usize;
    let mut in_double = false;
    let mut in_single = false;
    let mut escaped = false;
    let mut comment = false;
    let mut at_line_start = true;
    let mut indent = 0usize;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            comment = false;
            at_line_start = true;
            indent = 0;
            prev = c;
            // A YAML quoted scalar may span lines; a JSON string may not, but
            // then the parser reports it.
            continue;
        }
        if comment {
            continue;
        }
        if in_double {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_double = false;
            }
            prev = c;
            continue;
        }
        if in_single {
            // `''` inside a single-quoted scalar closes and reopens: same result.
            if c == '\'' {
                in_single = false;
            }
            prev = c;
            continue;
        }
        if at_line_start {
            if c == ' ' {
                indent += 1;
                continue;
            }
            at_line_start = false;
            if flow == 0 && c != '#' {
                // Block nesting: one level per deeper indentation still open,
                // plus compact `- - -` sequences on this line.
                while indents.last().is_some_and(|&i| i >= indent) {
                    indents.pop();
                }
                indents.push(indent);
                let mut compact = 0;
                if c == '-' {
                    let mut look = chars.clone();
                    let mut dash = true;
                    while dash && matches!(look.peek(), Some(' ') | Some('\t')) {
                        compact += 1;
                        while matches!(look.peek(), Some(' ') | Some('\t')) {
                            look.next();
                        }
                        dash = look.peek() == Some(&'-');
                        if dash {
                            look.next();
                        }
                    }
                }
                if indents.len() + compact > max {
                    return Err(TooDeep { line, max });
                }
            }
        }
        match c {
            '#' if prev.is_whitespace() => comment = true,
            '"' if flow > 0 || !prev.is_alphanumeric() => in_double = true,
            '\'' if flow > 0 || !prev.is_alphanumeric() => in_single = true,
            '{' | '[' => {
                flow += 1;
                if flow + indents.len() > max {
                    return Err(TooDeep { line, max });
                }
            }
            '}' | ']' => flow = flow.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_files_pass() {
        let y = "up:\n  - createIndexes: users\n    indexes:\n      - key: { a: 1, 'b.c': -1 }\n        name: \"x{[\"\n  # a comment with [[[[\ndown: []\n";
        assert_eq!(check_nesting(y, 8), Ok(()));
        assert_eq!(check_nesting(r#"{"up": [{"insert": "a", "documents": [{"s": "[[[["}]}]}"#, 8), Ok(()));
        assert_eq!(check_nesting("it's: fine\n", 2), Ok(()));
    }

    #[test]
    fn deep_nesting_is_found_fast_with_its_line() {
        let flow = "up:\n  - ".to_string() + &"{a: ".repeat(50_000);
        let t = std::time::Instant::now();
        assert_eq!(check_nesting(&flow, MAX_NESTING), Err(TooDeep { line: 2, max: MAX_NESTING }));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let json = "[".repeat(100_000);
        assert_eq!(check_nesting(&json, MAX_NESTING).unwrap_err().line, 1);
        let compact = "- ".repeat(1000) + "x\n";
        assert!(check_nesting(&compact, MAX_NESTING).is_err());
        let block: String = (0..100).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert_eq!(check_nesting(&block, MAX_NESTING).unwrap_err().line, MAX_NESTING + 1);
    }
}
