//! The write-ahead log in front of the redb file: a write is acknowledged once its record
//! is in the log and `fdatasync`ed, which is one small sequential write and one flush,
//! instead of a B-tree commit that rewrites pages all over the file.
//!
//! * **Two files**, `netsel.wal.0` and `netsel.wal.1`, zero-filled to a fixed size when
//!   created, so an append never changes file metadata and `fdatasync` flushes data only.
//!   The log fills one file, then the other; a file is reused only after the checkpointer
//!   has committed every record in it to redb.
//! * **Record:** `magic u32 | len u32 | seq u64 | crc32 u32 | payload`, little-endian; the
//!   CRC covers seq, len and payload; the payload is a JSON array of store batches. Sequence
//!   numbers increase by one per record for the life of the store.
//! * **Replay:** each file is read from its start while records are whole, intact and
//!   consecutive (a torn tail, zeroes, or a record left from an earlier round all end it);
//!   the records of both files newer than redb's `wal_seq` must then run on from it without
//!   a gap, or the store is refused as corrupt rather than silently losing a write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::Op;

/// The two log files in the data dir.
pub const WAL_FILES: [&str; 2] = ["netsel.wal.0", "netsel.wal.1"];
/// Size of each log file, by default.
pub const DEFAULT_WAL_FILE_BYTES: u64 = 16 << 20;
/// Largest payload one record carries; more batches make more records.
pub const MAX_RECORD_PAYLOAD: usize = 1 << 20;
/// Bytes before a record's payload.
pub const HEADER: usize = 20;
const MAGIC: u32 = u32::from_le_bytes(*b"NSWL");

fn crc(seq: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `out`.
pub fn encode(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("record payloads are capped far below 4 GiB");
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&crc(seq, len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The valid records at the start of one file's bytes, as (seq, payload).
pub fn scan(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out: Vec<(u64, &[u8])> = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let h = &bytes[at..at + HEADER];
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (magic, len) = (word(0), word(4));
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let sum = word(16);
        let Some(end) = (at + HEADER).checked_add(len as usize) else {
            break;
        };
        if magic != MAGIC || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + HEADER..end];
        if crc(seq, len, payload) != sum {
            break;
        }
        if let Some((prev, _)) = out.last()
            && seq != prev + 1
        {
            break;
        }
        out.push((seq, payload));
        at = end;
    }
    out
}

/// One decoded log record: its sequence number and the store batches it carries.
pub type Replayed = (u64, Vec<Vec<Op>>);

/// Every record newer than `after`, in order, decoded. `Err` says why the log cannot be
/// trusted (a gap, or a record whose payload does not decode).
pub fn replay(dir: &Path, after: u64) -> Result<Vec<Replayed>, String> {
    let mut found: Vec<Replayed> = Vec::new();
    for name in WAL_FILES {
        let path = dir.join(name);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f
                .read_to_end(&mut bytes)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        for (seq, payload) in scan(&bytes) {
            if seq <= after {
                continue;
            }
            let batches: Vec<Vec<Op>> = serde_json::from_slice(payload)
                .map_err(|e| format!("{}: record {seq} does not decode: {e}", path.display()))?;
            found.push((seq, batches));
        }
    }
    found.sort_by_key(|(seq, _)| *seq);
    for (expect, (seq, _)) in (after + 1..).zip(found.iter()) {
        if *seq != expect {
            return Err(format!(
                "the write-ahead log has records {expect}..{seq} missing (checkpoint at {after})"
            ));
        }
    }
    Ok(found)
}

/// The log being written: two preallocated files, one of them active.
#[derive(Debug)]
pub struct Wal {
    files: [File; 2],
    active: usize,
    pos: u64,
    file_bytes: u64,
    /// Highest sequence number written into each file.
    max_seq: [u64; 2],
}

impl Wal {
    /// Opens (creating and zero-filling as needed) both files in `dir`. Every record
    /// already in them must be checkpointed (`checkpointed` is the newest such seq): the
    /// log starts over at the beginning of file 0.
    pub fn open(dir: &Path, file_bytes: u64, checkpointed: u64) -> io::Result<Wal> {
        let open = |name: &str| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(dir.join(name))?;
            let have = f.metadata()?.len();
            if have < file_bytes {
                let zeros = vec![0u8; 1 << 20];
                let mut w = &f;
                let mut left = file_bytes - have;
                io::Seek::seek(&mut w, io::SeekFrom::Start(have))?;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    w.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                f.sync_all()?;
            }
            Ok(f)
        };
        let files = [open(WAL_FILES[0])?, open(WAL_FILES[1])?];
        File::open(dir)?.sync_all()?;
        Ok(Wal {
            files,
            active: 0,
            pos: 0,
            file_bytes,
            max_seq: [checkpointed; 2],
        })
    }

    /// Bytes of records in the active file.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether `len` more bytes fit in the active file.
    pub fn fits(&self, len: usize) -> bool {
        self.pos + len as u64 <= self.file_bytes
    }

    /// Whether a record of `len` bytes could ever fit in one file.
    pub fn can_hold(&self, len: usize) -> bool {
        len as u64 <= self.file_bytes
    }

    /// The newest record in the file a [`switch`](Self::switch) would reuse: it must be
    /// checkpointed first.
    pub fn other_max_seq(&self) -> u64 {
        self.max_seq[1 - self.active]
    }

    /// Continues in the other file, from its start.
    pub fn switch(&mut self) {
        self.active = 1 - self.active;
        self.pos = 0;
    }

    /// Writes framed records (ending with `last_seq`) at the end of the active file. Not
    /// durable until [`sync`](Self::sync).
    pub fn append(&mut self, records: &[u8], last_seq: u64) -> io::Result<()> {
        self.files[self.active].write_all_at(records, self.pos)?;
        self.pos += records.len() as u64;
        self.max_seq[self.active] = last_seq;
        Ok(())
    }

    /// Makes everything appended so far durable. (Records in the inactive file were
    /// synced before the switch.)
    pub fn sync(&self) -> io::Result<()> {
        self.files[self.active].sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InstanceId;

    fn payload(n: u64) -> Vec<u8> {
        serde_json::to_vec(&vec![vec![
            Op::DeleteInstance(InstanceId::from(format!("i{n}").as_str())),
            Op::SetIndex(n),
        ]])
        .unwrap()
    }

    fn file(seqs: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in seqs {
            encode(*s, &payload(*s), &mut out);
        }
        out
    }

    #[test]
    fn scan_reads_consecutive_intact_records_and_stops_at_the_first_bad_one() {
        let mut bytes = file(&[5, 6, 7]);
        let whole = bytes.len();
        bytes.extend_from_slice(&[0u8; 64]);
        assert_eq!(
            scan(&bytes).iter().map(|r| r.0).collect::<Vec<_>>(),
            [5, 6, 7]
        );
        // A torn last record: its payload is cut short.
        assert_eq!(scan(&bytes[..whole - 3]).len(), 2);
        // A flipped bit in the second record's payload ends the scan before it.
        let mut flipped = bytes.clone();
        let second = HEADER + payload(5).len() + HEADER + 2;
        flipped[second] ^= 0x40;
        assert_eq!(scan(&flipped).len(), 1);
        // A record left from an earlier round (out of sequence) ends it too.
        let mut reused = file(&[20, 21]);
        reused.extend_from_slice(&file(&[3, 4]));
        assert_eq!(
            scan(&reused).iter().map(|r| r.0).collect::<Vec<_>>(),
            [20, 21]
        );
        assert!(scan(&[0u8; 100]).is_empty());
        assert!(scan(&[]).is_empty());
    }

    #[test]
    fn replay_joins_both_files_and_refuses_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(WAL_FILES[0]), file(&[1, 2, 3])).unwrap();
        std::fs::write(dir.path().join(WAL_FILES[1]), file(&[4, 5])).unwrap();
        let got = replay(dir.path(), 2).unwrap();
        assert_eq!(got.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(got[0].1[0][1], Op::SetIndex(3));
        assert!(replay(dir.path(), 5).unwrap().is_empty());
        std::fs::write(dir.path().join(WAL_FILES[1]), file(&[5, 6])).unwrap();
        let err = replay(dir.path(), 2).unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn a_record_with_a_good_checksum_but_bad_payload_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        encode(1, b"not json", &mut bytes);
        std::fs::write(dir.path().join(WAL_FILES[0]), bytes).unwrap();
        assert!(
            replay(dir.path(), 0)
                .unwrap_err()
                .contains("does not decode")
        );
    }

    #[test]
    fn open_preallocates_and_appends_are_scanned_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::open(dir.path(), 4096, 0).unwrap();
        for name in WAL_FILES {
            assert_eq!(
                std::fs::metadata(dir.path().join(name)).unwrap().len(),
                4096
            );
        }
        let recs = file(&[1, 2]);
        assert!(wal.fits(recs.len()));
        wal.append(&recs, 2).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.other_max_seq(), 0);
        wal.switch();
        assert_eq!(wal.other_max_seq(), 2);
        let got = replay(dir.path(), 0).unwrap();
        assert_eq!(got.len(), 2);
        assert!(!wal.can_hold(4097));
    }
}
