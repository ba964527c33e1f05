// Rebuild when a migration file is added or removed (an edited file already
// rebuilds: embed_migrations! embeds it with include_bytes!).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
