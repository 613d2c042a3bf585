//! The S3 backend: a repository under a prefix of a bucket in S3-compatible object storage.
//!
//! The [`super::Storage`] contract maps onto object storage like this:
//!
//! - `Commit::IfAbsent` is one conditional PUT (`If-None-Match: *`): of two archivers
//!   racing on a segment, the store accepts exactly one and answers the other
//!   `412 Precondition Failed`. These objects (WAL files, identities, manifests) are
//!   buffered in memory and sent in one request; nothing is visible until it is acknowledged.
//! - `Commit::Replace` objects (backup files) are streamed as a multipart upload, which the
//!   store shows only once completed; a writer dropped before committing aborts it. An
//!   upload cut short by a killed process stays invisible, and a lifecycle rule on the
//!   bucket ("abort incomplete multipart uploads after N days") reclaims its parts.
//! - Record logs are a base object plus one small object per appended record under
//!   `<log>.d/`; appends never rewrite anything, and a rewrite replaces the base with a
//!   conditional PUT (`If-Match` on its ETag) and then deletes the records it absorbed.
//! - Locks are lease objects under `locks/<name>/`, refreshed while held and considered
//!   abandoned when not refreshed for [`LEASE_STALE`].
//!
//! Reads are ranged GETs, so opening an object and reading its trailer costs two requests
//! whatever its size. Archiving or restoring one segment costs a bounded number of requests
//! whatever the size of the archive: nothing on those paths lists the bucket.
//!
//! Throttling, timeouts and server errors are retried with bounded exponential backoff by
//! the client, then reported as errors, never as an absent object. Credentials come from
//! the configuration file or `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN`, and are never logged; `AWS_ENDPOINT_URL` and `AWS_REGION` are read
//! too. No other `AWS_*` variable, and never an instance metadata service.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use chrono::Utc;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
    WriteMultipart,
};

use super::{
    validate_key, Commit, Committed, LockGuard, ObjectInfo, ObjectRead, ObjectWriter, RecordEdit,
    Storage,
};
use crate::config::S3Config;

/// Bytes fetched per ranged GET when reading sequentially.
const READ_CHUNK: u64 = 8 << 20;

/// Size of multipart upload parts.
const PART_SIZE: usize = 8 << 20;

/// Parts uploaded at once per object.
const PARTS_IN_FLIGHT: usize = 2;

/// A lease not refreshed for this long is considered abandoned.
const LEASE_STALE: Duration = Duration::from_secs(300);

/// How often a held lease is refreshed.
const LEASE_REFRESH: Duration = Duration::from_secs(60);

/// The client and the runtime that drives it.
struct Inner {
    store: AmazonS3,
    runtime: Option<tokio::runtime::Runtime>,
    bucket: String,
    prefix: String,
}

impl Inner {
    /// Runs a future to completion on the backend's runtime, from any thread: callers may
    /// themselves be inside another runtime (the backup drives PostgreSQL over tokio).
    fn block<T: Send, F: Future<Output = T> + Send>(&self, future: F) -> T {
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the storage");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| runtime.block_on(future))
                    .join()
                    .expect("S3 request thread panicked")
            })
        } else {
            runtime.block_on(future)
        }
    }

    fn path(&self, key: &str) -> Result<Path> {
        validate_key(key)?;
        Ok(Path::from(format!("{}{key}", self.prefix)))
    }

    /// The key of an object path, or `None` if it lies outside the repository prefix.
    fn key_of(&self, path: &Path) -> Option<String> {
        path.as_ref().strip_prefix(&self.prefix).map(str::to_string)
    }

    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    /// Every object under a key prefix (string prefix semantics, like the local backend).
    fn list(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>> {
        use futures_util::TryStreamExt;
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let base = format!("{}{dir}", self.prefix);
        let base = base.trim_end_matches('/');
        let listing: Vec<object_store::ObjectMeta> = self
            .block(async {
                let path = (!base.is_empty()).then(|| Path::from(base));
                self.store.list(path.as_ref()).try_collect().await
            })
            .with_context(|| format!("failed to list {}", self.location()))?;
        let full = format!("{}{prefix}", self.prefix);
        Ok(listing
            .into_iter()
            .filter(|m| m.location.as_ref().starts_with(&full))
            .collect())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A repository in an S3-compatible bucket.
#[derive(Clone)]
pub struct S3Storage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Storage({})", self.inner.location())
    }
}

fn not_found(err: &object_store::Error) -> bool {
    matches!(err, object_store::Error::NotFound { .. })
}

impl S3Storage {
    /// Storage for `s3://bucket/prefix`, configured from `config` and the `AWS_*`
    /// environment.
    pub fn new(url: &str, config: Option<&S3Config>) -> Result<S3Storage> {
        let rest = url
            .strip_prefix("s3://")
            .context("an S3 repository URL starts with s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("repository URL {url:?} names no bucket");
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).with_context(|| format!("invalid prefix in {url:?}"))?;
        }
        let default = S3Config::default();
        let config = config.unwrap_or(&default);
        // Static credentials only. Without them the client would fall back to asking an
        // instance metadata service, which is neither expected nor reachable here; say so
        // instead.
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let has_key = config.access_key_id.is_some() || env("AWS_ACCESS_KEY_ID").is_some();
        let has_secret =
            config.secret_access_key.is_some() || env("AWS_SECRET_ACCESS_KEY").is_some();
        if !has_key || !has_secret {
            bail!(
                "no credentials for {url}: set access_key_id and secret_access_key in the [s3] \
                 section of the config file, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            );
        }
        // Only the variables documented here are read, so that a stray AWS_* variable
        // (a session token meant for another account, say) cannot change the requests.
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                max_retries: config.max_retries.unwrap_or(5),
                retry_timeout: Duration::from_secs(config.retry_timeout_secs.unwrap_or(60)),
                ..RetryConfig::default()
            });
        let endpoint = config.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL"));
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder
            .with_virtual_hosted_style_request(!config.path_style.unwrap_or(endpoint.is_some()));
        let region = config
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        builder = builder.with_region(region.as_deref().unwrap_or("us-east-1"));
        // A key from the config file comes with its secret from there; a key from the
        // environment with its secret and, if set, its session token.
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(key), Some(secret)) => {
                builder = builder
                    .with_access_key_id(key)
                    .with_secret_access_key(secret);
            }
            _ => {
                let key = config
                    .access_key_id
                    .clone()
                    .or_else(|| env("AWS_ACCESS_KEY_ID"));
                let secret = config
                    .secret_access_key
                    .clone()
                    .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
                builder = builder
                    .with_access_key_id(key.unwrap_or_default())
                    .with_secret_access_key(secret.unwrap_or_default());
                if let Some(token) = env("AWS_SESSION_TOKEN") {
                    builder = builder.with_token(token);
                }
            }
        }
        if let Some(allow) = config.allow_http {
            builder = builder.with_allow_http(allow);
        }
        let store = builder
            .build()
            .with_context(|| format!("invalid S3 settings for {url}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("walkeep-s3")
            .enable_all()
            .build()
            .context("failed to start the S3 client runtime")?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(S3Storage {
            inner: Arc::new(Inner {
                store,
                runtime: Some(runtime),
                bucket: bucket.to_string(),
                prefix,
            }),
        })
    }

    fn log_base(&self, log: &str) -> Result<Path> {
        self.inner.path(log)
    }

    /// The base object of a record log and its version, if it exists.
    fn read_base(&self, log: &str) -> Result<(Vec<Vec<u8>>, Option<UpdateVersion>)> {
        let path = self.log_base(log)?;
        let inner = &self.inner;
        let got = inner.block(async {
            match inner.store.get(&path).await {
                Ok(result) => {
                    let version = UpdateVersion {
                        e_tag: result.meta.e_tag.clone(),
                        version: result.meta.version.clone(),
                    };
                    result.bytes().await.map(|b| Some((b, version)))
                }
                Err(e) if not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match got.with_context(|| format!("failed to read record log {log}"))? {
            Some((bytes, version)) => Ok((split_lines(&bytes), Some(version))),
            None => Ok((Vec::new(), None)),
        }
    }

    /// The appended records of a log, as (key, record), oldest first.
    fn read_deltas(&self, log: &str) -> Result<Vec<(Path, Vec<u8>)>> {
        let mut metas = self.inner.list(&format!("{log}.d/"))?;
        metas.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        let inner = &self.inner;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let bytes = inner.block(async {
                match inner.store.get(&meta.location).await {
                    Ok(r) => r.bytes().await.map(Some),
                    // Absorbed by a concurrent rewrite after the listing.
                    Err(e) if not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            });
            if let Some(bytes) =
                bytes.with_context(|| format!("failed to read {}", meta.location))?
            {
                out.push((meta.location, bytes.to_vec()));
            }
        }
        Ok(out)
    }
}

fn split_lines(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// A unique name for this process's objects (records, leases).
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{nanos:024}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    )
}

/// Reads an object with ranged GETs.
struct S3Reader {
    inner: Arc<Inner>,
    path: Path,
    size: u64,
    pos: u64,
    buffer: Bytes,
    buffer_start: u64,
}

impl Read for S3Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(0);
        }
        let buffer_end = self.buffer_start + self.buffer.len() as u64;
        if self.pos < self.buffer_start || self.pos >= buffer_end {
            let end = (self.pos + READ_CHUNK).min(self.size);
            let range = self.pos..end;
            let (inner, path) = (&self.inner, &self.path);
            let bytes = inner
                .block(async {
                    let options = GetOptions {
                        range: Some(GetRange::Bounded(range)),
                        ..Default::default()
                    };
                    inner.store.get_opts(path, options).await?.bytes().await
                })
                .map_err(io::Error::other)?;
            if bytes.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "object shrank while read",
                ));
            }
            self.buffer = bytes;
            self.buffer_start = self.pos;
        }
        let offset = (self.pos - self.buffer_start) as usize;
        let n = out.len().min(self.buffer.len() - offset);
        out[..n].copy_from_slice(&self.buffer[offset..offset + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for S3Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::End(n) => self.size as i128 + n as i128,
            SeekFrom::Current(n) => self.pos as i128 + n as i128,
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            ));
        }
        self.pos = target as u64;
        Ok(self.pos)
    }
}

/// An object being uploaded.
struct S3Writer {
    inner: Arc<Inner>,
    path: Path,
    mode: Commit,
    /// Content not yet handed to the upload.
    buffer: Vec<u8>,
    /// The multipart upload, once a replaceable object outgrows one part.
    upload: Option<WriteMultipart>,
}

impl S3Writer {
    fn start_upload(&mut self) -> io::Result<()> {
        let (inner, path) = (&self.inner, &self.path);
        let upload = inner
            .block(async { inner.store.put_multipart(path).await })
            .map_err(io::Error::other)?;
        self.upload = Some(WriteMultipart::new_with_chunk_size(upload, PART_SIZE));
        Ok(())
    }

    fn push_parts(&mut self) -> io::Result<()> {
        let inner = self.inner.clone();
        let upload = self.upload.as_mut().expect("upload started");
        let buffer = std::mem::take(&mut self.buffer);
        inner
            .block(async {
                upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                upload.write(&buffer);
                Ok::<_, object_store::Error>(())
            })
            .map_err(io::Error::other)
    }
}

impl Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        // A conditional create must be one request, so it stays in memory.
        if self.mode == Commit::Replace && self.buffer.len() >= PART_SIZE {
            if self.upload.is_none() {
                self.start_upload()?;
            }
            self.push_parts()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn commit(mut self: Box<Self>) -> Result<Committed> {
        let inner = self.inner.clone();
        let path = self.path.clone();
        if let Some(mut upload) = self.upload.take() {
            let rest = std::mem::take(&mut self.buffer);
            inner
                .block(async move {
                    upload.write(&rest);
                    upload.finish().await
                })
                .with_context(|| format!("failed to complete the upload of {path}"))?;
            return Ok(Committed::Created);
        }
        let payload = PutPayload::from(std::mem::take(&mut self.buffer));
        let mode = match self.mode {
            Commit::IfAbsent => PutMode::Create,
            Commit::Replace => PutMode::Overwrite,
        };
        let outcome = inner.block(async {
            inner
                .store
                .put_opts(
                    &path,
                    payload,
                    PutOptions {
                        mode,
                        ..Default::default()
                    },
                )
                .await
        });
        match outcome {
            Ok(_) => Ok(Committed::Created),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) if self.mode == Commit::IfAbsent => Ok(Committed::AlreadyExists),
            Err(e) => Err(e).with_context(|| format!("failed to upload {path}")),
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Not committed: abort the multipart upload so that its parts do not linger.
        if let Some(upload) = self.upload.take() {
            let inner = self.inner.clone();
            let _ = inner.block(async move { upload.abort().await });
        }
    }
}

/// A held lease; refreshed by a thread, deleted when dropped.
struct Lease {
    inner: Arc<Inner>,
    path: Path,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl LockGuard for Lease {}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.refresher.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        withdraw_lease(&self.inner, &self.path);
    }
}

/// Deletes a lease of this process; a failure is logged (the lease then blocks others
/// until it is stale).
fn withdraw_lease(inner: &Inner, path: &Path) {
    if let Err(e) = inner.block(async { inner.store.delete(path).await }) {
        if !not_found(&e) {
            tracing::warn!("failed to withdraw lock lease {path}: {e}");
        }
    }
}

impl S3Storage {
    fn put_lease(&self, path: &Path) -> Result<()> {
        let inner = &self.inner;
        let body = PutPayload::from(format!(
            "{{\"refreshed_at\":\"{}\"}}\n",
            Utc::now().to_rfc3339()
        ));
        inner
            .block(async { inner.store.put(path, body).await })
            .with_context(|| format!("failed to write lock lease {path}"))?;
        Ok(())
    }

    /// The leases under `locks/<name>/` other than `own` that are still live, as key names
    /// (`x-...` or `s-...`); `None` if the listing does not show `own` (written just
    /// before), so that it cannot be trusted to show the others either. Ages are measured
    /// on the server's clock, against the time it gave `own`, so a skewed local clock
    /// cannot make a live lease look abandoned.
    fn other_live_leases(&self, name: &str, own: &str) -> Result<Option<Vec<String>>> {
        let leases = self.inner.list(&format!("locks/{name}/"))?;
        let Some(server_now) = leases
            .iter()
            .find(|m| m.location.filename() == Some(own))
            .map(|m| m.last_modified)
        else {
            return Ok(None);
        };
        Ok(Some(
            leases
                .into_iter()
                .filter(|m| {
                    let age = server_now
                        .signed_duration_since(m.last_modified)
                        .to_std()
                        .unwrap_or_default();
                    age < LEASE_STALE
                })
                .filter_map(|m| m.location.filename().map(str::to_string))
                .filter(|l| l != own)
                .collect(),
        ))
    }
}

/// A pause of 250 to 1000 ms before trying for a lock again, different for each process
/// and attempt so that two that keep colliding drift apart.
fn lock_backoff(attempt: u32) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = (nanos ^ std::process::id().wrapping_mul(2_654_435_761) ^ attempt) % 750;
    Duration::from_millis(250 + u64::from(spread))
}

impl Storage for S3Storage {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn open(&self, key: &str) -> Result<Option<Box<dyn ObjectRead>>> {
        let path = self.inner.path(key)?;
        let inner = &self.inner;
        match inner.block(async { inner.store.head(&path).await }) {
            Ok(meta) => Ok(Some(Box::new(S3Reader {
                inner: self.inner.clone(),
                path,
                size: meta.size,
                pos: 0,
                buffer: Bytes::new(),
                buffer_start: 0,
            }))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("failed to open {key} in {}", self.location()))
            }
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        let path = self.inner.path(key)?;
        let inner = &self.inner;
        match inner.block(async { inner.store.head(&path).await }) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("failed to look up {key} in {}", self.location()))
            }
        }
    }

    fn sync(&self, _key: &str) -> Result<()> {
        Ok(())
    }

    // Known shortcoming: object_store 0.12 has no conditional multipart completion, so a
    // WAL object is uploaded in one conditional PUT from memory: up to a segment's size
    // (16 MiB by default, 1 GiB at most) for WAL that does not compress.
    fn buffers_conditional_creates(&self) -> bool {
        true
    }

    fn create(&self, key: &str, mode: Commit) -> Result<Box<dyn ObjectWriter>> {
        Ok(Box::new(S3Writer {
            inner: self.inner.clone(),
            path: self.inner.path(key)?,
            mode,
            buffer: Vec::new(),
            upload: None,
        }))
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.inner.path(key)?;
        let inner = &self.inner;
        match inner.block(async { inner.store.delete(&path).await }) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to delete {key}")),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out: Vec<ObjectInfo> = self
            .inner
            .list(prefix)?
            .into_iter()
            .filter_map(|m| {
                Some(ObjectInfo {
                    key: self.inner.key_of(&m.location)?,
                    size: m.size,
                })
            })
            // Record-log deltas and leases are bookkeeping, like the local backend's
            // hidden files; they are reached through their own calls.
            .filter(|o| !o.key.split('/').any(|part| part.ends_with(".d")))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        let names: BTreeSet<String> = self
            .inner
            .list(prefix)?
            .into_iter()
            .filter_map(|m| {
                let key = self.inner.key_of(&m.location)?;
                let rest = key.strip_prefix(prefix)?;
                rest.split('/').next().map(str::to_string)
            })
            .collect();
        Ok(names.into_iter().collect())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<()> {
        if !prefix.ends_with('/') {
            bail!("a prefix to delete ends with '/'");
        }
        for meta in self.inner.list(prefix)? {
            let inner = &self.inner;
            match inner.block(async { inner.store.delete(&meta.location).await }) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to delete {}", meta.location))
                }
            }
        }
        Ok(())
    }

    fn append_record(&self, log: &str, record: &[u8]) -> Result<()> {
        let path = self.inner.path(&format!("{log}.d/{}", unique_suffix()))?;
        let inner = &self.inner;
        let mut body = record.to_vec();
        body.push(b'\n');
        inner
            .block(async {
                let options = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                inner.store.put_opts(&path, body.into(), options).await
            })
            .with_context(|| format!("failed to append to record log {log}"))?;
        Ok(())
    }

    fn read_records(&self, log: &str) -> Result<Vec<Vec<u8>>> {
        let (mut records, _) = self.read_base(log)?;
        for (_, delta) in self.read_deltas(log)? {
            records.extend(split_lines(&delta));
        }
        Ok(records)
    }

    fn rewrite_records(&self, log: &str, edit: &mut RecordEdit<'_>) -> Result<()> {
        let base_path = self.log_base(log)?;
        for _attempt in 0..10 {
            let (mut records, version) = self.read_base(log)?;
            let deltas = self.read_deltas(log)?;
            for (_, delta) in &deltas {
                records.extend(split_lines(delta));
            }
            let mut content = Vec::new();
            for record in edit(records)? {
                content.extend_from_slice(&record);
                content.push(b'\n');
            }
            let mode = match version {
                Some(version) => PutMode::Update(version),
                None => PutMode::Create,
            };
            let inner = &self.inner;
            let put = inner.block(async {
                let options = PutOptions {
                    mode,
                    ..Default::default()
                };
                inner
                    .store
                    .put_opts(&base_path, content.into(), options)
                    .await
            });
            match put {
                Ok(_) => {}
                // Another rewrite won; read again and redo the edit.
                Err(
                    object_store::Error::Precondition { .. }
                    | object_store::Error::AlreadyExists { .. },
                ) => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to rewrite record log {log}"))
                }
            }
            for (path, _) in deltas {
                let _ = inner.block(async { inner.store.delete(&path).await });
            }
            return Ok(());
        }
        bail!("record log {log} kept changing under ten rewrites in a row")
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<Box<dyn LockGuard>> {
        validate_key(&format!("locks/{name}"))?;
        let kind = if exclusive { "x" } else { "s" };
        let own = format!("{kind}-{}", unique_suffix());
        let path = self.inner.path(&format!("locks/{name}/{own}"))?;
        // Write our lease first, then look: whoever of two conflicting takers lists second
        // sees the other's lease (it was written before the first one listed), so at most
        // one of them can find itself alone. One that is not alone withdraws and tries
        // again later; both may withdraw, never both hold.
        let mut attempt = 0;
        loop {
            self.put_lease(&path)?;
            let others = match self.other_live_leases(name, &own) {
                Ok(others) => others,
                Err(e) => {
                    withdraw_lease(&self.inner, &path);
                    return Err(e);
                }
            };
            let conflict =
                others.is_none_or(|others| others.iter().any(|l| exclusive || l.starts_with("x-")));
            if !conflict {
                break;
            }
            withdraw_lease(&self.inner, &path);
            if attempt == 0 {
                tracing::info!("waiting for lock {name} in {}", self.location());
            }
            attempt += 1;
            std::thread::sleep(lock_backoff(attempt));
        }
        // Known shortcoming: a holder that cannot refresh its lease for LEASE_STALE (the
        // store unreachable for five minutes) is not told; another process may then take
        // the lock while this one still works. Both would be failing against an
        // unreachable store, but nothing fences the late one.
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (storage, path, stop) = (self.clone(), path.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(LEASE_REFRESH);
                    if !stop.load(Ordering::Relaxed) {
                        if let Err(e) = storage.put_lease(&path) {
                            tracing::warn!("failed to refresh lock lease: {e:#}");
                        }
                    }
                }
            })
        };
        Ok(Box::new(Lease {
            inner: self.inner.clone(),
            path,
            stop,
            refresher: Some(refresher),
        }))
    }

    fn check_writable(&self) -> Result<()> {
        let path = self
            .inner
            .path(&format!("locks/write-check-{}", unique_suffix()))?;
        let inner = &self.inner;
        inner
            .block(async {
                inner
                    .store
                    .put(&path, PutPayload::from_static(b"walkeep write check\n"))
                    .await
            })
            .with_context(|| format!("repository {} is not writable", self.location()))?;
        let _ = inner.block(async { inner.store.delete(&path).await });
        Ok(())
    }
}
