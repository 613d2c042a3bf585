//! A small bounded worker pool for file-at-a-time work (backup and restore).
//!
//! Memory stays bounded by the number of workers: each handles one file at a time and
//! streams it in fixed-size chunks. The first error stops the other workers at their next
//! item and is returned.

use std::collections::VecDeque;
use std::sync::Mutex;

use anyhow::Result;

/// Runs `work` on every item with at most `jobs` threads; returns the results of the
/// items for which `work` returned `Some`, in no particular order.
pub fn map<T, R, F>(items: Vec<T>, jobs: usize, work: F) -> Result<Vec<R>>
where
    T: Send,
    R: Send,
    F: Fn(T) -> Result<Option<R>> + Sync,
{
    let queue = Mutex::new(VecDeque::from(items));
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..jobs.max(1))
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let Some(item) = queue.lock().unwrap().pop_front() else {
                            return Ok(());
                        };
                        match work(item) {
                            Ok(Some(result)) => results.lock().unwrap().push(result),
                            Ok(None) => {}
                            Err(e) => {
                                queue.lock().unwrap().clear();
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        let mut first_error = None;
        for worker in workers {
            let outcome = worker
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")));
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })?;
    Ok(results.into_inner().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_every_item_and_stops_on_error() {
        let mut out = map((0..100).collect(), 4, |i| Ok((i % 2 == 0).then_some(i))).unwrap();
        out.sort_unstable();
        assert_eq!(out, (0..100).step_by(2).collect::<Vec<_>>());
        let err = map((0..100).collect(), 3, |i: i32| {
            if i == 7 {
                anyhow::bail!("item 7 failed")
            }
            Ok(Some(i))
        });
        assert_eq!(err.unwrap_err().to_string(), "item 7 failed");
    }
}
