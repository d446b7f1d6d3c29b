//! SilesiaLike: a pool of 32 distinct 2 MiB segments (one content model per 512 KiB block,
//! shuffled), built once per seed, cached, and mapped onto the image.

use std::sync::{Arc, Mutex, OnceLock};

use crate::models::*;
use crate::rng::{hash2, Rng};
use crate::text::Vocabs;
use crate::{BLOCK, BLOCKS_PER_SEG, PAGE, POOL_BLOCKS, POOL_CACHE, POOL_SEGS, SEGMENT_BYTES};

pub(crate) struct Pool {
    data: Box<[u8]>,
    /// Per pool block: offset of its first non-zero page, where the image stamps it
    /// (`usize::MAX` for an all-zero block, which stays unstamped).
    stamp_at: Vec<usize>,
}

pub(crate) type PoolCell = Arc<OnceLock<Arc<Pool>>>;

pub(crate) fn pool_for(seed: u64) -> Arc<Pool> {
    static CACHE: OnceLock<Mutex<Vec<(u64, PoolCell)>>> = OnceLock::new();
    let cell = {
        let mut cache = CACHE.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
        if let Some(i) = cache.iter().position(|(s, _)| *s == seed) {
            let entry = cache.remove(i);
            let cell = entry.1.clone();
            cache.push(entry); // most recently used last
            cell
        } else {
            if cache.len() >= POOL_CACHE {
                cache.remove(0);
            }
            let cell: PoolCell = Arc::new(OnceLock::new());
            cache.push((seed, cell.clone()));
            cell
        }
    };
    cell.get_or_init(|| Arc::new(build_pool(seed))).clone()
}

/// Which pool segment image segment `seg` shows: a fresh permutation of the pool per cycle of
/// POOL_SEGS segments, so every aligned 64 MiB window holds the whole pool exactly once.
pub(crate) fn pool_segment(seed: u64, seg: u64) -> usize {
    const _: () = assert!(POOL_SEGS.is_power_of_two());
    let mask = POOL_SEGS as u64 - 1;
    let h = hash2(seed ^ 0x5E6_0000, seg / POOL_SEGS as u64);
    let mut r = seg & mask;
    r ^= h & mask;
    r = r.wrapping_mul((h >> 8) | 1) & mask;
    r = r.wrapping_add(h >> 20) & mask;
    r as usize
}

pub(crate) fn fill_from_pool(pool: &Pool, seed: u64, offset: u64, out: &mut [u8]) {
    let mut pos = 0usize;
    while pos < out.len() {
        let abs = offset + pos as u64;
        let seg = abs / SEGMENT_BYTES as u64;
        let in_seg = (abs % SEGMENT_BYTES as u64) as usize;
        let n = (SEGMENT_BYTES - in_seg).min(out.len() - pos);
        let pseg = pool_segment(seed, seg);
        let src = pseg * SEGMENT_BYTES + in_seg;
        out[pos..pos + n].copy_from_slice(&pool.data[src..src + n]);
        // Stamp 8 bytes of every 512 KiB block (at its first non-zero page) with the image block
        // index, so no two blocks of the image are byte-identical; zero pages stay zero.
        for b in in_seg / BLOCK..=(in_seg + n - 1) / BLOCK {
            let pool_block = pseg * BLOCKS_PER_SEG + b;
            let at = pool.stamp_at[pool_block];
            if at == usize::MAX {
                continue;
            }
            let start = b * BLOCK + at; // within the segment
            if start + 8 <= in_seg || start >= in_seg + n {
                continue;
            }
            let image_block = seg * BLOCKS_PER_SEG as u64 + b as u64;
            let stamp = hash2(seed ^ 0x57A3_9000, image_block).to_le_bytes();
            for (k, sb) in stamp.iter().enumerate() {
                let p = start + k;
                if p >= in_seg && p < in_seg + n {
                    out[pos + p - in_seg] ^= sb;
                }
            }
        }
        pos += n;
    }
}

/// Content types of the SilesiaLike mix, one per 512 KiB pool block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    /// dickens: English prose.
    English,
    /// mozilla: tar of executables (code, symbol strings, tables, padding, packed data).
    Executables,
    /// mr: 16-bit MRI slices (dark background, smooth tissue).
    Mri,
    /// nci: SDF chemical records.
    Sdf,
    /// ooffice: x86 machine code.
    X86,
    /// osdb: binary database rows.
    Database,
    /// reymont: Polish text (UTF-8) inside PDF text operators.
    Polish,
    /// samba: tar of C sources.
    CSource,
    /// sao: binary star catalogue records.
    StarCatalog,
    /// webster: dictionary entries with markup.
    Dictionary,
    /// x-ray: noisy 16-bit grayscale.
    XRay,
    /// xml: XML records.
    Xml,
    /// Already-compressed data.
    Incompressible,
}

/// Blocks of each content type in the 128-block pool.
pub(crate) const MIX: &[(Content, usize)] = &[
    (Content::English, 6),
    (Content::Executables, 28),
    (Content::Mri, 6),
    (Content::Sdf, 22),
    (Content::X86, 4),
    (Content::Database, 6),
    (Content::Polish, 4),
    (Content::CSource, 14),
    (Content::StarCatalog, 4),
    (Content::Dictionary, 25),
    (Content::XRay, 5),
    (Content::Xml, 3),
    (Content::Incompressible, 1),
];

/// Probability that a generated page is zeroed (free guest memory); Executables add zero runs.
pub(crate) const ZERO_PAGE_P: f64 = 0.009;

pub(crate) fn pool_layout(seed: u64) -> Vec<Content> {
    let mut layout: Vec<Content> = MIX.iter().flat_map(|&(c, n)| vec![c; n]).collect();
    assert_eq!(layout.len(), POOL_BLOCKS);
    let mut rng = Rng::new(hash2(seed, 0x1A70));
    for i in (1..layout.len()).rev() {
        let j = rng.below(i + 1);
        layout.swap(i, j);
    }
    layout
}

pub(crate) fn build_pool(seed: u64) -> Pool {
    let layout = pool_layout(seed);
    let vocabs = Vocabs::new(seed);
    let mut data = vec![0u8; POOL_BLOCKS * BLOCK].into_boxed_slice();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 2);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let blocks: Vec<Mutex<&mut [u8]>> = data.chunks_mut(BLOCK).map(Mutex::new).collect();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= POOL_BLOCKS {
                    break;
                }
                let mut block = blocks[i].lock().unwrap();
                generate_block(layout[i], hash2(seed, i as u64), &vocabs, &mut block);
            });
        }
    });
    drop(blocks);
    let stamp_at = data
        .chunks(BLOCK)
        .map(|b| {
            b.chunks(PAGE)
                .position(|p| p.iter().any(|&x| x != 0))
                .map_or(usize::MAX, |i| i * PAGE)
        })
        .collect();
    Pool { data, stamp_at }
}

pub(crate) fn generate_block(content: Content, block_seed: u64, v: &Vocabs, out: &mut [u8]) {
    let mut rng = Rng::new(block_seed);
    let n = out.len();
    let mut buf: Vec<u8> = Vec::with_capacity(n + 64 * 1024);
    match content {
        Content::English => gen_english(&mut buf, &mut rng, &v.english, n),
        Content::Executables => gen_executables(&mut buf, &mut rng, v, n),
        Content::Mri => gen_mri(&mut buf, &mut rng, n),
        Content::Sdf => gen_sdf(&mut buf, &mut rng, n),
        Content::X86 => gen_x86(&mut buf, &mut rng, n),
        Content::Database => gen_database(&mut buf, &mut rng, n),
        Content::Polish => gen_polish_pdf(&mut buf, &mut rng, &v.polish, n),
        Content::CSource => gen_c_tar(&mut buf, &mut rng, v, n),
        Content::StarCatalog => gen_star_catalog(&mut buf, &mut rng, n),
        Content::Dictionary => gen_dictionary(&mut buf, &mut rng, &v.english, n),
        Content::XRay => gen_xray(&mut buf, &mut rng, n),
        Content::Xml => gen_xml(&mut buf, &mut rng, &v.english, n),
        Content::Incompressible => {
            buf.resize(n, 0);
            rng.fill_bytes(&mut buf);
        }
    }
    debug_assert!(buf.len() >= n, "{content:?} generated {} < {n}", buf.len());
    buf.resize(n, 0);
    out.copy_from_slice(&buf[..n]);
    // Sprinkle zero pages (free memory inside the guest).
    let mut zr = Rng::new(block_seed ^ 0x2E80);
    for page in out.chunks_mut(PAGE) {
        if zr.chance(ZERO_PAGE_P) {
            page.fill(0);
        }
    }
}
