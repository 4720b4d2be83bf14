//! The alert store conformance suite on a real PostgreSQL, each test in its own database.

use std::sync::Arc;

use fleet_core::SystemClock;
use fleet_pg::testing::TestDb;

fleet_alerts::alert_store_conformance_tests!(|| async {
    let db = TestDb::create().await;
    let store = db.store(Arc::new(SystemClock)).await;
    let registry = store.clone();
    (db, store, registry)
});
