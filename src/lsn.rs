//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in the write-ahead log. PostgreSQL prints it as two
//! hexadecimal halves separated by a slash (`16/B374D848`); this type parses and prints
//! exactly that form so that values can be pasted between `psql` and walkeep.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in the write-ahead log, as PostgreSQL's `pg_lsn`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// The text given was not an LSN of the form `X/X`.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 0/16B3748")]
pub struct ParseLsnError(String);

impl Lsn {
    /// The segment number holding this position, for a WAL segment size in bytes.
    pub fn segment_number(self, wal_segment_size: u64) -> u64 {
        self.0 / wal_segment_size
    }

    /// The offset of this position inside its segment.
    pub fn segment_offset(self, wal_segment_size: u64) -> u64 {
        self.0 % wal_segment_size
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let valid =
            |h: &str| !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_postgres_form() {
        let cases = [
            ("0/0", 0u64),
            ("0/16B3748", 0x16B3748),
            ("16/B374D848", 0x16_B374_D848),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ];
        for (text, value) in cases {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.0, value, "{text}");
            assert_eq!(lsn.to_string(), text);
        }
    }

    #[test]
    fn rejects_malformed() {
        for text in ["", "0", "/1", "1/", "0/G", "100000000/0", "1/2/3", "0x1/0"] {
            assert!(text.parse::<Lsn>().is_err(), "{text:?} should be rejected");
        }
    }

    #[test]
    fn segment_arithmetic() {
        let lsn: Lsn = "1/2000010".parse().unwrap();
        let size = 16 * 1024 * 1024;
        assert_eq!(lsn.segment_number(size), 0x102);
        assert_eq!(lsn.segment_offset(size), 0x10);
    }
}
