//! Key names and values shared by the load test, the prefill and the wrk scripts in `bench/`.
//!
//! Values are derived from their key so that a read can tell whether it got back the value
//! of the key it asked for, not merely some value.

use rand::Rng;

/// Name of the key with index `index`; `bench/wrk/*.lua` formats keys the same way.
pub fn key_name(index: u64) -> String {
    format!("key-{index:08}")
}

/// Picks a key index uniformly from `0..keyspace` (a keyspace of 0 is treated as 1).
pub fn choose_key<R: Rng + ?Sized>(rng: &mut R, keyspace: u64) -> u64 {
    rng.random_range(0..keyspace.max(1))
}

const FILLER: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

/// The value written for `key`: `key|` followed by filler, exactly `size` bytes long.
///
/// The filler is rotated by a hash of the key so that values of different keys differ
/// throughout, not only in their first bytes; it stays ASCII so the demo API can carry it
/// in a JSON string.
pub fn make_value(key: &str, size: usize) -> String {
    let offset = key
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
    let mut value = String::with_capacity(size);
    value.push_str(key);
    value.push('|');
    value.truncate(size);
    let start = value.len();
    value.extend((start..size).map(|i| FILLER[(i.wrapping_add(offset)) % FILLER.len()] as char));
    value
}

/// Whether `value` is one that `make_value(key, _)` produces for some size.
///
/// Sizes may differ between runs against the same cluster, so only the `key|` tag is
/// checked (or, for values shorter than the tag, that they are a prefix of it).
pub fn value_belongs_to(key: &str, value: &[u8]) -> bool {
    let mut tag = Vec::with_capacity(key.len() + 1);
    tag.extend_from_slice(key.as_bytes());
    tag.push(b'|');
    if value.len() >= tag.len() {
        value.starts_with(&tag)
    } else {
        !value.is_empty() && tag.starts_with(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn key_names_are_fixed_width() {
        assert_eq!(key_name(0), "key-00000000");
        assert_eq!(key_name(9_999), "key-00009999");
    }

    #[test]
    fn chosen_keys_stay_in_the_keyspace_and_cover_it() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = [false; 10];
        for _ in 0..1_000 {
            let k = choose_key(&mut rng, 10);
            assert!(k < 10);
            seen[k as usize] = true;
        }
        assert!(
            seen.iter().all(|s| *s),
            "uniform choice should hit every key: {seen:?}"
        );
        assert_eq!(choose_key(&mut rng, 0), 0);
    }

    #[test]
    fn values_have_the_requested_size_and_carry_their_key() {
        for size in [1, 5, 13, 100, 64 * 1024] {
            let v = make_value("key-00000042", size);
            assert_eq!(v.len(), size);
            assert!(v.is_ascii());
            assert!(
                value_belongs_to("key-00000042", v.as_bytes()),
                "size {size}"
            );
        }
        assert!(make_value("key-00000042", 100).starts_with("key-00000042|"));
    }

    #[test]
    fn values_of_different_keys_differ_in_their_filler() {
        let a = make_value("key-00000001", 200);
        let b = make_value("key-00000002", 200);
        assert_ne!(a[20..], b[20..]);
    }

    #[test]
    fn another_keys_value_is_rejected() {
        let other = make_value("key-00000043", 100);
        assert!(!value_belongs_to("key-00000042", other.as_bytes()));
        assert!(!value_belongs_to("key-0000004", other.as_bytes()));
        assert!(!value_belongs_to("key-00000042", b""));
        assert!(!value_belongs_to("key-00000042", b"xyz"));
        assert!(value_belongs_to("key-00000042", b"key-0"));
    }
}
