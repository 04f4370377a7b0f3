//! Equality of short byte strings, for the keys the apply path looks up.
//!
//! Keys are mostly a few bytes long, and a lookup compares one or a few of them: `==` on slices
//! calls the C library's `memcmp` for every pair, which costs more than the comparison. Up to 16
//! bytes are compared here in line, as one or two words from each end (overlapping when the
//! length is not a multiple of the word).

/// Whether `a` and `b` hold the same bytes: in words, in line, for up to 16 bytes; by `==` on
/// slices past that.
#[inline]
pub(crate) fn short_bytes_eq(a: &[u8], b: &[u8]) -> bool {
    fn word(bytes: &[u8], at: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_ne_bytes(word)
    }
    fn half(bytes: &[u8], at: usize) -> u32 {
        let mut half = [0u8; 4];
        half.copy_from_slice(&bytes[at..at + 4]);
        u32::from_ne_bytes(half)
    }
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::short_bytes_eq;
    use proptest::prelude::*;

    proptest! {
        /// Equal to `==` on slices, for every length the word comparisons cover and past them,
        /// and for pairs that differ in one byte anywhere (the case words could miss).
        #[test]
        fn short_bytes_eq_is_slice_equality(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            prop_assert!(short_bytes_eq(&a, &a.clone()));
            if !a.is_empty() {
                let mut b = a.clone();
                b[flip.index(a.len())] ^= 1 << bit;
                prop_assert!(!short_bytes_eq(&a, &b));
                prop_assert!(!short_bytes_eq(&a, &a[..a.len() - 1]));
            }
        }
    }
}
