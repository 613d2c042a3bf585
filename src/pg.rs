//! Talking to a running PostgreSQL server.
//!
//! Connections follow libpq's conventions as far as tokio-postgres allows: a conninfo
//! string or `postgresql://` URI, with anything it leaves out taken from `PGHOST`,
//! `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE` and `PGCONNECT_TIMEOUT`, then the
//! password file (`PGPASSFILE` or `~/.pgpass`, looked up for the first host), and finally
//! libpq's defaults (the Unix socket in `/var/run/postgresql` or `/tmp`, port 5432, the OS
//! user name, a database named like the user).
//!
//! Not supported yet: TLS (`sslmode=require` and above fail to connect rather than
//! falling back to plain text); use a socket, `peer`, or a password over a trusted network.

mod pgpass;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// The directories libpq looks for the server's socket in when no host is given.
const DEFAULT_SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];

/// Builds a connection configuration from `conninfo` plus the `PG*` environment and the
/// password file.
pub fn config(conninfo: Option<&str>) -> Result<Config> {
    let mut config: Config = match conninfo {
        Some(text) if !text.trim().is_empty() => text
            .parse()
            .with_context(|| format!("invalid connection string {text:?}"))?,
        _ => Config::new(),
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(hosts) => {
                for host in hosts.split(',') {
                    config.host(host);
                }
            }
            None => {
                let socket_dir = DEFAULT_SOCKET_DIRS
                    .into_iter()
                    .find(|d| Path::new(d).is_dir())
                    .unwrap_or("/tmp");
                config.host_path(socket_dir);
            }
        }
    }
    if config.get_ports().is_empty() {
        if let Some(port) = env("PGPORT") {
            config.port(
                port.parse()
                    .with_context(|| format!("invalid PGPORT {port:?}"))?,
            );
        }
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(os_user_name)
            .context("cannot tell which user to connect as; set PGUSER")?;
        config.user(&user);
    }
    if config.get_password().is_none() {
        if let Some(password) = env("PGPASSWORD") {
            config.password(password);
        }
    }
    if config.get_dbname().is_none() {
        let dbname = env("PGDATABASE").or_else(|| config.get_user().map(str::to_string));
        if let Some(dbname) = dbname {
            config.dbname(&dbname);
        }
    }
    if config.get_password().is_none() {
        if let Some(password) = password_from_file(&config) {
            config.password(password);
        }
    }
    if config.get_connect_timeout().is_none() {
        let secs = env("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        config.connect_timeout(Duration::from_secs(secs));
    }
    if config.get_application_name().is_none() {
        config.application_name("walkeep");
    }
    Ok(config)
}

/// The password file's password for the first host of `config`. A connection through a
/// default socket directory is looked up as `localhost`, as libpq does.
fn password_from_file(config: &Config) -> Option<String> {
    let path = pgpass::default_path()?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(name) => name.clone(),
        Host::Unix(dir) if DEFAULT_SOCKET_DIRS.iter().any(|d| dir == Path::new(d)) => {
            "localhost".to_string()
        }
        Host::Unix(dir) => dir.display().to_string(),
    };
    let lookup = pgpass::Lookup {
        host: &host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        database: config.get_dbname()?,
        user: config.get_user()?,
    };
    pgpass::password(&path, lookup)
}

fn os_user_name() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Describes where a configuration points, for messages (no password).
pub fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "host={host} port={port} user={} dbname={}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

/// Connects, spawning the connection task on the current runtime.
pub async fn connect(conninfo: Option<&str>) -> Result<Client> {
    let config = config(conninfo)?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("failed to connect to PostgreSQL ({})", describe(&config)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection closed: {e}");
        }
    });
    Ok(client)
}

/// The server's major version (`server_version_num / 10000`).
pub async fn major_version(client: &Client) -> Result<u32> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    let num: i32 = row.get(0);
    let major = (num / 10000) as u32;
    if major < 12 {
        bail!("PostgreSQL {major} is not supported (12 and later are)");
    }
    Ok(major)
}

/// The server's system identifier.
pub async fn system_identifier(client: &Client) -> Result<u64> {
    let row = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .context("failed to read the system identifier")?;
    let text: String = row.get(0);
    text.parse()
        .with_context(|| format!("unexpected system identifier {text:?}"))
}
