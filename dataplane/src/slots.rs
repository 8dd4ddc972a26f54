//! Keys to hash slots: CRC16/XMODEM of the key (or of its `{tag}`) modulo 16384, as Redis Cluster.

/// Number of hash slots; fixed for the life of a cluster.
pub const SLOT_COUNT: u16 = 16384;

/// A hash slot, `0..SLOT_COUNT`.
pub type Slot = u16;

/// The slot a key lives in. When the key holds a non-empty `{tag}`, only the tag is hashed,
/// so keys such as `user:{42}:name` and `user:{42}:email` share a slot.
pub fn slot_for(key: &[u8]) -> Slot {
    crc16_xmodem(hash_tag(key)) % SLOT_COUNT
}

/// The part of the key that is hashed: the bytes between the first `{` and the next `}`,
/// when there is at least one byte between them; the whole key otherwise.
fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// CRC16/XMODEM (poly 0x1021, init 0), table-driven.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[(((crc >> 8) as u8) ^ b) as usize]
    })
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Splits the slot space into `shards` contiguous inclusive ranges of near-equal size.
pub fn even_ranges(shards: u32) -> Vec<(Slot, Slot)> {
    let shards = shards.max(1);
    let total = u32::from(SLOT_COUNT);
    (0..shards)
        .map(|i| {
            let start = total * i / shards;
            let end = total * (i + 1) / shards - 1;
            (start as Slot, end as Slot)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_xmodem_check_value() {
        // The standard check input for CRC catalogues.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn slots_match_redis_cluster() {
        // Values from Redis `CLUSTER KEYSLOT`.
        assert_eq!(slot_for(b"foo"), 12182);
        assert_eq!(slot_for(b"bar"), 5061);
        assert_eq!(slot_for(b"hello"), 866);
    }

    #[test]
    fn hash_tags_group_keys() {
        assert_eq!(slot_for(b"user:{42}:name"), slot_for(b"user:{42}:email"));
        assert_eq!(slot_for(b"{42}"), slot_for(b"42"));
        // An empty tag hashes the whole key, as in Redis.
        assert_eq!(slot_for(b"a{}b"), crc16_xmodem(b"a{}b") % SLOT_COUNT);
        // Only the first tag counts.
        assert_eq!(slot_for(b"{a}{b}"), slot_for(b"a"));
        // An unclosed brace hashes the whole key.
        assert_eq!(slot_for(b"x{y"), crc16_xmodem(b"x{y") % SLOT_COUNT);
    }

    #[test]
    fn even_ranges_cover_every_slot_once() {
        for shards in [1, 2, 3, 7, 16] {
            let ranges = even_ranges(shards);
            assert_eq!(ranges.len(), shards as usize);
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges.last().unwrap().1, SLOT_COUNT - 1);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0);
            }
        }
        assert_eq!(
            even_ranges(3),
            vec![(0, 5460), (5461, 10921), (10922, 16383)]
        );
    }
}
