//! Page bitmaps: the currency between trackers and the round planner. One bit per 4 KiB page,
//! 64 pages per word (the layout KVM_GET_DIRTY_LOG also uses, so a KVM tracker fills it directly).

use crate::memory::GuestMemory;

/// One region's dirty pages: one bit per page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// A clear bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self { words: vec![0; pages.div_ceil(64) as usize], pages }
    }
    /// Pages it covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Mark `page` (panics when out of range: a tracker bug).
    pub fn set(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }
    /// Whether `page` is marked (false out of range).
    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }
    /// Mark pages `[start, end)`, clamped to the bitmap.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.pages);
        let mut p = start;
        while p < end {
            if p % 64 == 0 && end - p >= 64 {
                self.words[(p / 64) as usize] = !0;
                p += 64;
            } else {
                self.set(p);
                p += 1;
            }
        }
    }
    /// Mark every page.
    pub fn set_all(&mut self) {
        self.set_range(0, self.pages);
    }
    /// Unmark every page.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }
    /// Marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
    /// OR another bitmap of the same size in.
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.pages, other.pages);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }
    /// Raw words, for trackers that receive a kernel bitmap (bit i of word w = page 64w+i).
    /// Bits past `pages()` must stay clear.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }
    /// The marked pages, ascending.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

/// One bitmap per region of a [`GuestMemory`], in region order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<DirtyBitmap>,
}

impl DirtyPages {
    /// Clear bitmaps for every region of `memory`.
    pub fn for_memory(memory: &GuestMemory) -> Self {
        Self { regions: memory.regions().iter().map(|r| DirtyBitmap::new(r.pages())).collect() }
    }
    /// Region `id`'s bitmap.
    pub fn region(&self, id: usize) -> &DirtyBitmap {
        &self.regions[id]
    }
    /// Region `id`'s bitmap, to mark pages in.
    pub fn region_mut(&mut self, id: usize) -> &mut DirtyBitmap {
        &mut self.regions[id]
    }
    /// All bitmaps, in region order.
    pub fn regions(&self) -> &[DirtyBitmap] {
        &self.regions
    }
    /// Marked pages in all regions.
    pub fn count(&self) -> u64 {
        self.regions.iter().map(|r| r.count()).sum()
    }
    /// Unmark everything.
    pub fn clear(&mut self) {
        self.regions.iter_mut().for_each(|r| r.clear());
    }
    /// OR `other` (same memory) in.
    pub fn union_with(&mut self, other: &DirtyPages) {
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            a.union_with(b);
        }
    }
}
