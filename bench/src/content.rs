//! Upload content: a few distinct pseudo-random chunks every upload is assembled from.

use std::sync::Arc;

use bytes::Bytes;

use crate::POOL_CHUNKS;

/// A few distinct pseudo-random chunks, shared (never copied) by every upload.
#[derive(Clone)]
pub(crate) struct ChunkPool {
    chunks: Arc<[Bytes]>,
    pub(crate) chunk_size: usize,
}

impl ChunkPool {
    pub(crate) fn new(chunk_size: usize) -> Self {
        let chunks = (0..POOL_CHUNKS)
            .map(|seed| Bytes::from(pseudo_random(chunk_size, seed as u64 + 1)))
            .collect();
        Self { chunks, chunk_size }
    }

    /// The `total` bytes of upload `variant`, lazily, chunk by chunk: the pool cycled from
    /// its own starting chunk, after a first chunk stamped with `variant` (the one chunk
    /// copied), so that no two variants share a digest.
    pub(crate) fn upload(
        &self,
        variant: u64,
        total: u64,
    ) -> impl Iterator<Item = Bytes> + Send + 'static {
        let chunks = self.chunks.clone();
        let start = variant as usize;
        chunk_lengths(total, self.chunk_size)
            .enumerate()
            .map(move |(i, len)| {
                let chunk = chunks[(start + i) % chunks.len()].slice(..len);
                if i > 0 {
                    return chunk;
                }
                let mut first = chunk.to_vec();
                for (byte, stamp) in first.iter_mut().zip(variant.to_le_bytes()) {
                    *byte ^= stamp;
                }
                Bytes::from(first)
            })
    }
}

/// Lengths of the chunks `total` bytes are sent in: full chunks, then the remainder.
pub(crate) fn chunk_lengths(
    total: u64,
    chunk_size: usize,
) -> impl Iterator<Item = usize> + Send + 'static {
    let chunk = chunk_size as u64;
    // Each length is at most `chunk_size`, so it fits a usize.
    (0..total.div_ceil(chunk)).map(move |i| (total - i * chunk).min(chunk) as usize)
}

/// Deterministic bytes (xorshift64), different per seed.
pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}
