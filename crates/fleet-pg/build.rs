//! Rebuilds the crate when a migration is added or changed: `embed_migrations!` reads the
//! folder while compiling, and cargo would not otherwise look at it.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
