//! Connecting to Redis with bounded waits and errors that say what to do.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::queue::QueueError;

/// How long a connection attempt may take before it is an error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Names a PEM file of the CA that `rediss://` servers are verified
/// against; without it, the web PKI roots are used.
pub const CA_ENV: &str = "QSWEEP_REDIS_CA";
/// XAUTOCLAIM, which takes over a dead worker's tasks, arrived in Redis 6.2.
pub const MIN_VERSION: (u32, u32) = (6, 2);

/// Why Redis cannot be used, each with its one fix.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error(
        "{url} is not a Redis URL: {message}\n  fix: use redis://[user:password@]host:port[/db] or rediss:// for TLS"
    )]
    BadUrl { url: String, message: String },
    #[error("cannot reach Redis at {url} within {}s: {message}\n  fix: check that redis-server runs there and the port is open", CONNECT_TIMEOUT.as_secs())]
    Unreachable { url: String, message: String },
    #[error("the TLS certificate of Redis at {url} cannot be verified: {message}\n  fix: if a private CA signed it, point QSWEEP_REDIS_CA at that CA's PEM file")]
    Certificate { url: String, message: String },
    #[error("Redis at {url} refused the credentials: {message}\n  fix: put the right password (or ACL user and password) in the URL: redis://user:password@host:port")]
    Auth { url: String, message: String },
    #[error("Redis at {url} is version {found}; qsweep needs {}.{} or later (for XAUTOCLAIM)\n  fix: upgrade Redis", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { url: String, found: String },
    #[error("Redis command failed: {0}")]
    Command(#[from] redis::RedisError),
}

impl From<RedisError> for QueueError {
    fn from(error: RedisError) -> Self {
        QueueError::Backend(Box::new(error))
    }
}

/// A failed command on an established connection, which the connection
/// manager reconnects: the coordinator waits and tries again.
impl From<redis::RedisError> for QueueError {
    fn from(error: redis::RedisError) -> Self {
        RedisError::Command(error).into()
    }
}

/// Connects, authenticates (from the URL) and checks the server version.
/// Reconnects happen inside the connection manager afterwards, so a Redis
/// restart is survived.
pub async fn connect(url: &str) -> Result<ConnectionManager, RedisError> {
    let shown = redact(url);
    // The client's own message may quote the URL.
    let bad_url = |message: String| RedisError::BadUrl { url: shown.clone(), message: message.replace(url, &shown) };
    let client = match std::env::var_os(CA_ENV) {
        // A private CA for rediss://, e.g. a cluster's own.
        Some(ca) => {
            let pem = std::fs::read(&ca)
                .map_err(|e| bad_url(format!("cannot read {CA_ENV}={}: {e}", ca.to_string_lossy())))?;
            redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
        }
        None => redis::Client::open(url),
    }
    .map_err(|e| bad_url(e.to_string()))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, ConnectionManager::new_with_config(client, config))
        .await
        .map_err(|_| RedisError::Unreachable { url: shown.clone(), message: "timed out".into() })?
        .map_err(|e| classify(&shown, e))?;
    let mut probe = connection.clone();
    let info: String =
        redis::cmd("INFO").arg("server").query_async(&mut probe).await.map_err(|e| classify(&shown, e))?;
    let version = info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("0.0.0").trim().to_string();
    if !version_at_least(&version, MIN_VERSION) {
        return Err(RedisError::TooOld { url: shown, found: version });
    }
    Ok(connection)
}

fn classify(url: &str, error: redis::RedisError) -> RedisError {
    let message = error.to_string();
    let auth = error.kind() == redis::ErrorKind::AuthenticationFailed;
    if message.contains("certificate") {
        RedisError::Certificate { url: url.to_string(), message }
    } else if auth || message.contains("WRONGPASS") || message.contains("NOAUTH") {
        RedisError::Auth { url: url.to_string(), message }
    } else if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
    {
        RedisError::Unreachable { url: url.to_string(), message }
    } else {
        RedisError::Command(error)
    }
}

/// Whether "major.minor.patch" is at least `minimum`.
pub fn version_at_least(version: &str, minimum: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= minimum
}

/// The URL with any password replaced, for messages and logs. Everything
/// before the last `@` may hold one, however malformed the URL
/// (`redis:/:pw@host` has no `://` to find), so that part is hidden but for
/// a well-formed user name.
pub fn redact(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_string();
    };
    match url.find("://").map(|scheme| scheme + 3).filter(|&start| start <= at) {
        Some(start) => {
            let credentials = &url[start..at];
            let hidden = match credentials.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_string(),
            };
            format!("{}{hidden}{}", &url[..start], &url[at..])
        }
        None => format!("***{}", &url[at..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("redis://:s3cret@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(redact("rediss://alice:s3cret@host"), "rediss://alice:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("redis:/:s3cret@host"), "***@host");
        assert_eq!(redact("s3cret@host"), "***@host");
        assert_eq!(redact("redis://a:b@c:s3cret@host"), "redis://a:***@host");
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("7.0.15", (6, 2)));
        assert!(version_at_least("6.2.0", (6, 2)));
        assert!(!version_at_least("6.0.20", (6, 2)));
        assert!(!version_at_least("5.10.1", (6, 2)));
    }
}
