//! One coordinator per sweep: a lease in Redis, renewed while the
//! coordinator lives.
//!
//! Two coordinators walking one sweep would queue every task twice and
//! measure latencies under each other's load. The lease is a key that
//! names its holder (host, PID, start) and expires unless renewed, so:
//! - a second coordinator exits at once, naming the holder;
//! - a coordinator that died loses the lease when it expires, and a
//!   restart takes over; if the dead one ran on this host, at once (its
//!   process is provably gone), otherwise once the holder has been seen
//!   not to renew and the lease has run out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::Keys;
use crate::owner::Owner;
use crate::queue::QueueError;
use crate::store::unix_now;

/// How long a lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often the holder renews it.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What the lease key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub owner: Owner,
    pub since_unix: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (since unix time {})", self.owner, self.since_unix)
    }
}

/// Renews the lease only if it is still ours; 1 if renewed.
const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Deletes the lease only if it still holds `ARGV[1]`.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A held lease, renewed in the background until released or dropped.
pub struct Lease {
    connection: ConnectionManager,
    key: String,
    value: String,
    /// Set by the renewer if another coordinator holds the lease now.
    lost: Arc<Mutex<Option<String>>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Takes the sweep's lease, or fails naming the live coordinator that
    /// holds it.
    pub async fn acquire(mut connection: ConnectionManager, keys: &Keys, sweep: &str) -> Result<Self, QueueError> {
        let key = keys.coordinator(sweep);
        let value = serde_json::to_string(&Holder { owner: Owner::current(), since_unix: unix_now() })
            .expect("a holder serializes");
        loop {
            if take(&mut connection, &key, &value).await? {
                break;
            }
            let Some(held) = connection.get::<_, Option<String>>(&key).await? else { continue };
            let holder: Option<Holder> = serde_json::from_str(&held).ok();
            match &holder {
                // Its process has ended: the lease is free now.
                Some(h) if h.owner.is_gone_from_this_host() => {
                    let _: i64 = redis::Script::new(RELEASE).key(&key).arg(&held).invoke_async(&mut connection).await?;
                }
                Some(h) if h.owner.is_this_host() => return Err(busy(sweep, h)),
                _ => {
                    if renewed_within(&mut connection, &key, &held).await? {
                        return Err(match holder {
                            Some(h) => busy(sweep, &h),
                            None => QueueError::Fatal(format!("sweep {sweep} is held by another coordinator")),
                        });
                    }
                    // Not renewed: its holder is gone; wait out the rest of it.
                    let left: i64 = connection.pttl(&key).await?;
                    tokio::time::sleep(Duration::from_millis(left.max(0) as u64 + 50)).await;
                }
            }
        }
        let lost = Arc::new(Mutex::new(None));
        let renewer = tokio::spawn(renew(connection.clone(), key.clone(), value.clone(), lost.clone()));
        Ok(Self { connection, key, value, lost, renewer })
    }

    /// Fails once another coordinator has taken the sweep over (this one
    /// was paused past its lease, or Redis lost it).
    pub fn check(&self) -> Result<(), QueueError> {
        match self.lost.lock().expect("the lease flag is never poisoned").as_ref() {
            Some(holder) => Err(QueueError::Fatal(format!(
                "this coordinator lost its lease on the sweep to {holder}, which now runs it; stopping"
            ))),
            None => Ok(()),
        }
    }

    /// Gives the lease up, so the next coordinator need not wait for it.
    pub async fn release(mut self) {
        self.renewer.abort();
        let released: Result<i64, _> =
            redis::Script::new(RELEASE).key(&self.key).arg(&self.value).invoke_async(&mut self.connection).await;
        if let Err(e) = released {
            tracing::warn!("cannot release the coordinator lease (it expires by itself): {e}");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Who holds the sweep's lease now, for `qsweep status`.
pub async fn holder(
    connection: &mut ConnectionManager,
    keys: &Keys,
    sweep: &str,
) -> Result<Option<Holder>, QueueError> {
    let held: Option<String> = connection.get(keys.coordinator(sweep)).await?;
    Ok(held.and_then(|h| serde_json::from_str(&h).ok()))
}

fn busy(sweep: &str, holder: &Holder) -> QueueError {
    QueueError::Fatal(format!(
        "sweep {sweep} is already being run by the coordinator {holder}\n  \
         fix: wait for it to finish, watch it with `qsweep status {sweep}`, or stop it (Ctrl-C, or `qsweep cancel {sweep}`)"
    ))
}

/// Whether the lease holding `held` is renewed (or changes hands) within
/// a renewal period and a margin: the mark of a live holder elsewhere.
async fn renewed_within(connection: &mut ConnectionManager, key: &str, held: &str) -> Result<bool, QueueError> {
    let deadline = tokio::time::Instant::now() + RENEW_EVERY + Duration::from_secs(1);
    let mut last: i64 = connection.pttl(key).await?;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now: Option<String> = connection.get(key).await?;
        let left: i64 = connection.pttl(key).await?;
        match now {
            None => return Ok(false),
            Some(value) if value != held => return Ok(true),
            Some(_) if left > last => return Ok(true),
            Some(_) => last = left,
        }
    }
    Ok(false)
}

/// Takes the lease if no one holds it.
async fn take(connection: &mut ConnectionManager, key: &str, value: &str) -> Result<bool, redis::RedisError> {
    let taken: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(LEASE.as_millis() as u64)
        .query_async(connection)
        .await?;
    Ok(taken.is_some())
}

async fn renew(mut connection: ConnectionManager, key: String, value: String, lost: Arc<Mutex<Option<String>>>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let renewed: Result<i64, _> = redis::Script::new(RENEW)
            .key(&key)
            .arg(&value)
            .arg(LEASE.as_millis() as u64)
            .invoke_async(&mut connection)
            .await;
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                // Gone (Redis restarted without it) or someone else's now.
                if let Ok(false) = take(&mut connection, &key, &value).await {
                    let held: Option<String> = connection.get(&key).await.unwrap_or(None);
                    let holder = held.and_then(|h| serde_json::from_str::<Holder>(&h).ok());
                    *lost.lock().expect("the lease flag is never poisoned") =
                        Some(holder.map_or("another coordinator".to_string(), |h| h.to_string()));
                    return;
                }
            }
            Err(e) => tracing::warn!("cannot renew the coordinator lease: {e}; retrying"),
        }
    }
}
