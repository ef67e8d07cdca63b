//! Upgrading a database made by an earlier version: migrations that change data keep every row
//! that still matters. Each test applies the migrations up to a version, writes rows as that
//! version did, then opens the store (which applies the rest).

use seaport::store::Db;
use sqlx::migrate::Migrator;

/// The first migration after which the relay deletes published rows instead of marking them.
const DELETE_ON_PUBLISH: i64 = 20261126000007;

/// `m` with only the migrations before `version`.
fn up_to(mut m: Migrator, version: i64) -> Migrator {
    let before: Vec<_> = m.migrations.iter().filter(|x| x.version < version).cloned().collect();
    assert!(before.len() < m.migrations.len(), "migration {version} exists");
    m.migrations = before.into();
    m
}

/// Rows of the outbox as the relay before `DELETE_ON_PUBLISH` left them: two unpublished (one
/// with a failed attempt), one published.
const OLD_ROWS: &str = "INSERT INTO seaport_outbox
    (event_id, topic, ordering_key, partition, envelope, created_at, published_at, attempts, last_error)
    VALUES ('waiting', 't.a', 'k', 1, $1, 1, NULL, 0, NULL),
           ('failing', 't.a', 'k', 1, $1, 2, NULL, 3, 'refused'),
           ('done', 't.a', 'k', 1, $1, 3, 4, 1, NULL)";

async fn check_after_upgrade(db: &Db) {
    let rows: Vec<(String, i64, Option<String>)> = seaport::on_pool!(db, p => sqlx::query_as(
        "SELECT event_id, attempts, last_error FROM seaport_outbox ORDER BY seq",
    )
    .fetch_all(p)
    .await
    .unwrap());
    assert_eq!(
        rows,
        vec![
            ("waiting".to_owned(), 0, None),
            ("failing".to_owned(), 3, Some("refused".to_owned())),
        ],
        "unpublished rows are kept as they were; the published one is gone"
    );
    let status = seaport::outbox::status(db).await.unwrap();
    assert_eq!((status.unpublished, status.failing), (2, 1));
}

#[tokio::test]
async fn published_outbox_rows_go_and_unpublished_ones_stay_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    up_to(seaport::store::sqlite::migrator(), DELETE_ON_PUBLISH)
        .run(&pool)
        .await
        .unwrap();
    sqlx::query(OLD_ROWS).bind(b"{}".to_vec()).execute(&pool).await.unwrap();
    pool.close().await;

    let db = Db::open(&path.display().to_string()).await.unwrap();
    check_after_upgrade(&db).await;
    db.close().await;
}

#[tokio::test]
async fn published_outbox_rows_go_and_unpublished_ones_stay_on_postgres() {
    let url = seaport::testing::fresh_pg_database().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    up_to(seaport::store::postgres::migrator(), DELETE_ON_PUBLISH)
        .run(&pool)
        .await
        .unwrap();
    sqlx::query(OLD_ROWS).bind(b"{}".to_vec()).execute(&pool).await.unwrap();
    pool.close().await;

    let db = Db::open(&url).await.unwrap();
    check_after_upgrade(&db).await;
    db.close().await;
    seaport::testing::remove_pg_and_stream(Some(&url), "UNUSED_UPGRADE_STREAM").await;
}
