use super::*;
use crate::journal::testkit::*;
use crate::journal::{Accept, TaskPhase};

#[tokio::test]
async fn a_lazy_result_is_visible_at_once_and_flushed_soon_after() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (j, _) = open(&cfg);
    j.accept_running(&request("t")).await.unwrap();
    let before = j.commits();
    j.finish_lazily("t", &result("done")).await.unwrap();
    // Committed (without fsync, after waiting `HOLD` for company): readers see it at once.
    assert_eq!(j.commits(), before + 1);
    assert_eq!(j.get_blocking("t").unwrap().result, Some(result("done")));
    assert_eq!(j.get_blocking("t").unwrap().phase, TaskPhase::Done);
    // With nothing else to write, the writer makes a durable commit of its own.
    let deadline = std::time::Instant::now() + FLUSH_AFTER * 20;
    while j.commits() < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush within {:?}",
            FLUSH_AFTER * 20
        );
        tokio::time::sleep(FLUSH_AFTER / 4).await;
    }
    // And no more: an idle writer does not commit again.
    tokio::time::sleep(FLUSH_AFTER * 3).await;
    assert_eq!(j.commits(), before + 2);
    drop(j);
    let (j, recovery) = open(&cfg);
    assert_eq!(j.get_blocking("t").unwrap().result, Some(result("done")));
    assert!(recovery.running.is_empty(), "{:?}", recovery.running.len());
}

#[tokio::test]
async fn a_lazy_result_rides_the_next_acceptance_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (j, _) = open(&cfg);
    j.accept_running(&request("a")).await.unwrap();
    let before = j.commits();
    let (ra, rb, qb) = (result("a"), result("b"), request("b"));
    let (finished, accepted) = tokio::join!(j.finish_lazily("a", &ra), j.accept_running(&qb));
    finished.unwrap();
    assert_eq!(accepted.unwrap(), Accept::New);
    assert_eq!(j.commits(), before + 1, "one commit for both");
    assert_eq!(j.get_blocking("a").unwrap().phase, TaskPhase::Done);
    // That commit was durable: no flush follows.
    tokio::time::sleep(FLUSH_AFTER * 3).await;
    assert_eq!(j.commits(), before + 1);
    // An acknowledgement sent after the result is applied after it, even while both wait.
    let (finished, ()) = tokio::join!(j.finish_lazily("b", &rb), async {
        j.ack(&["b".to_string()])
    });
    finished.unwrap();
    assert!(j.get_blocking("b").unwrap().acked);
    assert_eq!(j.counts(), (2, 1));
    drop(j);
    let (j, _) = open(&cfg);
    assert!(j.get_blocking("b").unwrap().acked);
    assert_eq!(j.unacked_ids(), ["a"]);
}

#[tokio::test]
async fn a_failed_batch_loses_none_of_the_batches_logged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.log = true;
    let (j, _) = open(&cfg);
    // Logged, in the transaction the writer keeps open until the next checkpoint.
    for id in ["a", "b"] {
        assert_eq!(j.accept(&request(id)).await.unwrap(), Accept::New);
    }
    j.start("b").await.unwrap();
    j.finish("b", &result("b")).await.unwrap();
    // A batch that fails takes that transaction with it…
    j.inner.shared.fail_next_batch.store(true, Ordering::SeqCst);
    assert!(j.accept(&request("c")).await.is_err());
    // …and the next one reopens the file, which replays the log: nothing logged is lost,
    // nothing of the failed batch is there.
    assert_eq!(j.accept(&request("d")).await.unwrap(), Accept::New);
    assert_eq!(j.get_blocking("a").unwrap().phase, TaskPhase::Queued);
    assert_eq!(j.get_blocking("b").unwrap().result, Some(result("b")));
    assert!(j.get_blocking("c").is_none());
    assert_eq!(j.counts(), (3, 1));
    drop(j);
    let (j, recovery) = open(&cfg);
    let queued: Vec<&str> = recovery
        .queued
        .iter()
        .map(|r| r.request.task_id.as_str())
        .collect();
    assert_eq!(queued, ["a", "d"]);
    assert_eq!(j.unacked_ids(), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_accepts_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (j, _) = open(&cfg);
    let before = j.commits();
    let mut tasks = Vec::new();
    for worker in 0..100 {
        let j = j.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let id = format!("w{worker}-{i}");
                assert_eq!(j.accept(&request(&id)).await.unwrap(), Accept::New);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commits = j.commits() - before;
    assert_eq!(j.counts(), (2000, 0));
    assert!(commits < 2000, "{commits} commits for 2000 accepts");
    drop(j);
    let (_, recovery) = open(&cfg);
    assert_eq!(recovery.queued.len(), 2000);
}
