//! torch's chunking of one dim among ranks (`torch.chunk`, `Shard.local_shard_size_and_offset`)
//! and transformers' strided variant for packed parameters (`_compute_strided_slice`).

use std::ops::Range;

/// `(length, offset)` of `rank`'s chunk of `size` indices split in `world_size` chunks the way
/// `torch.chunk` does: chunks of `ceil(size / world_size)`, the last ones shorter or empty.
pub(crate) fn local_shard(size: usize, world_size: usize, rank: usize) -> (usize, usize) {
    let chunk = size.div_ceil(world_size);
    let start = (chunk * rank).min(size);
    let end = (chunk * rank + chunk).min(size);
    (end - start, start)
}

/// `rank`'s contiguous chunk of `interval`, empty when it has none.
pub(crate) fn contiguous(
    interval: Range<usize>,
    world_size: usize,
    rank: usize,
) -> Vec<Range<usize>> {
    let (len, off) = local_shard(interval.len(), world_size, rank);
    if len == 0 {
        return Vec::new();
    }
    std::iter::once(interval.start + off..interval.start + off + len).collect()
}

/// `rank`'s part of `interval` holding `split_factor` packed blocks of `ceil(len / split_factor)`
/// indices: its chunk of every block, in block order.
pub(crate) fn strided(
    interval: Range<usize>,
    world_size: usize,
    rank: usize,
    split_factor: usize,
) -> Vec<Range<usize>> {
    let width = interval.len().div_ceil(split_factor.max(1));
    (0..split_factor)
        .filter_map(|g| {
            let start = (interval.start + g * width).min(interval.end);
            let end = (start + width).min(interval.end);
            contiguous(start..end, world_size, rank).pop()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_torch_chunks() {
        // torch.chunk(arange(10), 4) -> 3, 3, 3, 1; torch.chunk(arange(3), 4) -> 1, 1, 1, (none)
        let lens: Vec<_> = (0..4).map(|r| local_shard(10, 4, r)).collect();
        assert_eq!(lens, [(3, 0), (3, 3), (3, 6), (1, 9)]);
        let lens: Vec<_> = (0..4).map(|r| local_shard(3, 4, r)).collect();
        assert_eq!(lens, [(1, 0), (1, 1), (1, 2), (0, 3)]);
        // torch.chunk(arange(5), 4) -> 2, 2, 1, (none): ranks run out before the chunks do.
        let lens: Vec<_> = (0..4).map(|r| local_shard(5, 4, r).0).collect();
        assert_eq!(lens, [2, 2, 1, 0]);
        assert!(contiguous(0..5, 4, 3).is_empty());
    }

    #[test]
    fn strided_takes_a_chunk_of_every_block() {
        assert_eq!(strided(0..12, 4, 1, 2), vec![2..4, 8..10]);
        assert_eq!(strided(0..6, 4, 3, 2), Vec::<Range<usize>>::new());
        assert_eq!(strided(0..6, 4, 2, 2), vec![2..3, 5..6]);
    }
}
