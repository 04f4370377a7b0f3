//! Every bound of the wire protocol, in one place. Units last in the names.

/// The largest frame body (version byte plus encoded message) a node sends or accepts.
/// 4 MiB: room for a full batch of small events or one event near the value limit, small enough
/// that a hostile peer cannot make a node allocate much.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Bytes before the body: a big-endian `u32` body length, then the protocol version byte, which
/// counts as the first byte of the body.
pub const FRAME_LENGTH_BYTES: usize = 4;

/// The longest key. Redis allows far more; keys this long are a mistake in practice.
pub const KEY_BYTES_MAX: usize = 64 * 1024;

/// The largest value (a string, a set member, a hash field or its value) one command may write.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;

/// The most events in one batch. 1,024 events of ~100 bytes fill ~100 KiB: large enough to
/// amortise per-frame costs, small enough to keep one peer from hogging a stream.
pub const BATCH_EVENTS_MAX: usize = 1024;

/// The most entries in a version vector: one per origin that ever wrote (nodes of the cluster).
pub const VECTOR_ENTRIES_MAX: usize = 1024;

/// The largest sequence number an event or a vector may carry: half of `u64`'s range, which no
/// region reaches (a million writes a second for 290,000 years), so that the next number after
/// any accepted one is always there.
pub const SEQ_MAX: u64 = u64::MAX / 2;

/// The most origins one subscription may ask a peer for.
pub const SUBSCRIBE_ORIGINS_MAX: usize = VECTOR_ENTRIES_MAX;

/// The most keys in one snapshot chunk.
pub const SNAPSHOT_CHUNK_KEYS_MAX: usize = 1024;

/// About how many bytes of keys and states a snapshot chunk carries before it is sent (a single
/// key's state may go past it, up to the frame limit).
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1024 * 1024;

/// The largest encoded state of one key a snapshot carries (its `SnapshotEntry`, key
/// included). A key whose state does not fit a frame goes in `SnapshotKeyPart`s; a key past
/// this cannot be sent in a snapshot, and the snapshot fails with a message naming it.
pub const SNAPSHOT_KEY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The bytes of one `SnapshotKeyPart`.
pub const SNAPSHOT_PART_BYTES_MAX: usize = 1024 * 1024;

/// The longest human-readable text in an error message.
pub const ERROR_TEXT_BYTES_MAX: usize = 1024;

// One event with the largest key and value must fit in a frame with room for its metadata.
const _: () = assert!(KEY_BYTES_MAX + VALUE_BYTES_MAX + 4096 <= FRAME_BYTES_MAX);
// A key's state as clients may grow it fits a snapshot twice over (room for a second region's
// adds made at the same time).
const _: () = assert!(2 * braid_conflict::KEY_STATE_BYTES_MAX <= SNAPSHOT_KEY_BYTES_MAX);
// A key part, with its message's few bytes of head, fits a frame.
const _: () = assert!(SNAPSHOT_PART_BYTES_MAX + 64 <= FRAME_BYTES_MAX);
// The body length must fit the length prefix.
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
