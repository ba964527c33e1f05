//! From a file on disk to JavaScript QuickJS runs: TypeScript types stripped
//! (oxc's transformer, which also elides imports used only as types and
//! compiles `enum`s and parameter properties), and the module system told
//! apart (a file with `import`/`export` statements is an ES module, any other
//! is CommonJS, as Node.js decides for a file without a `type` field).
//!
//! The printed code has its own line numbers, so a TypeScript file keeps a
//! line map back to its source: errors name the line the user wrote.

use std::path::Path;

use oxc::allocator::Allocator;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{TransformOptions, Transformer};

/// How a module is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `import` / `export` statements: an ES module.
    Esm,
    /// `require` / `module.exports`: CommonJS.
    CommonJs,
    /// A `.json` file (CommonJS `require` only).
    Json,
}

/// A file ready to evaluate.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The module system.
    pub kind: ModuleKind,
    /// JavaScript source.
    pub code: String,
    /// For transformed files: for each printed line (0-based), the source line (1-based).
    pub lines: Option<Vec<u32>>,
}

/// A file that cannot be parsed: the line and the parser's message.
#[derive(Clone, Debug)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: u32,
    /// The parser's message.
    pub message: String,
}

fn line_of(text: &str, offset: usize) -> u32 {
    1 + text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() as u32
}

fn is_typescript(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("ts" | "mts" | "cts" | "tsx"))
}

/// Parse (and for TypeScript, transform) `text`, the content of `path`.
///
/// # Errors
/// The first syntax error, with its line.
pub fn load(path: &Path, text: &str) -> Result<Loaded, SyntaxError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "json" {
        return Ok(Loaded { kind: ModuleKind::Json, code: text.to_string(), lines: None });
    }
    // A shebang line is not JavaScript; blank it, keeping the line count.
    let text_owned;
    let text = if text.starts_with("#!") {
        let end = text.find('\n').unwrap_or(text.len());
        text_owned = format!("{}{}", " ".repeat(end), &text[end..]);
        text_owned.as_str()
    } else {
        text
    };
    let ts = is_typescript(path);
    let source_type = if ts {
        SourceType::ts().with_module(true)
    } else {
        match ext {
            "cjs" => SourceType::cjs(),
            _ => SourceType::mjs(),
        }
    };
    let alloc = Allocator::default();
    let parsed = Parser::new(&alloc, text, source_type).parse();
    if let Some(e) = parsed.errors.first() {
        let offset = e.labels.as_ref().and_then(|l| l.first()).map(|l| l.offset()).unwrap_or(0);
        return Err(SyntaxError { line: line_of(text, offset), message: e.message.to_string() });
    }
    let mut program = parsed.program;
    if !ts {
        let kind = if program.body.iter().any(|s| s.is_module_declaration()) || ext == "mjs" { ModuleKind::Esm } else { ModuleKind::CommonJs };
        return Ok(Loaded { kind, code: text.to_string(), lines: None });
    }
    let scoping = SemanticBuilder::new().build(&program).semantic.into_scoping();
    let options = TransformOptions::default();
    let result = Transformer::new(&alloc, path, &options).build_with_scoping(scoping, &mut program);
    if let Some(e) = result.errors.first() {
        let offset = e.labels.as_ref().and_then(|l| l.first()).map(|l| l.offset()).unwrap_or(0);
        return Err(SyntaxError { line: line_of(text, offset), message: e.message.to_string() });
    }
    // A file whose imports were all types keeps an `export {}` marker: it is
    // CommonJS (`module.exports = …`) all the same, as ts-node runs it.
    let kind = if program.body.iter().any(|s| s.is_module_declaration() && !is_empty_export(s)) { ModuleKind::Esm } else { ModuleKind::CommonJs };
    if kind == ModuleKind::CommonJs {
        program.body.retain(|s| !is_empty_export(s));
    }
    let printed =
        Codegen::new().with_options(CodegenOptions { source_map_path: Some(path.to_path_buf()), ..CodegenOptions::default() }).build(&program);
    let lines = printed.map.map(|map| {
        let count = printed.code.lines().count() + 1;
        let mut lines = vec![0u32; count];
        for token in map.get_tokens() {
            let dst = token.get_dst_line() as usize;
            if dst < lines.len() && lines[dst] == 0 {
                lines[dst] = token.get_src_line() + 1;
            }
        }
        // Lines without a token take the line before theirs.
        let mut last = 1;
        for l in lines.iter_mut() {
            if *l == 0 {
                *l = last;
            } else {
                last = *l;
            }
        }
        lines
    });
    Ok(Loaded { kind, code: printed.code, lines })
}

fn is_empty_export(s: &oxc::ast::ast::Statement<'_>) -> bool {
    matches!(s, oxc::ast::ast::Statement::ExportNamedDeclaration(e) if e.declaration.is_none() && e.specifiers.is_empty() && e.source.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typescript_types_are_stripped_and_lines_mapped() {
        let src = "import { Db } from 'mongodb';\n\ninterface X { a: number }\n\nexport async function up(db: Db): Promise<void> {\n  const n: number = 1 as number;\n  throw new Error('x' + n);\n}\n";
        let l = load(Path::new("a.ts"), src).unwrap();
        assert_eq!(l.kind, ModuleKind::Esm);
        assert!(!l.code.contains("interface") && !l.code.contains(": Db") && !l.code.contains("from \"mongodb\""), "{}", l.code);
        let lines = l.lines.unwrap();
        let throw_line = l.code.lines().position(|x| x.contains("throw")).unwrap();
        assert_eq!(lines[throw_line], 7);
    }

    #[test]
    fn commonjs_and_esm_are_told_apart() {
        assert_eq!(load(Path::new("a.js"), "module.exports = { up() {} };").unwrap().kind, ModuleKind::CommonJs);
        assert_eq!(load(Path::new("a.js"), "export const up = () => {};").unwrap().kind, ModuleKind::Esm);
        // TypeScript whose only import is a type is CommonJS once the import is gone.
        let l = load(Path::new("a.ts"), "import type { Db } from 'mongodb';\nmodule.exports = { async up(db: Db) {} };\n").unwrap();
        assert_eq!(l.kind, ModuleKind::CommonJs, "{}", l.code);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = load(Path::new("a.ts"), "const a = 1;\nconst b = ;\n").unwrap_err();
        assert_eq!(e.line, 2, "{e:?}");
    }
}
