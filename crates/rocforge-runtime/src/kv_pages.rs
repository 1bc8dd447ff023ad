//! The KV cache as a pool of fixed-size pages (the vLLM design): the backend allocates one
//! cache of `n_pages * page_size` token slots at start; each sequence holds a page table, the
//! pages its positions live in, in order. Pages are handed out and taken back here; nothing
//! is allocated on the device after start.

/// A free list over the pages of one cache.
#[derive(Debug, Clone)]
pub struct PagePool {
    page_size: usize,
    total: usize,
    /// Free pages, the next one to hand out last.
    free: Vec<u32>,
}

impl PagePool {
    /// A pool of `n_pages` pages of `page_size` tokens, all free.
    pub fn new(n_pages: usize, page_size: usize) -> Self {
        Self {
            page_size: page_size.max(1),
            total: n_pages,
            free: (0..n_pages as u32).rev().collect(),
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }
    pub fn total_pages(&self) -> usize {
        self.total
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages that hold `tokens` positions.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Takes `n` pages, appended to `table`, or returns false (taking none) when fewer are free.
    pub fn alloc(&mut self, n: usize, table: &mut Vec<u32>) -> bool {
        if n > self.free.len() {
            return false;
        }
        let at = self.free.len() - n;
        table.extend(self.free.drain(at..).rev());
        true
    }

    /// Gives back every page of `table`, which is left empty.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        debug_assert!(table.iter().all(|&p| (p as usize) < self.total));
        self.free.extend(table.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_come_and_go_without_duplicates() {
        let mut pool = PagePool::new(10, 16);
        assert_eq!(pool.pages_for(0), 0);
        assert_eq!(pool.pages_for(16), 1);
        assert_eq!(pool.pages_for(17), 2);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(pool.alloc(4, &mut a));
        assert_eq!(a, [0, 1, 2, 3]);
        assert!(pool.alloc(6, &mut b));
        assert_eq!(pool.free_pages(), 0);
        let mut c = Vec::new();
        assert!(!pool.alloc(1, &mut c), "an empty pool hands out nothing");
        assert!(c.is_empty());
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(pool.free_pages(), 4);
        assert!(pool.alloc(4, &mut c));
        let mut all: Vec<u32> = b.iter().chain(&c).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<u32>>());
    }
}
