// Re-embed migrations when a file is added to them (sqlx::migrate! cannot see new files).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
