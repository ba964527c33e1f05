//! kiln-macros: `embed_migrations!`, re-exported as `kiln::embed_migrations!`.
//!
//! The design decision to know: the macro validates the directory with
//! kiln-core's own loader ([`kiln_core::source::embed_check`]) while the
//! program compiles, so a file kiln would refuse at run time is a compile
//! error naming its file and line, and it embeds the bytes with
//! `include_bytes!`, so editing a migration rebuilds the program. At run time
//! the same loader reads the embedded bytes (`kiln_core::source::load_embedded`):
//! same migrations, same checksums as the directory on disk.

use std::path::{Path, PathBuf};

use kiln_core::split::Dialect;
use kiln_core::LoadOptions;
use proc_macro::TokenStream;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::{Ident, LitStr, Token};

/// Embed a migrations directory in the program, validated at compile time.
///
/// ```ignore
/// static MIGRATIONS: kiln::Embedded = kiln::embed_migrations!("migrations");
/// kiln::Kiln::new(url).embedded(MIGRATIONS).up().await?;
/// ```
///
/// The path is relative to the crate's `Cargo.toml` (`CARGO_MANIFEST_DIR`).
/// Options, after the path: `dialect = "postgres" | "mysql" | "sqlite"` (how
/// SQL is split while validating; default: the dialect kiln uses before it
/// knows the engine) and `name_rule = "REGEX"` (the naming rule, as
/// `name_rule` in kiln.toml). At run time the migrations are parsed again for
/// the engine of the URL.
///
/// A file changed since the last build rebuilds the program; a file *added*
/// is seen only when the crate rebuilds — add a `build.rs` with
/// `println!("cargo:rerun-if-changed=migrations");` to make that automatic.
#[proc_macro]
pub fn embed_migrations(input: TokenStream) -> TokenStream {
    let args = syn::parse_macro_input!(input as Args);
    match expand(&args) {
        Ok(t) => t.into(),
        Err(message) => syn::Error::new(args.dir.span(), message).to_compile_error().into(),
    }
}

struct Args {
    dir: LitStr,
    dialect: Option<LitStr>,
    name_rule: Option<LitStr>,
}

impl Parse for Args {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let dir: LitStr = input.parse()?;
        let mut args = Args { dir, dialect: None, name_rule: None };
        while input.peek(Token![,]) {
            input.parse::<Token![,]>()?;
            if input.is_empty() {
                break;
            }
            let key: Ident = input.parse()?;
            input.parse::<Token![=]>()?;
            let value: LitStr = input.parse()?;
            match key.to_string().as_str() {
                "dialect" => args.dialect = Some(value),
                "name_rule" => args.name_rule = Some(value),
                other => return Err(syn::Error::new(key.span(), format!("unknown option `{other}`: expected `dialect` or `name_rule`"))),
            }
        }
        Ok(args)
    }
}

fn expand(args: &Args) -> Result<proc_macro2::TokenStream, String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").map_err(|_| "CARGO_MANIFEST_DIR is not set; build with cargo".to_string())?;
    let written = args.dir.value();
    let dir = Path::new(&manifest).join(&written);
    let dialect = match args.dialect.as_ref().map(LitStr::value).as_deref() {
        None => Dialect::GENERIC,
        Some("postgres" | "postgresql") => Dialect::POSTGRES,
        Some("mysql" | "mariadb") => Dialect::MYSQL,
        Some("sqlite") => Dialect::SQLITE,
        Some(other) => return Err(format!("unknown dialect `{other}`: expected \"postgres\", \"mysql\" or \"sqlite\"")),
    };
    let opts = LoadOptions { dialect, name_rule: args.name_rule.as_ref().map(LitStr::value) };
    let files = kiln_core::source::embed_check(&dir, &written, &opts)?;
    let entries = files.iter().map(|rel| {
        let path = rel.to_string_lossy().replace('\\', "/");
        let abs: PathBuf = dir.join(rel);
        let abs = abs.to_string_lossy().into_owned();
        quote! { ::kiln::EmbeddedFile { path: #path, bytes: ::core::include_bytes!(#abs) } }
    });
    Ok(quote! {
        {
            static FILES: &[::kiln::EmbeddedFile] = &[ #(#entries),* ];
            ::kiln::Embedded::new(#written, FILES)
        }
    })
}
